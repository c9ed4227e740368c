/*
 * test-grammar.c - JSON Schema constrained decoding (src/jsonschema.c, src/grammar.c).
 *
 * The schema compiler's refusals (each names its keyword and place), the matcher on byte
 * strings known to be valid or invalid, the trie-and-cache mask against its plain twin
 * (every token fed on its own), and generation from random logits through a sampler: the
 * output must parse (cJSON) and validate under a validator written here from the schema
 * text alone, also when the token budget is barely enough.
 */
#include "config.h"

#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "grammar.h"
#include "tap.h"
#include "testlib.h"

#define TSEED 0x6a73u

static uint64_t trng;
static struct kli_tokenizer *tok;

/* ---- an independent validator: the schema's text, walked as JSON ---------------------- */

static int validate(const cJSON *root, const cJSON *s, const cJSON *v);

static const cJSON *
resolve(const cJSON *root, const char *ref)
{
    const cJSON *t = root;
    char buf[256];

    if (ref[0] != '#')
        return NULL;
    snprintf(buf, sizeof(buf), "%s", ref + 1);
    for (char *p = strtok(buf, "/"); p != NULL && t != NULL; p = strtok(NULL, "/"))
        t = cJSON_GetObjectItemCaseSensitive(t, p);
    return t;
}

static int
is_type(const cJSON *v, const char *t)
{
    if (strcmp(t, "object") == 0)
        return cJSON_IsObject(v);
    if (strcmp(t, "array") == 0)
        return cJSON_IsArray(v);
    if (strcmp(t, "string") == 0)
        return cJSON_IsString(v);
    if (strcmp(t, "number") == 0)
        return cJSON_IsNumber(v);
    if (strcmp(t, "integer") == 0)
        return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble);
    if (strcmp(t, "boolean") == 0)
        return cJSON_IsBool(v);
    return cJSON_IsNull(v);
}

static long
utf8_chars(const char *s)
{
    long n = 0;

    for (; *s != '\0'; s++)
        n += ((unsigned char)*s & 0xc0) != 0x80;
    return n;
}

static double
num(const cJSON *s, const char *k, int *has)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, k);

    *has = cJSON_IsNumber(x);
    return *has ? x->valuedouble : 0;
}

static int
validate(const cJSON *root, const cJSON *s, const cJSON *v)
{
    const cJSON *k, *x;
    int has;
    double d;

    if (cJSON_IsTrue(s))
        return 1;
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "$ref")) != NULL)
        return validate(root, resolve(root, x->valuestring), v);
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "anyOf")) != NULL) {
        cJSON_ArrayForEach(k, x) {
            if (validate(root, k, v))
                return 1;
        }
        return 0;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "oneOf")) != NULL) {
        int n = 0;
        cJSON_ArrayForEach(k, x)
            n += validate(root, k, v);
        return n == 1;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "type")) != NULL) {
        int any = 0;
        if (cJSON_IsString(x))
            any = is_type(v, x->valuestring);
        cJSON_ArrayForEach(k, x)
            any |= is_type(v, k->valuestring);
        if (!any)
            return 0;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "const")) != NULL && !cJSON_Compare(x, v, 1))
        return 0;
    if ((x = cJSON_GetObjectItemCaseSensitive(s, "enum")) != NULL) {
        int any = 0;
        cJSON_ArrayForEach(k, x)
            any |= cJSON_Compare(k, v, 1);
        if (!any)
            return 0;
    }
    if (cJSON_IsString(v) && (x = cJSON_GetObjectItemCaseSensitive(s, "pattern")) != NULL) {
        regex_t re;   /* POSIX extended syntax: the test's patterns keep to it */
        if (regcomp(&re, x->valuestring, REG_EXTENDED | REG_NOSUB) != 0)
            return 0;
        int m = regexec(&re, v->valuestring, 0, NULL, 0) == 0;
        regfree(&re);
        if (!m)
            return 0;
    }
    if (cJSON_IsString(v)) {
        d = num(s, "minLength", &has);
        if (has && utf8_chars(v->valuestring) < (long)d)
            return 0;
        d = num(s, "maxLength", &has);
        if (has && utf8_chars(v->valuestring) > (long)d)
            return 0;
    }
    if (cJSON_IsNumber(v)) {
        double y = v->valuedouble;
        const cJSON *xm = cJSON_GetObjectItemCaseSensitive(s, "exclusiveMinimum");
        const cJSON *xM = cJSON_GetObjectItemCaseSensitive(s, "exclusiveMaximum");
        d = num(s, "minimum", &has);
        if (has && (cJSON_IsTrue(xm) ? !(y > d) : !(y >= d)))
            return 0;
        d = num(s, "maximum", &has);
        if (has && (cJSON_IsTrue(xM) ? !(y < d) : !(y <= d)))
            return 0;
        if (cJSON_IsNumber(xm) && !(y > xm->valuedouble))
            return 0;
        if (cJSON_IsNumber(xM) && !(y < xM->valuedouble))
            return 0;
    }
    if (cJSON_IsArray(v)) {
        int n = cJSON_GetArraySize(v);
        d = num(s, "minItems", &has);
        if (has && n < (int)d)
            return 0;
        d = num(s, "maxItems", &has);
        if (has && n > (int)d)
            return 0;
        if ((x = cJSON_GetObjectItemCaseSensitive(s, "items")) != NULL) {
            cJSON_ArrayForEach(k, v) {
                if (!validate(root, x, k))
                    return 0;
            }
        }
    }
    if (cJSON_IsObject(v)) {
        const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
        const cJSON *add = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
        cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(s, "required")) {
            if (cJSON_GetObjectItemCaseSensitive(v, k->valuestring) == NULL)
                return 0;
        }
        cJSON_ArrayForEach(k, v) {
            const cJSON *ps = cJSON_GetObjectItemCaseSensitive(props, k->string);
            if (ps == NULL && cJSON_IsFalse(add))
                return 0;
            if (ps == NULL && cJSON_IsObject(add))
                ps = add;
            if (ps != NULL && !validate(root, ps, k))
                return 0;
        }
    }
    return 1;
}

/* ---- the schemas ------------------------------------------------------------------------ */

static const char *const schemas[] = {
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":12},"
    "\"age\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":150},\"tags\":{\"type\":\"array\","
    "\"items\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":4},\"maxItems\":3}},"
    "\"required\":[\"name\",\"age\"],\"additionalProperties\":false}",
    "{\"enum\":[\"red\",\"green\",\"blue\",1,12,null,{\"a\":[1,2]}]}",
    "{\"type\":\"array\",\"items\":{\"type\":\"number\",\"exclusiveMinimum\":-2.5,"
    "\"maximum\":3.25},\"minItems\":2,\"maxItems\":5}",
    "{\"anyOf\":[{\"type\":\"object\",\"properties\":{\"kind\":{\"const\":\"circle\"},"
    "\"r\":{\"type\":\"number\",\"minimum\":0}},\"required\":[\"kind\",\"r\"]},"
    "{\"type\":\"object\",\"properties\":{\"kind\":{\"const\":\"rect\"},\"w\":{\"type\":"
    "\"integer\"},\"h\":{\"type\":\"integer\"}},\"required\":[\"kind\",\"w\",\"h\"]}]}",
    "{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\","
    "\"minimum\":100,\"maximum\":105},\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":"
    "\"#/$defs/node\"},\"maxItems\":2}},\"required\":[\"v\"]}},\"$ref\":\"#/$defs/node\"}",
    "{\"type\":[\"string\",\"null\",\"boolean\"],\"minLength\":3}",
    "{\"oneOf\":[{\"type\":\"integer\",\"maximum\":-10},{\"type\":\"string\",\"maxLength\":2}]}",
    "{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
    "{\"type\":\"number\",\"minimum\":0.125,\"maximum\":0.5}",
    "{}",
    NULL,   /* kli_grammar_create's NULL: any object */
    "{\"type\":\"object\",\"properties\":{\"code\":{\"type\":\"string\",\"pattern\":"
    "\"^[A-Z]{2,3}-[0-9]+$\"},\"pet\":{\"pattern\":\"^(cat|dog)s?$\"},\"any\":{\"type\":"
    "\"string\",\"pattern\":\"x\\\\.y\"}},\"required\":[\"code\",\"pet\",\"any\"]}",
};

static struct kli_grammar *
compile(const char *schema)
{
    struct kli_err err = {0};
    struct kli_grammar *g = NULL;

    if (kli_grammar_create(&g, tok, schema, schema != NULL ? strlen(schema) : 0, &err) !=
        KLI_OK)
        diag("%s: %s", schema, err.msg);
    return g;
}

/* ---- cases ------------------------------------------------------------------------------ */

static void
test_refuse(void)
{
    static const struct {
        const char *schema;
        int code;
        const char *msg;
    } t[] = {
        {"{\"type\":\"string\",\"pattern\":\"(?=a)b\"}", KLI_E_UNSUPPORTED, "lookarounds"},
        {"{\"type\":\"string\",\"pattern\":\"(a)\\\\1\"}", KLI_E_UNSUPPORTED, "backreferences"},
        {"{\"type\":\"string\",\"pattern\":\"^a|b$\"}", KLI_E_UNSUPPORTED, "top-level |"},
        {"{\"type\":\"string\",\"pattern\":\"^\\\"$\"}", KLI_E_UNSUPPORTED, "no string"},
        {"{\"type\":\"string\",\"pattern\":\"a\",\"maxLength\":3}", KLI_E_UNSUPPORTED,
         "pattern beside"},
        {"{\"pattern\":\"(ab\"}", KLI_E_UNSUPPORTED, "without its )"},
        {"{\"pattern\":\"a{3,2}\"}", KLI_E_UNSUPPORTED, "out of order"},
        {"{\"pattern\":\"\\u00e9\"}", KLI_E_UNSUPPORTED, "only ASCII"},
        {"{\"pattern\":\"a\\\\q\"}", KLI_E_UNSUPPORTED, "escape"},
        {"{\"properties\":{\"x\":{\"format\":\"date\"}}}", KLI_E_UNSUPPORTED,
         "\"format\" at /properties/x"},
        {"{\"allOf\":[{}]}", KLI_E_UNSUPPORTED, "\"allOf\""},
        {"{\"type\":\"array\",\"items\":[{}]}", KLI_E_UNSUPPORTED, "tuples"},
        {"{\"$ref\":\"http://x/y\"}", KLI_E_UNSUPPORTED, "local references"},
        {"{\"$ref\":\"#/$defs/none\"}", KLI_E_INVALID, "names nothing"},
        {"{\"type\":\"strin\"}", KLI_E_FORMAT, "type at the top level"},
        {"{\"type\":\"string\",\"minLength\":3,\"maxLength\":2}", KLI_E_INVALID, "exceeds"},
        {"{\"type\":\"integer\",\"minimum\":1.2,\"maximum\":1.8}", KLI_E_INVALID,
         "no finite value"},
        {"{\"$defs\":{\"a\":{\"type\":\"object\",\"properties\":{\"a\":{\"$ref\":"
         "\"#/$defs/a\"}},\"required\":[\"a\"]}},\"$ref\":\"#/$defs/a\"}", KLI_E_INVALID,
         "no finite value"},
        {"false", KLI_E_INVALID, "false allows no value"},
        {"{\"type\":\"object\"", KLI_E_FORMAT, "not valid JSON"},
        {"{\"enum\":[1,2],\"minimum\":0}", KLI_E_UNSUPPORTED, "\"minimum\" beside enum"},
        {"{\"required\":[\"q\"],\"additionalProperties\":false}", KLI_E_INVALID,
         "\"q\" is required"},
        {"{\"minItems\":-1}", KLI_E_FORMAT, "minItems at the top level"},
        {"{\"enum\":[\"a\"],\"type\":\"integer\"}", KLI_E_INVALID, "no value of enum"},
    };

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        struct kli_err err = {0};
        struct kli_grammar *g = NULL;
        int rc = kli_grammar_create(&g, tok, t[i].schema, strlen(t[i].schema), &err);
        ok(rc == t[i].code && g == NULL && strstr(err.msg, t[i].msg) != NULL,
           "refuses %s: %s", t[i].schema, err.msg);
    }
}

/* Byte strings fed to the matcher: complete and valid, or refused by some byte. */
static void
test_bytes(void)
{
    static const struct {
        int schema;
        const char *text;
        int valid;
    } t[] = {
        {0, "{\"name\":\"Ann\",\"age\":41}", 1},
        {0, "{\"name\":\"Ann\",\"age\":41,\"tags\":[\"a\",\"bcd\"]}", 1},
        {0, "{\"age\":41,\"name\":\"Ann\"}", 0},              /* declared order */
        {0, "{\"name\":\"Ann\"}", 0},                        /* age required */
        {0, "{\"name\":\"Ann\",\"age\":151}", 0},
        {0, "{\"name\":\"Ann\",\"age\":-1}", 0},
        {0, "{\"name\":\"Ann\",\"age\":01}", 0},
        {0, "{\"name\":\"Ann\",\"age\":4.5}", 0},
        {0, "{\"name\":\"abcdefghijklm\",\"age\":1}", 0},    /* 13 > maxLength */
        {0, "{\"name\":\"\xc3\xa9t\xc3\xa9\",\"age\":1}", 1},
        {0, "{\"name\":\"\xc3\",\"age\":1}", 0},             /* broken UTF-8 */
        {0, "{\"name\":\"a\\\"b\\n\",\"age\":1}", 1},
        {0, "{\"name\":\"a\\x\",\"age\":1}", 0},
        {0, "{\"name\":\"a\",\"age\":1,\"tags\":[\"\"]}", 0},   /* minLength 1 */
        {0, "{\"name\":\"a\",\"age\":1,\"tags\":[\"a\",\"b\",\"c\",\"d\"]}", 0},
        {0, "{\"name\": \"a\",\"age\":1}", 0},             /* compact only */
        {1, "\"green\"", 1},
        {1, "{\"a\":[1,2]}", 1},
        {1, "\"gray\"", 0},
        {2, "[-2.4,3.25]", 1},
        {2, "[-2.5,1]", 0},
        {2, "[3.26,1]", 0},
        {2, "[1]", 0},
        {3, "{\"kind\":\"rect\",\"w\":1,\"h\":2}", 1},
        {3, "{\"kind\":\"circle\",\"r\":0.5}", 1},
        {3, "{\"kind\":\"circle\",\"w\":1}", 0},
        {4, "{\"v\":101,\"kids\":[{\"v\":105},{\"v\":100,\"kids\":[]}]}", 1},
        {4, "{\"v\":106}", 0},
        {4, "{\"v\":10}", 0},
        {5, "\"abc\"", 1},
        {5, "\"ab\"", 0},
        {5, "null", 1},
        {5, "false", 1},
        {6, "-10", 1},
        {6, "-9", 0},
        {6, "\"ab\"", 1},
        {7, "{\"x\":1,\"y\":-2}", 1},
        {7, "{\"x\":\"1\"}", 0},
        {8, "0.125", 1},
        {8, "0.12", 0},
        {8, "0.5", 1},
        {8, "0.51", 0},
        {9, "[{\"a\":[true,null,\"x\",-0.5]},{}]", 1},
        {9, "tru", 0},
        {10, "{\"a\":{\"b\":[1,2,{}]}}", 1},
        {10, "[1]", 0},
        {11, "{\"code\":\"AB-12\",\"pet\":\"dogs\",\"any\":\"_x.y_\"}", 1},
        {11, "{\"code\":\"ABC-0\",\"pet\":\"cat\",\"any\":\"x.y\"}", 1},
        {11, "{\"code\":\"A-12\",\"pet\":\"cat\",\"any\":\"x.y\"}", 0},
        {11, "{\"code\":\"ABCD-1\",\"pet\":\"cat\",\"any\":\"x.y\"}", 0},
        {11, "{\"code\":\"AB-\",\"pet\":\"cat\",\"any\":\"x.y\"}", 0},
        {11, "{\"code\":\"AB-1\",\"pet\":\"cow\",\"any\":\"x.y\"}", 0},
        {11, "{\"code\":\"AB-1\",\"pet\":\"cat\",\"any\":\"xzy\"}", 0},
    };
    struct gr_matcher *m = NULL;
    struct kli_grammar *g[sizeof(schemas) / sizeof(schemas[0])];
    struct kli_err err = {0};

    for (size_t i = 0; i < sizeof(schemas) / sizeof(schemas[0]); i++)
        g[i] = compile(schemas[i]);
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        int fed = -1, st = -2;
        if (g[t[i].schema] != NULL &&
            gr_matcher_create(&m, g[t[i].schema], kli_tokenizer_n_vocab(tok), &err) == KLI_OK) {
            gr_matcher_reset(m, 1000);
            fed = gr_matcher_feed(m, t[i].text, strlen(t[i].text));
            st = gr_matcher_status(m);
            /* a top-level number is complete once it may end */
            if (fed == 0 && st == 0 && gr_matcher_dist(m) == 0)
                st = 1;
        }
        ok(t[i].valid ? fed == 0 && st == 1 : fed != 0 || st != 1,
           "schema %d %s %s", t[i].schema, t[i].valid ? "takes" : "refuses", t[i].text);
        gr_matcher_free(m);
        m = NULL;
    }
    for (size_t i = 0; i < sizeof(schemas) / sizeof(schemas[0]); i++)
        kli_grammar_free(g[i]);
}

/* The mask against its plain twin along random paths, generous and tight budgets. */
static void
test_twin(void)
{
    int32_t nv = kli_tokenizer_n_vocab(tok) + 5;   /* a model's vocabulary may be padded */
    int32_t nw = (nv + 63) / 64;
    uint64_t *plain = tl_calloc((size_t)nw, sizeof(uint64_t));
    struct kli_err err = {0};

    for (size_t i = 0; i < sizeof(schemas) / sizeof(schemas[0]); i++) {
        struct kli_grammar *g = compile(schemas[i]);
        struct gr_matcher *m = NULL;
        int same = 1, steps = 0, walks = 0;
        if (g == NULL || gr_matcher_create(&m, g, nv, &err) != KLI_OK) {
            ok(0, "schema %zu compiles", i);
            kli_grammar_free(g);
            continue;
        }
        for (int budget = 4; budget <= 64 && same; budget *= 4) {
            for (int rep = 0; rep < 3 && same; rep++, walks++) {
                gr_matcher_reset(m, budget);
                while (gr_matcher_status(m) == 0 && same) {
                    const uint64_t *mk = gr_matcher_mask(m);
                    int32_t cnt = 0, pick;
                    gr_matcher_mask_plain(m, plain);
                    int32_t cm = 0;
                    for (int32_t w = 0; w < nw; w++) {
                        same &= (mk != NULL ? mk[w] : 0) == plain[w];
                        cnt += __builtin_popcountll(plain[w]);
                        cm += mk != NULL ? __builtin_popcountll(mk[w]) : 0;
                    }
                    if (!same)
                        diag("budget %d: %d tokens allowed, %d by the plain mask", budget, cm,
                             cnt);
                    if (mk == NULL || cnt == 0)
                        break;
                    pick = (int32_t)(tl_xorshift(&trng) % (uint64_t)cnt);
                    for (int32_t id = 0; id < nv; id++) {
                        if (((plain[id / 64] >> (id % 64)) & 1) && pick-- == 0) {
                            gr_matcher_accept(m, id);
                            break;
                        }
                    }
                    steps++;
                }
            }
        }
        ok(same, "schema %zu: trie mask equals the plain one (%d walks, %d steps)", i, walks,
           steps);
        gr_matcher_free(m);
        kli_grammar_free(g);
    }
    free(plain);
}

/* Generation from random logits through a sampler; the text must validate. */
static void
test_generate(void)
{
    int32_t nv = kli_tokenizer_n_vocab(tok);
    float *logits = tl_malloc((size_t)nv * sizeof(float));
    char *text = tl_malloc(1 << 16);

    for (size_t i = 0; i < sizeof(schemas) / sizeof(schemas[0]); i++) {
        struct kli_grammar *g = compile(schemas[i]);
        cJSON *schema = schemas[i] != NULL ? cJSON_Parse(schemas[i]) :
                        cJSON_Parse("{\"type\":\"object\"}");
        int good = 0, runs = 0, tight_ok = 1;
        for (int run = 0; run < 24 && g != NULL; run++) {
            struct kli_sampler_options so;
            struct kli_sampler *smp = NULL;
            struct kli_err err = {0};
            /* budgets: roomy, then just above what the shortest value needs in bytes */
            int32_t budget = run < 16 ? 200 : (int32_t)(g->nodes[g->root].minlen + run - 16);
            size_t len = 0;
            int ended = 0;
            kli_sampler_options_init(&so);
            so.temperature = 1.0f;
            so.top_p = 1.0f;
            so.seed = tl_xorshift(&trng);
            if (kli_sampler_create(&smp, &so, nv, &err) != KLI_OK ||
                kli_sampler_set_grammar(smp, g, budget, &err) != KLI_OK) {
                diag("%s", err.msg);
                kli_sampler_free(smp);
                break;
            }
            for (int32_t n = 0; n <= budget; n++) {
                for (int32_t k = 0; k < nv; k++)
                    logits[k] = (float)(3.0 * tl_normal(&trng));
                kli_token t = kli_sampler_sample(smp, logits);
                if (t == g->ends[1] || t == g->ends[2]) {
                    ended = 1;
                    break;
                }
                size_t bl;
                const char *b = kli_token_bytes(tok, t, &bl);
                if (b == NULL || len + bl >= (1 << 16))
                    break;
                memcpy(text + len, b, bl);
                len += bl;
            }
            text[len] = '\0';
            cJSON *v = cJSON_ParseWithLength(text, len);
            int valid = ended && v != NULL && kli_sampler_grammar_status(smp) == 1 &&
                        validate(schema, schema, v);
            if (!valid)
                diag("schema %zu budget %d: %s (ended %d)", i, budget, text, ended);
            if (run >= 16)
                tight_ok &= valid;
            good += valid;
            runs++;
            cJSON_Delete(v);
            kli_sampler_free(smp);
        }
        ok(runs == 24 && good == runs, "schema %zu: %d of %d outputs parse and validate (the "
           "last 8 with tight budgets: %s)", i, good, runs, tight_ok ? "all" : "not all");
        cJSON_Delete(schema);
        kli_grammar_free(g);
    }
    free(logits);
    free(text);
}

int
main(int argc, char **argv)
{
    struct kli_err err = {0};
    char dir[4096];

    tap_init(argc, argv);
    if (!tap_listing && kli_tokenizer_open(&tok, tl_path(dir, sizeof(dir), "tokenizer"),
                                           &err) != KLI_OK) {
        printf("Bail out! %s\n", err.msg);
        return 1;
    }
    if (tap_case("refuse"))
        test_refuse();
    if (tap_case("bytes"))
        test_bytes();
    if (tap_case_seeded("twin", &trng, TSEED))
        test_twin();
    if (tap_case_seeded("generate", &trng, TSEED))
        test_generate();
    kli_tokenizer_close(tok);
    plan_done();
    return tap_exit();
}
