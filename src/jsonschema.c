/*
 * jsonschema.c - a JSON Schema compiled into the nodes that grammar.c's matcher walks.
 *
 * The subset: type (one or a list), properties, required, additionalProperties, enum,
 * const, items (one schema) with minItems/maxItems, minLength/maxLength, minimum, maximum,
 * exclusiveMinimum/exclusiveMaximum (numbers, or draft 4's booleans), anyOf, oneOf (written
 * as anyOf: a value that two branches accept is not prevented) and local $ref ("#..." JSON
 * pointers, into $defs or definitions or anywhere in the document, recursion included).
 * Annotations (title, description, default, examples, $schema, $id, $comment) are ignored;
 * every other keyword is refused, by name and place, rather than silently dropped.
 *
 * What gets written: an object's declared properties in their declared order, each required
 * one present, optional ones chosen by the model; no others (which every additionalProperties
 * allows). An object without properties takes any keys, each value of additionalProperties
 * (any value when it is absent or true). enum and const values are written as their compact
 * JSON (cJSON's), so an enum of 1.0 is written 1.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "grammar.h"
#include "internal.h"

#define SC_MAX_DEPTH 64     /* nesting of schemas (references aside) */
#define SC_MAX_REFS 256     /* distinct references */

struct sc {
    struct kli_grammar *g;
    cJSON *root;
    struct kli_err *err;
    const cJSON *ref_item[SC_MAX_REFS];
    int32_t ref_node[SC_MAX_REFS];
    int n_refs;
    char path[512];         /* the JSON pointer of the schema being compiled */
};

static int32_t sc_node(struct sc *c, const cJSON *s, int depth);

int32_t
gr_node_add(struct kli_grammar *g, int kind)
{
    struct gr_node *p = k_grow(g->nodes, g->n_nodes, &g->cap_nodes, 64, sizeof(*p));

    if (p == NULL)
        return -1;
    g->nodes = p;
    memset(&p[g->n_nodes], 0, sizeof(*p));
    p[g->n_nodes].kind = kind;
    p[g->n_nodes].max_len = -1;
    p[g->n_nodes].minlen = GR_INF;
    return g->n_nodes++;
}

static int
sc_nomem(struct sc *c)
{
    return err_set(c->err, KLI_E_NOMEM, "out of memory");
}

/* A literal: the compact JSON of v, appended to g->lits. @return 0 or a status. */
static int
sc_lit(struct sc *c, const cJSON *v)
{
    struct kli_grammar *g = c->g;
    struct gr_lit *p = k_grow(g->lits, g->n_lits, &g->cap_lits, 16, sizeof(*p));
    char *s;

    if (p == NULL)
        return sc_nomem(c);
    g->lits = p;
    if ((s = cJSON_PrintUnformatted(v)) == NULL)
        return sc_nomem(c);
    p[g->n_lits].s = s;
    p[g->n_lits].len = (int32_t)strlen(s);
    g->n_lits++;
    return 0;
}

/* A literal node of one text ("true", "null"). */
static int32_t
sc_word(struct kli_grammar *g, const char *w)
{
    struct gr_lit *p = k_grow(g->lits, g->n_lits, &g->cap_lits, 16, sizeof(*p));
    int32_t n;

    if (p == NULL)
        return -1;
    g->lits = p;
    if ((p[g->n_lits].s = k_strdup(w)) == NULL || (n = gr_node_add(g, GR_LITERAL)) < 0)
        return -1;
    p[g->n_lits].len = (int32_t)strlen(w);
    g->nodes[n].first = g->n_lits++;
    g->nodes[n].n = 1;
    return n;
}

/* The nodes every grammar starts with (grammar.h, GR_N_*). */
static int
sc_builtins(struct kli_grammar *g)
{
    if (gr_node_add(g, GR_ANY) != GR_N_ANY || gr_node_add(g, GR_STRING) != GR_N_STR ||
        gr_node_add(g, GR_NUMBER) != GR_N_NUM || sc_word(g, "true") != GR_N_TRUE ||
        sc_word(g, "false") != GR_N_FALSE || sc_word(g, "null") != GR_N_NULL ||
        gr_node_add(g, GR_OBJECT) != GR_N_OBJ || gr_node_add(g, GR_ARRAY) != GR_N_ARR)
        return -1;
    g->nodes[GR_N_OBJ].free_keys = 1;
    g->nodes[GR_N_OBJ].child = GR_N_ANY;
    g->nodes[GR_N_ARR].child = GR_N_ANY;
    return 0;
}

static const char *const sc_ignored[] = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
    "definitions",
};

/* Keywords by the type they belong to; "type", "enum", "const", "anyOf", "oneOf" and "$ref"
 * are handled apart. */
static const char *const sc_kw_object[] = {"properties", "required", "additionalProperties"};
static const char *const sc_kw_array[] = {"items", "minItems", "maxItems"};
static const char *const sc_kw_string[] = {"minLength", "maxLength", "pattern"};
static const char *const sc_kw_number[] = {
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
};

static int
sc_in(const char *k, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(k, list[i]) == 0)
            return 1;
    }
    return 0;
}

#define SC_IN(k, list) sc_in(k, list, KLI_ARRAY_LEN(list))

static int
sc_known(const char *k)
{
    static const char *const apart[] = {"type", "enum", "const", "anyOf", "oneOf", "$ref"};

    return SC_IN(k, sc_ignored) || SC_IN(k, sc_kw_object) || SC_IN(k, sc_kw_array) ||
           SC_IN(k, sc_kw_string) || SC_IN(k, sc_kw_number) || SC_IN(k, apart);
}

/* c->path grows by "/key" for the call: sc_push returns the old length for sc_pop. */
static size_t
sc_push(struct sc *c, const char *key)
{
    size_t n = strlen(c->path);

    snprintf(c->path + n, sizeof(c->path) - n, "/%s", key);
    return n;
}

static void
sc_pop(struct sc *c, size_t n)
{
    c->path[n] = '\0';
}

/* The node of sub-schema s, found at `key` (a path piece, "a/b" allowed) of the current one. */
static int32_t
sc_sub(struct sc *c, const char *key, const cJSON *s, int depth)
{
    size_t o = sc_push(c, key);
    int32_t n = sc_node(c, s, depth + 1);

    sc_pop(c, o);
    return n;
}

static const char *
sc_where(const struct sc *c)
{
    return c->path[0] != '\0' ? c->path : "the top level";
}

/* A non-negative integer keyword. @return its value, -1 when absent, -2 after an error. */
static int64_t
sc_count(struct sc *c, const cJSON *s, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, k);

    if (v == NULL)
        return -1;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > 1e6 ||
        v->valuedouble != floor(v->valuedouble)) {
        err_set(c->err, KLI_E_FORMAT, "schema: %s at %s must be an integer in [0, 1000000]",
                k, sc_where(c));
        return -2;
    }
    return (int64_t)v->valuedouble;
}

/* A pair of count keywords, klo <= khi (each -1 when absent). @return 0, or -1 after an
 * error. */
static int
sc_counts(struct sc *c, const cJSON *s, const char *klo, const char *khi, int64_t *lo,
          int64_t *hi)
{
    *lo = sc_count(c, s, klo);
    *hi = sc_count(c, s, khi);
    if (*lo == -2 || *hi == -2)
        return -1;
    if (*hi >= 0 && *lo > *hi) {
        err_set(c->err, KLI_E_INVALID, "schema: %s %lld exceeds %s %lld at %s", klo,
                (long long)*lo, khi, (long long)*hi, sc_where(c));
        return -1;
    }
    return 0;
}

/* A node of `kind` holding lo to hi characters or items (from sc_counts: -1, no bound).
 * @return its index, or -1 after an error. */
static int32_t
sc_sized(struct sc *c, int kind, int64_t lo, int64_t hi)
{
    int32_t i = gr_node_add(c->g, kind);

    if (i < 0)
        return sc_nomem(c), -1;
    c->g->nodes[i].min_len = lo > 0 ? (int32_t)lo : 0;
    c->g->nodes[i].max_len = (int32_t)hi;
    return i;
}

/* A bound: `k` (a number) and its exclusive twin (a number, or draft 4's boolean). */
static int
sc_bound(struct sc *c, const cJSON *s, const char *k, const char *xk, int *has, double *val,
         int *excl)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, k);
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, xk);

    if (v != NULL) {
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return err_set(c->err, KLI_E_FORMAT, "schema: %s at %s must be a number", k,
                           sc_where(c));
        *has = 1;
        *val = v->valuedouble;
    }
    if (x == NULL)
        return 0;
    if (cJSON_IsBool(x)) {
        if (cJSON_IsTrue(x) && v == NULL)
            return err_set(c->err, KLI_E_FORMAT, "schema: %s at %s is true without %s", xk,
                           sc_where(c), k);
        *excl = cJSON_IsTrue(x);
        return 0;
    }
    if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
        return err_set(c->err, KLI_E_FORMAT, "schema: %s at %s must be a number", xk,
                       sc_where(c));
    /* both given: the tighter one counts */
    int lower = k[1] == 'i';   /* "minimum" */
    if (!*has || (lower ? x->valuedouble >= *val : x->valuedouble <= *val)) {
        *has = 1;
        *val = x->valuedouble;
        *excl = 1;
    }
    return 0;
}

static int32_t
sc_number(struct sc *c, const cJSON *s, int integer)
{
    struct gr_node n = {0};
    int32_t i;

    n.kind = GR_NUMBER;
    n.integer = integer;
    if (sc_bound(c, s, "minimum", "exclusiveMinimum", &n.has_min, &n.min, &n.min_excl) < 0 ||
        sc_bound(c, s, "maximum", "exclusiveMaximum", &n.has_max, &n.max, &n.max_excl) < 0)
        return -1;
    if ((i = gr_node_add(c->g, GR_NUMBER)) < 0)
        return sc_nomem(c), -1;
    n.max_len = -1;
    n.minlen = GR_INF;
    c->g->nodes[i] = n;
    return i;
}

static int32_t
sc_string(struct sc *c, const cJSON *s)
{
    int64_t lo, hi;
    int32_t i;

    if (sc_counts(c, s, "minLength", "maxLength", &lo, &hi) != 0)
        return -1;
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(s, "pattern");
    int32_t rx = 0;
    if (pat != NULL) {
        struct kli_grammar *g = c->g;
        char msg[200];
        if (!cJSON_IsString(pat)) {
            err_set(c->err, KLI_E_FORMAT, "schema: pattern at %s must be a string",
                    sc_where(c));
            return -1;
        }
        if (lo >= 0 || hi >= 0) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: pattern beside minLength or maxLength "
                    "at %s is not supported", sc_where(c));
            return -1;
        }
        struct gr_regex *r = k_grow(g->res, g->n_res, &g->cap_res, 4, sizeof(*r));
        if (r == NULL)
            return sc_nomem(c), -1;
        g->res = r;
        if (rx_compile(&r[g->n_res], pat->valuestring, strlen(pat->valuestring), msg,
                       sizeof(msg)) != 0) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: %s (at %s)", msg, sc_where(c));
            return -1;
        }
        rx = ++g->n_res;
    }
    if ((i = sc_sized(c, GR_STRING, lo, hi)) < 0)
        return -1;
    c->g->nodes[i].pattern = rx;
    return i;
}

static int32_t
sc_array(struct sc *c, const cJSON *s, int depth)
{
    int64_t lo, hi;
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    int32_t i, child = GR_N_ANY;

    if (sc_counts(c, s, "minItems", "maxItems", &lo, &hi) != 0)
        return -1;
    if (items != NULL) {
        if (cJSON_IsArray(items)) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: items as an array (tuples) at %s is "
                    "not supported", sc_where(c));
            return -1;
        }
        if ((child = sc_sub(c, "items", items, depth)) < 0)
            return -1;
    }
    if ((i = sc_sized(c, GR_ARRAY, lo, hi)) < 0)
        return -1;
    c->g->nodes[i].child = child;
    return i;
}

/* JSON text of a property name ("name":), malloc'd. */
static char *
sc_key(const char *name)
{
    cJSON *s = cJSON_CreateString(name);
    char *t = s != NULL ? cJSON_PrintUnformatted(s) : NULL, *out = NULL;

    if (t != NULL && (out = k_malloc(strlen(t) + 2)) != NULL)
        snprintf(out, strlen(t) + 2, "%s:", t);
    cJSON_free(t);
    cJSON_Delete(s);
    return out;
}

static int
sc_prop_add(struct sc *c, const char *name, int32_t node, int required)
{
    struct kli_grammar *g = c->g;
    struct gr_prop *p = k_grow(g->props, g->n_props, &g->cap_props, 16, sizeof(*p));

    if (p == NULL)
        return sc_nomem(c);
    g->props = p;
    memset(&p[g->n_props], 0, sizeof(*p));
    if ((p[g->n_props].lit = sc_key(name)) == NULL)
        return sc_nomem(c);
    p[g->n_props].len = (int32_t)strlen(p[g->n_props].lit);
    p[g->n_props].node = node;
    p[g->n_props].required = required;
    g->n_props++;
    return 0;
}

static int
sc_required(const cJSON *req, const char *name)
{
    const cJSON *r;

    cJSON_ArrayForEach(r, req) {
        if (strcmp(r->valuestring, name) == 0)
            return 1;
    }
    return 0;
}

static int32_t
sc_object(struct sc *c, const cJSON *s, int depth)
{
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *add = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    const cJSON *p, *r;
    int32_t nodes[GR_MAX_SET], n = 0, i, child = GR_N_ANY;

    if (props != NULL && !cJSON_IsObject(props)) {
        err_set(c->err, KLI_E_FORMAT, "schema: properties at %s must be an object",
                sc_where(c));
        return -1;
    }
    if (req != NULL) {
        int k = 0;
        if (!cJSON_IsArray(req)) {
            err_set(c->err, KLI_E_FORMAT, "schema: required at %s must be an array",
                    sc_where(c));
            return -1;
        }
        cJSON_ArrayForEach(r, req) {
            if (!cJSON_IsString(r)) {
                err_set(c->err, KLI_E_FORMAT, "schema: required[%d] at %s is not a string",
                        k, sc_where(c));
                return -1;
            }
            k++;
        }
    }
    if (add != NULL && !cJSON_IsBool(add) && !cJSON_IsObject(add)) {
        err_set(c->err, KLI_E_FORMAT, "schema: additionalProperties at %s must be a boolean "
                "or a schema", sc_where(c));
        return -1;
    }
    /* the properties' schemas first (they add nodes), then the property list in one run */
    cJSON_ArrayForEach(p, props) {
        if (n == GR_MAX_SET) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: more than %d properties at %s",
                    GR_MAX_SET, sc_where(c));
            return -1;
        }
        char key[300];
        snprintf(key, sizeof(key), "properties/%s", p->string);
        if ((nodes[n++] = sc_sub(c, key, p, depth)) < 0)
            return -1;
    }
    /* a required name that is not a property: any value, unless none may be added */
    cJSON_ArrayForEach(r, req) {
        if (cJSON_GetObjectItemCaseSensitive(props, r->valuestring) != NULL)
            continue;
        if (cJSON_IsFalse(add)) {
            err_set(c->err, KLI_E_INVALID, "schema: \"%s\" is required at %s but is no "
                    "property and additionalProperties is false", r->valuestring,
                    sc_where(c));
            return -1;
        }
    }
    if (n == 0 && cJSON_IsObject(add)) {
        if ((child = sc_sub(c, "additionalProperties", add, depth)) < 0)
            return -1;
    }
    if ((i = gr_node_add(c->g, GR_OBJECT)) < 0)
        return sc_nomem(c), -1;
    c->g->nodes[i].first = c->g->n_props;
    c->g->nodes[i].child = child;
    c->g->nodes[i].free_keys = n == 0 && req == NULL && !cJSON_IsFalse(add);
    int k = 0;
    cJSON_ArrayForEach(p, props) {
        if (sc_prop_add(c, p->string, nodes[k++], sc_required(req, p->string)) < 0)
            return -1;
    }
    cJSON_ArrayForEach(r, req) {
        if (cJSON_GetObjectItemCaseSensitive(props, r->valuestring) != NULL)
            continue;
        if (c->g->n_props - c->g->nodes[i].first == GR_MAX_SET) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: more than %d properties at %s",
                    GR_MAX_SET, sc_where(c));
            return -1;
        }
        if (sc_prop_add(c, r->valuestring, child, 1) < 0)
            return -1;
    }
    c->g->nodes[i].n = c->g->n_props - c->g->nodes[i].first;
    return i;
}

/* A union of the nodes in alt[0..n). */
static int32_t
sc_union(struct sc *c, const int32_t *alt, int n)
{
    struct kli_grammar *g = c->g;
    int32_t i;

    if (n == 1)
        return alt[0];
    for (int k = 0; k < n; k++) {
        int32_t *p = k_grow(g->alts, g->n_alts, &g->cap_alts, 16, sizeof(*p));
        if (p == NULL)
            return sc_nomem(c), -1;
        g->alts = p;
        p[g->n_alts++] = alt[k];
    }
    if ((i = gr_node_add(g, GR_UNION)) < 0)
        return sc_nomem(c), -1;
    g->nodes[i].first = g->n_alts - n;
    g->nodes[i].n = n;
    return i;
}

static const char *const sc_types[] = {
    "object", "array", "string", "number", "integer", "boolean", "null",
};

/* A value's JSON type, as sc_types names it ("integer" for whole numbers). */
static int
sc_type_of(const cJSON *v, int want_integer)
{
    if (cJSON_IsObject(v))
        return 0;
    if (cJSON_IsArray(v))
        return 1;
    if (cJSON_IsString(v))
        return 2;
    if (cJSON_IsNumber(v))
        return want_integer && v->valuedouble == floor(v->valuedouble) ? 4 : 3;
    if (cJSON_IsBool(v))
        return 5;
    return 6;
}

/* The node of one type for schema s (its keywords of other types are ignored, as JSON
 * Schema does). */
static int32_t
sc_typed(struct sc *c, const cJSON *s, int t, int depth)
{
    switch (t) {
    case 0: return sc_object(c, s, depth);
    case 1: return sc_array(c, s, depth);
    case 2: return sc_string(c, s);
    case 3: return sc_number(c, s, 0);
    case 4: return sc_number(c, s, 1);
    case 5: return sc_union(c, (const int32_t[]){GR_N_TRUE, GR_N_FALSE}, 2);
    default: return GR_N_NULL;
    }
}

/* enum / const: the values of the allowed types (mask bit t of sc_types). */
static int32_t
sc_enum(struct sc *c, const cJSON *s, unsigned types)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *v;
    int32_t first = c->g->n_lits, i;

    if (e != NULL && !cJSON_IsArray(e)) {
        err_set(c->err, KLI_E_FORMAT, "schema: enum at %s must be an array", sc_where(c));
        return -1;
    }
    if (e != NULL && k != NULL) {
        err_set(c->err, KLI_E_UNSUPPORTED, "schema: enum and const together at %s",
                sc_where(c));
        return -1;
    }
    for (v = e != NULL ? e->child : k; v != NULL; v = e != NULL ? v->next : NULL) {
        int t = sc_type_of(v, (types >> 4) & 1);
        if (!((types >> t) & 1) && !(t == 4 && ((types >> 3) & 1)))
            continue;
        if (c->g->n_lits - first == GR_MAX_SET) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: more than %d enum values at %s",
                    GR_MAX_SET, sc_where(c));
            return -1;
        }
        if (sc_lit(c, v) < 0)
            return -1;
    }
    if (c->g->n_lits == first) {
        err_set(c->err, KLI_E_INVALID, "schema: no value of %s at %s has the type asked for",
                e != NULL ? "enum" : "const", sc_where(c));
        return -1;
    }
    if ((i = gr_node_add(c->g, GR_LITERAL)) < 0)
        return sc_nomem(c), -1;
    c->g->nodes[i].first = first;
    c->g->nodes[i].n = c->g->n_lits - first;
    return i;
}

/* A local reference: "#" and a JSON pointer. */
static int32_t
sc_ref(struct sc *c, const cJSON *ref, int depth)
{
    const cJSON *t = c->root;
    const char *p;
    char key[256];

    if (!cJSON_IsString(ref) || ref->valuestring[0] != '#') {
        err_set(c->err, KLI_E_UNSUPPORTED, "schema: $ref at %s: only local references "
                "(\"#/...\") are supported", sc_where(c));
        return -1;
    }
    for (p = ref->valuestring + 1; *p == '/' && t != NULL;) {
        size_t n = 0;
        for (p++; *p != '\0' && *p != '/'; p++) {
            char ch = *p;
            if (ch == '~' && (p[1] == '0' || p[1] == '1'))
                ch = *++p == '0' ? '~' : '/';
            if (n + 1 < sizeof(key))
                key[n++] = ch;
        }
        key[n] = '\0';
        if (cJSON_IsArray(t)) {
            char *end;
            long ix = strtol(key, &end, 10);
            t = *end == '\0' && end != key ? cJSON_GetArrayItem(t, (int)ix) : NULL;
        } else {
            t = cJSON_GetObjectItemCaseSensitive(t, key);
        }
    }
    if (t == NULL || *p != '\0') {
        err_set(c->err, KLI_E_INVALID, "schema: $ref \"%s\" at %s names nothing in the "
                "schema", ref->valuestring, sc_where(c));
        return -1;
    }
    for (int k = 0; k < c->n_refs; k++) {
        if (c->ref_item[k] == t)
            return c->ref_node[k];
    }
    if (c->n_refs == SC_MAX_REFS) {
        err_set(c->err, KLI_E_UNSUPPORTED, "schema: more than %d references", SC_MAX_REFS);
        return -1;
    }
    /* A union of one, filled in after: a reference that reaches itself finds it. */
    int32_t u = gr_node_add(c->g, GR_UNION), *a;
    if (u < 0 || (a = k_grow(c->g->alts, c->g->n_alts, &c->g->cap_alts, 16,
                             sizeof(*a))) == NULL)
        return sc_nomem(c), -1;
    c->g->alts = a;
    int32_t slot = c->g->n_alts++;
    c->g->nodes[u].first = slot;
    c->g->nodes[u].n = 1;
    a[slot] = u;
    c->ref_item[c->n_refs] = t;
    c->ref_node[c->n_refs++] = u;
    char saved[sizeof(c->path)];
    memcpy(saved, c->path, sizeof(saved));
    snprintf(c->path, sizeof(c->path), "%s", ref->valuestring + 1);
    int32_t n = sc_node(c, t, depth + 1);
    memcpy(c->path, saved, sizeof(saved));
    if (n < 0)
        return -1;
    if (n == u) {
        err_set(c->err, KLI_E_INVALID, "schema: $ref \"%s\" at %s refers to itself only",
                ref->valuestring, sc_where(c));
        return -1;
    }
    c->g->alts[slot] = n;
    return u;
}

/* anyOf / oneOf: a union of the branches. */
static int32_t
sc_any_of(struct sc *c, const cJSON *list, const char *k, int depth)
{
    int32_t alt[GR_MAX_SET];
    int n = 0;
    const cJSON *b;

    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) == 0) {
        err_set(c->err, KLI_E_FORMAT, "schema: %s at %s must be a non-empty array", k,
                sc_where(c));
        return -1;
    }
    cJSON_ArrayForEach(b, list) {
        char ix[32];
        if (n == GR_MAX_SET) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: more than %d branches of %s at %s",
                    GR_MAX_SET, k, sc_where(c));
            return -1;
        }
        snprintf(ix, sizeof(ix), "%s/%d", k, n);
        if ((alt[n++] = sc_sub(c, ix, b, depth)) < 0)
            return -1;
    }
    return sc_union(c, alt, n);
}

static int32_t
sc_node(struct sc *c, const cJSON *s, int depth)
{
    const cJSON *k, *type, *ref, *any;
    unsigned types = 0;
    int n_other = 0;
    const char *other = NULL;

    if (depth > SC_MAX_DEPTH) {
        err_set(c->err, KLI_E_UNSUPPORTED, "schema: nested deeper than %d at %s",
                SC_MAX_DEPTH, sc_where(c));
        return -1;
    }
    if (cJSON_IsTrue(s))
        return GR_N_ANY;
    if (!cJSON_IsObject(s)) {
        err_set(c->err, cJSON_IsFalse(s) ? KLI_E_INVALID : KLI_E_FORMAT,
                "schema: %s at %s", cJSON_IsFalse(s) ? "false allows no value" :
                "a schema must be an object or a boolean", sc_where(c));
        return -1;
    }
    cJSON_ArrayForEach(k, s) {
        if (!sc_known(k->string)) {
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: keyword \"%s\" at %s is not "
                    "supported", k->string, sc_where(c));
            return -1;
        }
        if (!SC_IN(k->string, sc_ignored) && strcmp(k->string, "type") != 0) {
            n_other++;
            other = k->string;
        }
    }
    type = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (type != NULL) {
        const cJSON *t;
        for (t = cJSON_IsArray(type) ? type->child : type; t != NULL;
             t = cJSON_IsArray(type) ? t->next : NULL) {
            int f = -1;
            for (int i = 0; cJSON_IsString(t) && i < (int)KLI_ARRAY_LEN(sc_types); i++)
                f = strcmp(t->valuestring, sc_types[i]) == 0 ? i : f;
            if (f < 0) {
                err_set(c->err, KLI_E_FORMAT, "schema: type at %s must be a type name or a "
                        "list of them", sc_where(c));
                return -1;
            }
            types |= 1u << f;
        }
        if (types == 0) {
            err_set(c->err, KLI_E_INVALID, "schema: an empty type list at %s allows no "
                    "value", sc_where(c));
            return -1;
        }
    }
    /* $ref, anyOf, oneOf, enum, const: alone (annotations aside; type too for enums) */
    ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    any = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    if (any == NULL)
        any = cJSON_GetObjectItemCaseSensitive(s, "oneOf");
    int is_enum = cJSON_GetObjectItemCaseSensitive(s, "enum") != NULL ||
                  cJSON_GetObjectItemCaseSensitive(s, "const") != NULL;
    if (ref != NULL || any != NULL || is_enum) {
        const char *what = ref != NULL ? "$ref" : any != NULL ? any->string :
                           cJSON_GetObjectItemCaseSensitive(s, "enum") ? "enum" : "const";
        if (n_other > 1 || (type != NULL && !is_enum)) {
            const cJSON *o = type != NULL && !is_enum ? type : NULL;
            cJSON_ArrayForEach(k, s) {
                if (o == NULL && !SC_IN(k->string, sc_ignored) && strcmp(k->string, what) &&
                    strcmp(k->string, "type"))
                    o = k;
            }
            err_set(c->err, KLI_E_UNSUPPORTED, "schema: keyword \"%s\" beside %s at %s is "
                    "not supported", o->string, what, sc_where(c));
            return -1;
        }
        if (ref != NULL)
            return sc_ref(c, ref, depth);
        if (any != NULL)
            return sc_any_of(c, any, any->string, depth);
        return sc_enum(c, s, types != 0 ? types : 0x7f);
    }
    (void)other;
    if (types == 0) {
        /* no type: the one its keywords belong to, or any value */
        int t = -1;
        cJSON_ArrayForEach(k, s) {
            int kt = SC_IN(k->string, sc_kw_object) ? 0 : SC_IN(k->string, sc_kw_array) ? 1 :
                     SC_IN(k->string, sc_kw_string) ? 2 : SC_IN(k->string, sc_kw_number) ? 3 :
                     -1;
            if (kt >= 0 && t >= 0 && kt != t) {
                err_set(c->err, KLI_E_UNSUPPORTED, "schema: keywords of several types "
                        "without \"type\" at %s (\"%s\")", sc_where(c), k->string);
                return -1;
            }
            t = kt >= 0 ? kt : t;
        }
        if (t < 0)
            return GR_N_ANY;
        types = 1u << t;
    }
    int32_t alt[KLI_ARRAY_LEN(sc_types)];
    int n = 0;
    if ((types & (1u << 3)) && (types & (1u << 4)))
        types &= ~(1u << 4);   /* every integer is a number */
    for (int t = 0; t < (int)KLI_ARRAY_LEN(sc_types); t++) {
        if ((types >> t) & 1) {
            if ((alt[n] = sc_typed(c, s, t, depth)) < 0)
                return -1;
            n++;
        }
    }
    return sc_union(c, alt, n);
}

/* ---- shortest values ------------------------------------------------------------------- */

static int64_t
gr_add(int64_t a, int64_t b)
{
    return a >= GR_INF || b >= GR_INF ? GR_INF : a + b;
}

static int64_t
gr_node_minlen(const struct kli_grammar *g, const struct gr_node *n)
{
    int64_t best = GR_INF, item;

    switch (n->kind) {
    case GR_ANY:
        return 1;
    case GR_STRING:
        return n->pattern ? 2 + (int64_t)g->res[n->pattern - 1].dist[0] : 2 + n->min_len;
    case GR_NUMBER:
        return gr_num_shortest(n);
    case GR_LITERAL:
        for (int32_t i = 0; i < n->n; i++)
            best = g->lits[n->first + i].len < best ? g->lits[n->first + i].len : best;
        return best;
    case GR_UNION:
        for (int32_t i = 0; i < n->n; i++) {
            int64_t m = g->nodes[g->alts[n->first + i]].minlen;
            best = m < best ? m : best;
        }
        return best;
    case GR_ARRAY:
        item = g->nodes[n->child].minlen;
        if (n->min_len == 0)
            return 2;
        if (item >= GR_INF)
            return GR_INF;
        return 1 + (int64_t)n->min_len * (item + 1);
    default:
        if (n->free_keys || n->n == 0)
            return 2;
        /* "{", the first property (the first required one, or the first at all when
           none is required), the required ones after it, "}" */
        for (int32_t i = 0; i < n->n; i++) {
            const struct gr_prop *p = &g->props[n->first + i];
            int64_t m = gr_add(p->len + (int64_t)g->nodes[p->node].minlen,
                               i + 1 < n->n ? p[1].rest : 0);
            best = m < best ? m : best;
            if (p->required)
                break;
        }
        return g->props[n->first].rest == 0 ? 2 : gr_add(best, 2);
    }
}

void
gr_minlen(struct kli_grammar *g)
{
    for (int changed = 1; changed;) {
        changed = 0;
        for (int32_t i = 0; i < g->n_nodes; i++) {
            struct gr_node *n = &g->nodes[i];
            if (n->kind == GR_OBJECT) {
                int64_t rest = 0;
                for (int32_t k = n->n - 1; k >= 0; k--) {
                    struct gr_prop *p = &g->props[n->first + k];
                    if (p->required)
                        rest = gr_add(rest, 1 + p->len + (int64_t)g->nodes[p->node].minlen);
                    if (rest != p->rest)
                        changed = 1;
                    p->rest = rest;
                }
            }
            int64_t m = gr_node_minlen(g, n);
            if (m < GR_INF && m > INT32_MAX / 4)
                m = INT32_MAX / 4;
            if (m < n->minlen) {
                n->minlen = (int32_t)m;
                changed = 1;
            }
        }
    }
}

int
schema_compile(struct kli_grammar *g, const char *text, size_t len, struct kli_err *err)
{
    struct sc *c = k_calloc(1, sizeof(*c));
    int rc = KLI_OK;

    if (c == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    c->g = g;
    c->err = err;
    if (sc_builtins(g) < 0) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    if (text == NULL) {
        g->root = GR_N_OBJ;
        goto out;
    }
    c->root = cJSON_ParseWithLength(text, len);
    if (c->root == NULL) {
        const char *at = cJSON_GetErrorPtr();
        rc = err_set(err, KLI_E_FORMAT, "schema: not valid JSON (near byte %lld)",
                     at != NULL && at >= text && at <= text + len ? (long long)(at - text) :
                     -1LL);
        goto out;
    }
    if ((g->root = sc_node(c, c->root, 0)) < 0) {
        rc = err != NULL && err->code < 0 ? err->code : KLI_E_INVALID;
        goto out;
    }
out:
    if (rc == KLI_OK) {
        gr_minlen(g);
        if (g->nodes[g->root].minlen >= GR_INF)
            rc = err_set(err, KLI_E_INVALID, "schema: no finite value satisfies it (a "
                         "required property or item refers back to itself)");
    }
    cJSON_Delete(c->root);
    free(c);
    return rc;
}
