/*
 * test-loader.c - model-level bad input: every broken model directory is refused with
 * one clear message naming what is wrong, and nothing crashes.
 *
 * Each case copies the tiny fixture into a temporary directory, breaks one thing (the
 * config text, a tensor's name, shape or dtype in the safetensors header, a value) and
 * opens it through the public API.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

static char fixture[4096];
static char *orig_config;
static uint8_t *orig_st;
static size_t orig_st_len, orig_config_len;

static void
spill(const char *dir, const char *name, const void *data, size_t len)
{
    char path[4200];

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (!tl_spill(path, data, len)) {
        perror(path);
        exit(99);
    }
}

/* cfg (freed) with its first `from` replaced by `to`; from NULL: `to` is the whole config. */
static char *
config_edit(char *cfg, const char *from, const char *to)
{
    const char *p = from ? strstr(cfg, from) : NULL;
    size_t n = strlen(cfg) + strlen(to) + 1;
    char *s = malloc(n);

    if (p == NULL) {
        if (from != NULL) {
            fprintf(stderr, "config_edit: '%s' not in config\n", from);
            exit(99);
        }
        strcpy(s, to);
        free(cfg);
        return s;
    }
    size_t pre = (size_t)(p - cfg);
    memcpy(s, cfg, pre);
    strcpy(s + pre, to);
    strcat(s, p + strlen(from));
    free(cfg);
    return s;
}

/* The safetensors file with its header edited by `edit`. */
typedef void (*header_edit)(cJSON *hdr);

static uint8_t *
st_with(header_edit edit, size_t *len)
{
    uint64_t n;
    memcpy(&n, orig_st, 8);
    char *text = malloc(n + 1);
    memcpy(text, orig_st + 8, n);
    text[n] = 0;
    cJSON *hdr = cJSON_Parse(text);
    free(text);
    if (edit != NULL)
        edit(hdr);
    char *out = cJSON_PrintUnformatted(hdr);
    cJSON_Delete(hdr);
    size_t hl = strlen(out), pad = (8 - hl % 8) % 8, data = orig_st_len - 8 - n;
    uint8_t *buf = malloc(8 + hl + pad + data);
    uint64_t nh = hl + pad;
    memcpy(buf, &nh, 8);
    memcpy(buf + 8, out, hl);
    memset(buf + 8 + hl, ' ', pad);
    memcpy(buf + 8 + nh, orig_st + 8 + n, data);
    free(out);
    *len = 8 + nh + data;
    return buf;
}

static int
open_dir(const char *dir, struct kli_err *err)
{
    struct kli_model *m = NULL;
    int rc;

    memset(err, 0, sizeof(*err));
    rc = kli_model_open(&m, dir, NULL, err);
    if (rc == KLI_OK) {
        /* It opened: it must also run. */
        struct kli_session *s = NULL;
        kli_token t = 1;
        if (kli_session_create(&s, m, NULL, err) == KLI_OK)
            rc = kli_session_eval(s, &t, 1, NULL, err);
        kli_session_free(s);
    }
    kli_model_close(m);
    return rc;
}

/* Writes a model dir from (config, safetensors) and expects failure with `want` in the
 * message. */
static void
expect(const char *what, char *cfg, uint8_t *st, size_t st_len, int code, const char *want)
{
    char dir[] = "/tmp/kli-loader-XXXXXX";
    struct kli_err err;

    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        exit(99);
    }
    spill(dir, "config.json", cfg ? cfg : orig_config, cfg ? strlen(cfg) : orig_config_len);
    spill(dir, "model.safetensors", st ? st : orig_st, st ? st_len : orig_st_len);
    int rc = open_dir(dir, &err);
    if (code == KLI_OK) {
        ok(rc == KLI_OK, "%s: opens and runs (%s)", what, err.msg);
    } else {
        ok(rc == code && strstr(err.msg, want) != NULL, "%s: code %d (want %d), message: %s",
           what, rc, code, err.msg);
    }
    if (tl_rmtree(dir) != 0)
        diag("could not remove %s", dir);
    free(cfg);
    free(st);
}

/* A config.json with up to two text edits, applied in order, and the failure it must give. */
struct config_case {
    const char *what;
    const char *edit[2][2];   /* {from, to}; a NULL `to` ends the list */
    int code;
    const char *want;
};

static void
expect_configs(const struct config_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct config_case *c = &cases[i];
        char *cfg = malloc(orig_config_len + 1);

        memcpy(cfg, orig_config, orig_config_len + 1);
        for (int e = 0; e < 2 && c->edit[e][1] != NULL; e++)
            cfg = config_edit(cfg, c->edit[e][0], c->edit[e][1]);
        expect(c->what, cfg, NULL, 0, c->code, c->want);
    }
}

/* ---- header edits -------------------------------------------------------------------- */

static void
ed_rename(cJSON *h)
{
    cJSON *t = cJSON_DetachItemFromObject(h, "model.layers.2.self_attn.b_proj.weight");
    cJSON_AddItemToObject(h, "model.layers.2.self_attn.b_proj_renamed.weight", t);
}

static void
ed_transpose(cJSON *h)
{
    cJSON *t = cJSON_GetObjectItem(h, "model.layers.1.self_attn.o_proj.weight");
    cJSON *shape = cJSON_GetObjectItem(t, "shape");
    int a = cJSON_GetArrayItem(shape, 0)->valueint, b = cJSON_GetArrayItem(shape, 1)->valueint;
    cJSON_ReplaceItemInArray(shape, 0, cJSON_CreateNumber(b));
    cJSON_ReplaceItemInArray(shape, 1, cJSON_CreateNumber(a));
}

static void
ed_dtype_i16(cJSON *h)
{
    cJSON *t = cJSON_GetObjectItem(h, "model.layers.0.self_attn.q_proj.weight");
    cJSON_ReplaceItemInObject(t, "dtype", cJSON_CreateString("I16"));
}

static void
ed_dtype_bogus(cJSON *h)
{
    cJSON *t = cJSON_GetObjectItem(h, "model.norm.weight");
    cJSON_ReplaceItemInObject(t, "dtype", cJSON_CreateString("BF17"));
}

static void
ed_extra_layer_tensor(cJSON *h)
{
    /* A duplicate entry for an extra (sixth) layer pointing at layer 0's norm bytes. */
    cJSON *t = cJSON_Duplicate(cJSON_GetObjectItem(h, "model.layers.0.input_layernorm.weight"),
                               1);
    cJSON_AddItemToObject(h, "model.layers.5.input_layernorm.weight", t);
}

static void
ed_offsets_past_end(cJSON *h)
{
    cJSON *t = cJSON_GetObjectItem(h, "lm_head.weight");
    cJSON *off = cJSON_GetObjectItem(t, "data_offsets");
    double e = cJSON_GetArrayItem(off, 1)->valuedouble;
    cJSON_ReplaceItemInArray(off, 1, cJSON_CreateNumber(e + 1e9));
}

int
main(int argc, char **argv)
{
    const char *td = tl_data();
    char path[4200];
    size_t len = 0;

    tap_init_whole(argc, argv);
    snprintf(fixture, sizeof(fixture), "%s/tiny-kimi-linear", td);
    snprintf(path, sizeof(path), "%s/config.json", fixture);
    orig_config = tl_slurp(path, &orig_config_len);
    snprintf(path, sizeof(path), "%s/model.safetensors", fixture);
    orig_st = (uint8_t *)tl_slurp(path, &orig_st_len);
    if (orig_config == NULL || orig_st == NULL)
        skip_all("fixture missing");

    struct kli_err err;
    ok(open_dir(fixture, &err) == KLI_OK, "the fixture itself opens and runs (%s)", err.msg);
    ok(open_dir("/nonexistent/kli-model", &err) == KLI_E_IO && strstr(err.msg, "/nonexistent"),
       "missing directory: %s", err.msg);

    /* config.json */
    static const struct config_case bad_config[] = {
        {"malformed JSON", {{"\"hidden_size\": 128,", "\"hidden_size\": 128,,"}}, KLI_E_FORMAT,
         "malformed JSON"},
        {"not an object", {{NULL, "[1, 2, 3]"}}, KLI_E_FORMAT, "not a JSON object"},
        {"missing hidden_size", {{"\"hidden_size\": 128,", ""}}, KLI_E_FORMAT,
         "\"hidden_size\""},
        {"string where a number goes", {{"\"vocab_size\": 512", "\"vocab_size\": \"x\""}},
         KLI_E_FORMAT, "vocab_size"},
        {"negative head count", {{"\"num_attention_heads\": 2", "\"num_attention_heads\": -2"}},
         KLI_E_RANGE, "num_attention_heads"},
        {"0-based layer list", {{"\"kda_layers\": [\n   1,", "\"kda_layers\": [\n   0,"}},
         KLI_E_RANGE, "1-based"},
        {"layer in no list", {{"\"full_attn_layers\": [\n   4\n  ]", "\"full_attn_layers\": []"}},
         KLI_E_FORMAT, "neither"},
        {"top-k above expert count",
         {{"\"num_experts_per_token\": 2", "\"num_experts_per_token\": 9"}}, KLI_E_RANGE,
         "num_experts_per_token"},
        {"q_lora_rank set", {{"\"q_lora_rank\": null", "\"q_lora_rank\": 64"}},
         KLI_E_UNSUPPORTED, "q_lora_rank"},
        {"unknown router function", {{"\"sigmoid\"", "\"relu\""}}, KLI_E_UNSUPPORTED, "relu"},

        /* config that contradicts the tensors */
        {"hidden_size contradicts tensors", {{"\"hidden_size\": 128", "\"hidden_size\": 96"}},
         KLI_E_FORMAT, "expected [512,96]"},
        /* six layers, the sixth declared KDA: its tensors are missing */
        {"more layers than the checkpoint",
         {{"\"num_hidden_layers\": 5", "\"num_hidden_layers\": 6"}, {"   5\n  ]", "   5, 6\n  ]"}},
         KLI_E_FORMAT, "missing tensor model.layers.5."},
        {"fewer layers than the checkpoint",
         {{"\"num_hidden_layers\": 5", "\"num_hidden_layers\": 4"}, {",\n   5\n  ]", "\n  ]"}},
         KLI_E_FORMAT, "model.layers.4."},
        {"more experts than the checkpoint", {{"\"num_experts\": 8", "\"num_experts\": 16"}},
         KLI_E_FORMAT, "gate.weight has shape [8,128], expected [16,128]"},
        {"fewer experts than the checkpoint", {{"\"num_experts\": 8", "\"num_experts\": 4"}},
         KLI_E_FORMAT, "gate.weight has shape [8,128], expected [4,128]"},
        {"KDA head count contradicts tensors", {{"\"num_heads\": 2", "\"num_heads\": 4"}},
         KLI_E_FORMAT, "expected"},
    };
    expect_configs(bad_config, sizeof(bad_config) / sizeof(bad_config[0]));

    /* tensors */
    static const struct {
        const char *what;
        header_edit edit;
        int code;
        const char *want;
    } bad_header[] = {
        {"missing tensor", ed_rename, KLI_E_FORMAT,
         "missing tensor model.layers.2.self_attn.b_proj.weight"},
        {"transposed shape", ed_transpose, KLI_E_FORMAT,
         "model.layers.1.self_attn.o_proj.weight has shape [64,128], expected [128,64]"},
        {"integer dtype", ed_dtype_i16, KLI_E_UNSUPPORTED, "I16"},
        {"unknown dtype", ed_dtype_bogus, KLI_E_FORMAT, "BF17"},
        {"tensor of a layer the config lacks", ed_extra_layer_tensor, KLI_E_FORMAT,
         "model.layers.5.input_layernorm.weight"},
        {"offsets past the end", ed_offsets_past_end, KLI_E_FORMAT, "lm_head.weight"},
    };
    uint8_t *st;
    for (size_t i = 0; i < sizeof(bad_header) / sizeof(bad_header[0]); i++) {
        st = st_with(bad_header[i].edit, &len);
        expect(bad_header[i].what, NULL, st, len, bad_header[i].code, bad_header[i].want);
    }
    st = malloc(orig_st_len);
    memcpy(st, orig_st, orig_st_len);
    expect("truncated file", NULL, st, orig_st_len / 2, KLI_E_FORMAT, "");

    /* A NaN in a norm weight: find model.norm.weight's bytes and poison the first. */
    {
        uint64_t n;
        memcpy(&n, orig_st, 8);
        cJSON *h = cJSON_ParseWithLength((const char *)orig_st + 8, n);
        cJSON *off = cJSON_GetObjectItem(cJSON_GetObjectItem(h, "model.norm.weight"),
                                         "data_offsets");
        size_t at = 8 + n + (size_t)cJSON_GetArrayItem(off, 0)->valuedouble;
        cJSON_Delete(h);
        st = malloc(orig_st_len);
        memcpy(st, orig_st, orig_st_len);
        st[at] = 0xc0;
        st[at + 1] = 0x7f;   /* bf16 0x7fc0 = NaN */
        expect("NaN in a norm weight", NULL, st, orig_st_len, KLI_E_FORMAT, "non-finite");
    }

    free(orig_config);
    free(orig_st);
    plan_done();
    return tap_exit();
}
