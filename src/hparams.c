/*
 * hparams.c - config.json of a Kimi Linear checkpoint into struct k_config.
 *
 * Keys are the checkpoint's own names (doc/model.md section 1). The layer lists in
 * linear_attn_config are 1-based: layer i (0-based) is KDA iff i+1 is in kda_layers, and
 * MLA iff i+1 is in full_attn_layers; every layer must be in exactly one list.
 * Every value is range-checked here so that the model code can trust it.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "hparams.h"

/* Upper bounds that keep every size computation far from overflow. */
#define CFG_MAX_DIM (1 << 20)
#define CFG_MAX_VOCAB (1 << 24)

struct cfg_ctx {
    const cJSON *root;
    const char *fname;
    struct kli_err *err;
};

/* A number under KEY into *iout (an integer) or else *fout: DFLT where it is absent or null
 * (an error where REQUIRED), an error where it is not a number (not an integer, for *iout)
 * or outside [lo, hi]. */
static int
cfg_number(struct cfg_ctx *c, const cJSON *obj, const char *key, int required, double dflt,
           double lo, double hi, int32_t *iout, float *fout)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    double x = dflt;

    if (v == NULL || cJSON_IsNull(v)) {
        if (required)
            return err_set(c->err, KLI_E_FORMAT, "%s: missing key \"%s\"", c->fname, key);
    } else {
        x = v->valuedouble;
        if (!cJSON_IsNumber(v) || (iout != NULL && x != floor(x)))
            return err_set(c->err, KLI_E_FORMAT, "%s: \"%s\" must be %s", c->fname, key,
                               iout != NULL ? "an integer" : "a number");
        if (!(x >= lo && x <= hi)) {
            if (iout != NULL)
                return err_set(c->err, KLI_E_RANGE, "%s: \"%s\" is %.0f, outside [%lld, %lld]",
                                   c->fname, key, x, (long long)lo, (long long)hi);
            return err_set(c->err, KLI_E_RANGE, "%s: \"%s\" is %g, outside [%g, %g]",
                               c->fname, key, x, lo, hi);
        }
    }
    if (iout != NULL)
        *iout = (int32_t)x;
    else
        *fout = (float)x;
    return KLI_OK;
}

/* Its bounds and defaults are small: exact in a double. */
static int
cfg_int(struct cfg_ctx *c, const cJSON *obj, const char *key, int required, int64_t dflt,
        int64_t lo, int64_t hi, int32_t *out)
{
    return cfg_number(c, obj, key, required, (double)dflt, (double)lo, (double)hi, out, NULL);
}

static int
cfg_float(struct cfg_ctx *c, const cJSON *obj, const char *key, int required, double dflt,
          double lo, double hi, float *out)
{
    return cfg_number(c, obj, key, required, dflt, lo, hi, NULL, out);
}

static int
cfg_bool(struct cfg_ctx *c, const cJSON *obj, const char *key, int dflt, int32_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);

    if (v == NULL || cJSON_IsNull(v)) {
        *out = dflt;
        return KLI_OK;
    }
    if (!cJSON_IsBool(v))
        return err_set(c->err, KLI_E_FORMAT, "%s: \"%s\" must be true or false",
                           c->fname, key);
    *out = cJSON_IsTrue(v);
    return KLI_OK;
}

/* Marks the layers named by a 1-based list. */
static int
cfg_layer_list(struct cfg_ctx *c, const cJSON *lac, const char *key, int n_layers,
               uint8_t *seen, enum k_mixer kind, struct k_config *cfg)
{
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(lac, key);
    const cJSON *it;

    if (arr == NULL || cJSON_IsNull(arr))
        return KLI_OK;
    if (!cJSON_IsArray(arr))
        return err_set(c->err, KLI_E_FORMAT, "%s: linear_attn_config.%s must be a list",
                           c->fname, key);
    cJSON_ArrayForEach(it, arr) {
        if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble))
            return err_set(c->err, KLI_E_FORMAT,
                               "%s: linear_attn_config.%s holds a non-integer", c->fname, key);
        double l = it->valuedouble;
        if (l < 1 || l > n_layers)
            return err_set(c->err, KLI_E_RANGE,
                               "%s: linear_attn_config.%s names layer %.0f; layers are 1..%d "
                               "(the lists are 1-based)", c->fname, key, l, n_layers);
        int i = (int)l - 1;
        if (seen[i])
            return err_set(c->err, KLI_E_FORMAT,
                               "%s: layer %d (1-based) is listed twice in linear_attn_config",
                               c->fname, i + 1);
        seen[i] = 1;
        cfg->layer_mixer[i] = kind;
    }
    return KLI_OK;
}

static int
cfg_parse_root(struct k_config *cfg, struct cfg_ctx *c)
{
    const cJSON *r = c->root;
    const cJSON *lac, *v;
    int rc;
    uint8_t seen[KLI_MAX_LAYERS];

    memset(cfg, 0, sizeof(*cfg));
    if (!cJSON_IsObject(r))
        return err_set(c->err, KLI_E_FORMAT, "%s: not a JSON object", c->fname);

    v = cJSON_GetObjectItemCaseSensitive(r, "model_type");
    if (v != NULL && cJSON_IsString(v) && strcmp(v->valuestring, "kimi_linear") != 0)
        return err_set(c->err, KLI_E_UNSUPPORTED,
                           "%s: model_type is \"%s\"; kli runs \"kimi_linear\"", c->fname,
                           v->valuestring);

    if ((rc = cfg_int(c, r, "hidden_size", 1, 0, 1, CFG_MAX_DIM, &cfg->d_model)) ||
        (rc = cfg_int(c, r, "num_hidden_layers", 1, 0, 1, KLI_MAX_LAYERS, &cfg->n_layers)) ||
        (rc = cfg_int(c, r, "vocab_size", 1, 0, 1, CFG_MAX_VOCAB, &cfg->n_vocab)) ||
        (rc = cfg_int(c, r, "intermediate_size", 0, 0, 0, CFG_MAX_DIM, &cfg->d_ff)) ||
        (rc = cfg_int(c, r, "model_max_length", 0, 1048576, 1, INT32_MAX / 2,
                      &cfg->ctx_max)) ||
        (rc = cfg_float(c, r, "rms_norm_eps", 0, 1e-5, 0, 1, &cfg->norm_eps)) ||
        (rc = cfg_bool(c, r, "tie_word_embeddings", 0, &cfg->tie_embeddings)) ||
        (rc = cfg_int(c, r, "bos_token_id", 0, -1, -1, CFG_MAX_VOCAB, &cfg->bos)) ||
        (rc = cfg_int(c, r, "eos_token_id", 0, -1, -1, CFG_MAX_VOCAB, &cfg->eos)) ||
        (rc = cfg_int(c, r, "pad_token_id", 0, -1, -1, CFG_MAX_VOCAB, &cfg->pad)))
        return rc;

    /* MLA */
    v = cJSON_GetObjectItemCaseSensitive(r, "q_lora_rank");
    if (v != NULL && !cJSON_IsNull(v))
        return err_set(c->err, KLI_E_UNSUPPORTED,
                           "%s: q_lora_rank must be null (Kimi Linear has no q compression)",
                           c->fname);
    v = cJSON_GetObjectItemCaseSensitive(r, "mla_use_nope");
    if (v != NULL && cJSON_IsFalse(v))
        return err_set(c->err, KLI_E_UNSUPPORTED,
                           "%s: mla_use_nope is false; kli implements NoPE MLA only", c->fname);
    if ((rc = cfg_int(c, r, "num_attention_heads", 1, 0, 1, 4096, &cfg->mla.n_heads)) ||
        (rc = cfg_int(c, r, "kv_lora_rank", 0, 0, 1, CFG_MAX_DIM, &cfg->mla.kv_lora_rank)) ||
        (rc = cfg_int(c, r, "qk_nope_head_dim", 0, 0, 1, 4096, &cfg->mla.qk_nope_dim)) ||
        (rc = cfg_int(c, r, "qk_rope_head_dim", 0, 0, 0, 4096, &cfg->mla.qk_rope_dim)) ||
        (rc = cfg_int(c, r, "v_head_dim", 0, 0, 1, 4096, &cfg->mla.v_head_dim)))
        return rc;

    /* KDA */
    lac = cJSON_GetObjectItemCaseSensitive(r, "linear_attn_config");
    if (lac == NULL || !cJSON_IsObject(lac))
        return err_set(c->err, KLI_E_FORMAT, "%s: missing object \"linear_attn_config\"",
                           c->fname);
    if ((rc = cfg_int(c, lac, "num_heads", 1, 0, 1, 4096, &cfg->kda.n_heads)) ||
        (rc = cfg_int(c, lac, "head_dim", 1, 0, 1, 4096, &cfg->kda.head_dim)) ||
        (rc = cfg_int(c, lac, "short_conv_kernel_size", 0, 4, 1, 64, &cfg->kda.conv_size)))
        return rc;
    memset(seen, 0, sizeof(seen));
    if ((rc = cfg_layer_list(c, lac, "kda_layers", cfg->n_layers, seen, KLI_MIXER_KDA, cfg)) ||
        (rc = cfg_layer_list(c, lac, "full_attn_layers", cfg->n_layers, seen, KLI_MIXER_MLA,
                             cfg)))
        return rc;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (!seen[i])
            return err_set(c->err, KLI_E_FORMAT,
                               "%s: layer %d (1-based) is in neither kda_layers nor "
                               "full_attn_layers", c->fname, i + 1);
    }

    /* MoE */
    if ((rc = cfg_int(c, r, "num_experts", 0, 0, 0, KLI_MAX_EXPERTS, &cfg->moe.n_experts)))
        return rc;
    if (cfg->moe.n_experts > 0) {
        if ((rc = cfg_int(c, r, "num_experts_per_token", 1, 0, 1, KLI_MAX_TOPK,
                          &cfg->moe.top_k)) ||
            (rc = cfg_int(c, r, "num_shared_experts", 0, 0, 0, 64, &cfg->moe.n_shared)) ||
            (rc = cfg_int(c, r, "moe_intermediate_size", 1, 0, 1, CFG_MAX_DIM,
                          &cfg->moe.d_ff)) ||
            (rc = cfg_int(c, r, "first_k_dense_replace", 0, 0, 0, KLI_MAX_LAYERS,
                          &cfg->moe.first_dense)) ||
            (rc = cfg_int(c, r, "moe_layer_freq", 0, 1, 1, KLI_MAX_LAYERS,
                          &cfg->moe.layer_freq)) ||
            (rc = cfg_int(c, r, "num_expert_group", 0, 1, 1, KLI_MAX_EXPERTS,
                          &cfg->moe.n_group)) ||
            (rc = cfg_int(c, r, "topk_group", 0, 1, 1, KLI_MAX_EXPERTS, &cfg->moe.topk_group)) ||
            (rc = cfg_bool(c, r, "moe_renormalize", 1, &cfg->moe.renormalize)) ||
            (rc = cfg_float(c, r, "routed_scaling_factor", 0, 1.0, 0, 1e6,
                            &cfg->moe.scaling)))
            return rc;
        if (cfg->moe.top_k > cfg->moe.n_experts)
            return err_set(c->err, KLI_E_RANGE,
                               "%s: num_experts_per_token (%d) exceeds num_experts (%d)",
                               c->fname, cfg->moe.top_k, cfg->moe.n_experts);
        if (cfg->moe.n_experts % cfg->moe.n_group != 0)
            return err_set(c->err, KLI_E_RANGE,
                               "%s: num_experts (%d) is not a multiple of num_expert_group "
                               "(%d)", c->fname, cfg->moe.n_experts, cfg->moe.n_group);
        if (cfg->moe.topk_group > cfg->moe.n_group)
            return err_set(c->err, KLI_E_RANGE,
                               "%s: topk_group (%d) exceeds num_expert_group (%d)", c->fname,
                               cfg->moe.topk_group, cfg->moe.n_group);
        if ((int64_t)cfg->moe.topk_group * (cfg->moe.n_experts / cfg->moe.n_group) <
            cfg->moe.top_k)
            return err_set(c->err, KLI_E_RANGE,
                               "%s: topk_group groups of %d experts cannot supply %d experts",
                               c->fname, cfg->moe.n_experts / cfg->moe.n_group,
                               cfg->moe.top_k);
        v = cJSON_GetObjectItemCaseSensitive(r, "moe_router_activation_func");
        cfg->moe.sigmoid = 1;
        if (v != NULL && !cJSON_IsNull(v)) {
            if (!cJSON_IsString(v))
                return err_set(c->err, KLI_E_FORMAT,
                                   "%s: moe_router_activation_func must be a string",
                                   c->fname);
            if (strcmp(v->valuestring, "softmax") == 0)
                cfg->moe.sigmoid = 0;
            else if (strcmp(v->valuestring, "sigmoid") != 0)
                return err_set(c->err, KLI_E_UNSUPPORTED,
                                   "%s: moe_router_activation_func \"%s\" (kli knows sigmoid "
                                   "and softmax)", c->fname, v->valuestring);
        }
    }
    for (int i = 0; i < cfg->n_layers; i++) {
        int moe = cfg->moe.n_experts > 0 && i >= cfg->moe.first_dense &&
                  i % cfg->moe.layer_freq == 0;
        cfg->layer_ffn[i] = moe ? KLI_FFN_MOE : KLI_FFN_DENSE;
        if (!moe && cfg->d_ff <= 0)
            return err_set(c->err, KLI_E_FORMAT,
                               "%s: layer %d (1-based) has a dense MLP but intermediate_size is "
                               "missing", c->fname, i + 1);
    }

    int has_mla = 0;
    for (int i = 0; i < cfg->n_layers; i++)
        has_mla |= cfg->layer_mixer[i] == KLI_MIXER_MLA;
    if (has_mla && (cfg->mla.kv_lora_rank <= 0 || cfg->mla.qk_nope_dim <= 0 ||
                    cfg->mla.v_head_dim <= 0))
        return err_set(c->err, KLI_E_FORMAT,
                           "%s: MLA layers need kv_lora_rank, qk_nope_head_dim and v_head_dim",
                           c->fname);
    return KLI_OK;
}

int
hparams_parse(struct k_config *cfg, const char *text, size_t len, const char *fname,
             struct kli_err *err)
{
    struct cfg_ctx c = {NULL, fname, err};
    const char *end = NULL;
    int rc;

    c.root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (c.root == NULL) {
        size_t off = end != NULL && end >= text ? (size_t)(end - text) : 0;
        return err_set(err, KLI_E_FORMAT, "%s: malformed JSON near byte %zu", fname, off);
    }
    rc = cfg_parse_root(cfg, &c);
    cJSON_Delete((cJSON *)c.root);
    return rc;
}

int
hparams_load(struct k_config *cfg, const char *dir, struct kli_err *err)
{
    char path[4096];
    char *buf = NULL;
    size_t n;
    int rc;

    if (snprintf(path, sizeof(path), "%s/config.json", dir) >= (int)sizeof(path))
        return err_set(err, KLI_E_RANGE, "model path too long");
    /* A regular file of at most 16 MiB (src/file.c): a FIFO or /dev/zero is refused. */
    if ((rc = file_read(path, (uint64_t)1 << 24, &buf, &n, err)) != KLI_OK)
        return rc;
    rc = hparams_parse(cfg, buf, n, path, err);
    free(buf);
    return rc;
}
