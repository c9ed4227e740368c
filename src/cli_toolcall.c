/*
 * cli_toolcall.c - Kimi's tool-call section read into OpenAI tool_calls, and the constraint
 * of tool_choice "required" and a named function (cli_toolcall.h, doc/formats.md 1.7).
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kli.h"
#include "cli_toolcall.h"
#include "util.h"

/* Whether s[0..n) holds one of the five markers. */
static int
tc_any_marker(const char *s, size_t n)
{
    static const char *const mk[] = {TC_SECTION_BEGIN, TC_SECTION_END, TC_CALL_BEGIN,
                                     TC_ARG_BEGIN, TC_CALL_END};

    for (size_t i = 0; i < sizeof(mk) / sizeof(mk[0]); i++) {
        if (util_find(s, n, mk[i]) != NULL)
            return 1;
    }
    return 0;
}

static int
tc_space(char c)
{
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

/* s[0..n) without the blanks around it. */
static void
tc_trim(const char **s, size_t *n)
{
    while (*n > 0 && tc_space(**s)) {
        (*s)++;
        (*n)--;
    }
    while (*n > 0 && tc_space((*s)[*n - 1]))
        (*n)--;
}

/* The declaration of function `name` in tools, or NULL. */
static const cJSON *
tc_tool(const cJSON *tools, const char *name, size_t n)
{
    const cJSON *t;

    cJSON_ArrayForEach(t, tools) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(fn, "name");
        if (cJSON_IsString(nm) && strlen(nm->valuestring) == n &&
            memcmp(nm->valuestring, name, n) == 0)
            return t;
    }
    return NULL;
}

/* Appends {"id", "type": "function", "function": {"name", "arguments"}} to calls.
 * @return 0, or -1 when out of memory. */
static int
tc_add(cJSON *calls, const char *id, size_t idn, const char *name, size_t nn,
       const char *args, size_t an)
{
    cJSON *c = cJSON_CreateObject(), *fn = cJSON_CreateObject();
    char *i = strndup(id, idn), *n = strndup(name, nn), *a = strndup(args, an);
    int rc = -1;

    if (c == NULL || fn == NULL || i == NULL || n == NULL || a == NULL)
        goto out;
    if (cJSON_AddStringToObject(c, "id", i) == NULL ||
        cJSON_AddStringToObject(c, "type", "function") == NULL ||
        cJSON_AddStringToObject(fn, "name", n) == NULL ||
        cJSON_AddStringToObject(fn, "arguments", a) == NULL)
        goto out;
    cJSON_AddItemToObject(c, "function", fn);
    fn = NULL;
    cJSON_AddItemToArray(calls, c);
    c = NULL;
    rc = 0;
out:
    cJSON_Delete(fn);
    cJSON_Delete(c);
    free(i);
    free(n);
    free(a);
    return rc;
}

/* ==== strict JSON: what clients parse (cJSON takes any control byte as a blank, and
 * numbers such as 01 or +1) ====================================================== */

struct tc_js {
    const unsigned char *p, *end;
};

static void
tc_js_blank(struct tc_js *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int
tc_js_digits(struct tc_js *j)
{
    const unsigned char *s = j->p;

    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > s;
}

static int
tc_js_string(struct tc_js *j)
{
    j->p++;   /* the quote */
    while (j->p < j->end && *j->p != '"') {
        if (*j->p < 0x20)
            return 0;
        if (*j->p++ == '\\') {
            if (j->p == j->end)
                return 0;
            if (*j->p == 'u') {
                for (int k = 1; k <= 4; k++) {
                    if (j->p + k >= j->end || !strchr("0123456789abcdefABCDEF", j->p[k]) ||
                        j->p[k] == '\0')
                        return 0;
                }
                j->p += 5;
            } else if (strchr("\"\\/bfnrt", *j->p) != NULL && *j->p != '\0') {
                j->p++;
            } else {
                return 0;
            }
        }
    }
    if (j->p == j->end)
        return 0;
    j->p++;
    return 1;
}

static int
tc_js_value(struct tc_js *j, int depth)
{
    static const char *const lits[] = {"true", "false", "null"};

    tc_js_blank(j);
    if (j->p == j->end || depth > 64)
        return 0;
    if (*j->p == '"')
        return tc_js_string(j);
    if (*j->p == '{' || *j->p == '[') {
        int obj = *j->p++ == '{';
        tc_js_blank(j);
        if (j->p < j->end && *j->p == (obj ? '}' : ']')) {
            j->p++;
            return 1;
        }
        for (;;) {
            if (obj) {
                tc_js_blank(j);
                if (j->p == j->end || *j->p != '"' || !tc_js_string(j))
                    return 0;
                tc_js_blank(j);
                if (j->p == j->end || *j->p++ != ':')
                    return 0;
            }
            if (!tc_js_value(j, depth + 1))
                return 0;
            tc_js_blank(j);
            if (j->p == j->end)
                return 0;
            if (*j->p == ',') {
                j->p++;
                continue;
            }
            return *j->p++ == (obj ? '}' : ']');
        }
    }
    for (size_t i = 0; i < sizeof(lits) / sizeof(lits[0]); i++) {
        size_t k = strlen(lits[i]);
        if ((size_t)(j->end - j->p) >= k && memcmp(j->p, lits[i], k) == 0) {
            j->p += k;
            return 1;
        }
    }
    if (*j->p == '-')
        j->p++;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (!tc_js_digits(j))
        return 0;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!tc_js_digits(j))
            return 0;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!tc_js_digits(j))
            return 0;
    }
    return 1;
}

/* Arguments: a JSON object, whole, as a strict parser (RFC 8259) reads it. */
static int
tc_args_ok(const char *a, size_t n)
{
    struct tc_js j = {(const unsigned char *)a, (const unsigned char *)a + n};

    tc_js_blank(&j);
    if (j.p == j.end || *j.p != '{' || !tc_js_value(&j, 0))
        return 0;
    tc_js_blank(&j);
    return j.p == j.end;
}

/* The value of member `key` of the JSON object s[0..n) as it is written there (*vn bytes), or
 * NULL. */
static const char *
tc_member(const char *s, size_t n, const char *key, size_t *vn)
{
    struct tc_js j = {(const unsigned char *)s, (const unsigned char *)s + n};
    size_t kn = strlen(key);

    tc_js_blank(&j);
    if (j.p == j.end || *j.p++ != '{')
        return NULL;
    for (;;) {
        tc_js_blank(&j);
        if (j.p == j.end || *j.p != '"')
            return NULL;
        const unsigned char *k = j.p + 1, *v;
        if (!tc_js_string(&j))
            return NULL;
        int match = (size_t)(j.p - 1 - k) == kn && memcmp(k, key, kn) == 0;
        tc_js_blank(&j);
        if (j.p == j.end || *j.p++ != ':')
            return NULL;
        tc_js_blank(&j);
        v = j.p;
        if (!tc_js_value(&j, 1))
            return NULL;
        if (match) {
            *vn = (size_t)(j.p - v);
            return (const char *)v;
        }
        tc_js_blank(&j);
        if (j.p == j.end || *j.p++ != ',')
            return NULL;
    }
}

/* One call: [functions.]NAME:IDX<|tool_call_argument_begin|>JSON, between the call markers
 * (s[0..n)). @return 0, 1 (msg set) or -1. */
static int
tc_call(const char *s, size_t n, const cJSON *tools, cJSON *calls, int k, char *msg, size_t cap)
{
    const char *arg = util_find(s, n, TC_ARG_BEGIN);
    const char *id = s, *name, *colon = NULL, *a;
    size_t idn, nn, an;

    if (arg == NULL) {
        snprintf(msg, cap, "call %d has no %s", k, TC_ARG_BEGIN);
        return 1;
    }
    idn = (size_t)(arg - s);
    tc_trim(&id, &idn);
    a = arg + strlen(TC_ARG_BEGIN);
    an = (size_t)(s + n - a);
    tc_trim(&a, &an);
    if (util_find(a, an, TC_ARG_BEGIN) != NULL) {
        snprintf(msg, cap, "call %d has two %s", k, TC_ARG_BEGIN);
        return 1;
    }
    for (size_t i = idn; i > 0; i--) {
        if (id[i - 1] == ':') {
            colon = id + i - 1;
            break;
        }
    }
    name = id;
    if (idn > 10 && memcmp(id, "functions.", 10) == 0)
        name = id + 10;
    nn = colon != NULL && colon > name ? (size_t)(colon - name) : 0;
    int digits = colon != NULL && colon + 1 < id + idn;
    for (const char *p = colon != NULL ? colon + 1 : id; digits && p < id + idn; p++)
        digits = *p >= '0' && *p <= '9';
    if (nn == 0 || !digits) {
        snprintf(msg, cap, "call %d: the id \"%.*s\" is not functions.NAME:INDEX", k,
                 (int)(idn > 64 ? 64 : idn), id);
        return 1;
    }
    for (size_t i = 0; i < idn; i++) {
        if ((unsigned char)id[i] < 0x20) {
            snprintf(msg, cap, "call %d: a control character in its id", k);
            return 1;
        }
    }
    if (tools != NULL && tc_tool(tools, name, nn) == NULL) {
        snprintf(msg, cap, "call %d: no function \"%.*s\" is declared", k,
                 (int)(nn > 64 ? 64 : nn), name);
        return 1;
    }
    if (!tc_args_ok(a, an)) {
        snprintf(msg, cap, "call %d (%.*s): the arguments are not a JSON object", k,
                 (int)(nn > 64 ? 64 : nn), name);
        return 1;
    }
    return tc_add(calls, id, idn, name, nn, a, an);
}

/* The calls between the section markers (s[0..n)). @return 0, 1 (msg set) or -1. */
static int
tc_section(const char *s, size_t n, const cJSON *tools, cJSON *calls, char *msg, size_t cap)
{
    size_t cb = strlen(TC_CALL_BEGIN), ce = strlen(TC_CALL_END);
    int k = 0, rc;

    for (;;) {
        const char *p = s;
        size_t m = n;
        tc_trim(&p, &m);
        if (m == 0)
            break;
        if (m < cb || memcmp(p, TC_CALL_BEGIN, cb) != 0) {
            snprintf(msg, cap, "text other than calls in the section (call %d)", k);
            return 1;
        }
        const char *e = util_find(p + cb, m - cb, TC_CALL_END);
        if (e == NULL) {
            snprintf(msg, cap, "call %d has no %s", k, TC_CALL_END);
            return 1;
        }
        if (util_find(p + cb, (size_t)(e - p - cb), TC_CALL_BEGIN) != NULL) {
            snprintf(msg, cap, "call %d has no %s before the next call", k, TC_CALL_END);
            return 1;
        }
        if ((rc = tc_call(p + cb, (size_t)(e - p - cb), tools, calls, k, msg, cap)) != 0)
            return rc;
        k++;
        n = (size_t)(p + m - (e + ce));
        s = e + ce;
    }
    if (k == 0) {
        snprintf(msg, cap, "the section holds no call");
        return 1;
    }
    return 0;
}

int
tc_parse(const char *text, size_t len, const cJSON *tools, char **content, cJSON **calls,
         char *msg, size_t cap)
{
    const char *b = util_find(text, len, TC_SECTION_BEGIN), *e = NULL;
    size_t sb = strlen(TC_SECTION_BEGIN), se = strlen(TC_SECTION_END);
    cJSON *list = NULL;
    int rc;

    *calls = NULL;
    *content = NULL;
    if (b == NULL) {
        if (tc_any_marker(text, len)) {
            snprintf(msg, cap, "tool-call markers outside a %s", TC_SECTION_BEGIN);
            rc = 1;
            goto whole;
        }
        return (*content = strndup(text, len)) != NULL ? 0 : -1;
    }
    e = util_find(b + sb, (size_t)(text + len - b - sb), TC_SECTION_END);
    if (e == NULL) {
        snprintf(msg, cap, "the section has no %s", TC_SECTION_END);
        rc = 1;
        goto whole;
    }
    if (tc_any_marker(e + se, (size_t)(text + len - e - se)) ||
        tc_any_marker(text, (size_t)(b - text))) {
        snprintf(msg, cap, "tool-call markers outside the section");
        rc = 1;
        goto whole;
    }
    if ((list = cJSON_CreateArray()) == NULL)
        return -1;
    rc = tc_section(b + sb, (size_t)(e - b - sb), tools, list, msg, cap);
    if (rc != 0) {
        cJSON_Delete(list);
        if (rc < 0)
            return -1;
        goto whole;
    }
    /* the content: the text before the section and after it */
    size_t before = (size_t)(b - text), after = (size_t)(text + len - e - se);
    if ((*content = malloc(before + after + 1)) == NULL) {
        cJSON_Delete(list);
        return -1;
    }
    memcpy(*content, text, before);
    memcpy(*content + before, e + se, after);
    (*content)[before + after] = '\0';
    *calls = list;
    return 0;
whole:
    return (*content = strndup(text, len)) != NULL ? rc : -1;
}

/* The name of a declaration that tc_check took. */
static const char *
tc_name(const cJSON *tool)
{
    return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(tool, "function"),
                                            "name")->valuestring;
}

int
tc_check(const cJSON *tools, const cJSON *choice, const char **forced, int *none, char *msg,
         size_t cap)
{
    const cJSON *t;
    int i = 0;

    *forced = NULL;
    *none = 0;
    if (tools != NULL && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools)) {
            snprintf(msg, cap, "\"tools\" must be a list");
            return -1;
        }
        cJSON_ArrayForEach(t, tools) {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(t, "type");
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(fn, "name");
            const cJSON *pa = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
            if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "function") != 0 ||
                !cJSON_IsString(nm) || nm->valuestring[0] == '\0' ||
                strpbrk(nm->valuestring, ":<>\n") != NULL) {
                snprintf(msg, cap, "\"tools\"[%d] must be {\"type\": \"function\", "
                         "\"function\": {\"name\": NAME}} with a name without ':', '<', '>'", i);
                return -1;
            }
            if (strlen(nm->valuestring) > TC_NAME_MAX) {
                snprintf(msg, cap, "\"tools\"[%d]: a function name of more than %d bytes", i,
                         TC_NAME_MAX);
                return -1;
            }
            if (pa != NULL && !cJSON_IsObject(pa)) {
                snprintf(msg, cap, "\"tools\"[%d]: \"parameters\" must be a JSON Schema "
                         "object", i);
                return -1;
            }
            /* the arguments of a call are a JSON object: a schema of another type could
             * never be met */
            const cJSON *pt = cJSON_GetObjectItemCaseSensitive(pa, "type");
            if (pt != NULL && !(cJSON_IsString(pt) && strcmp(pt->valuestring, "object") == 0)) {
                snprintf(msg, cap, "\"tools\"[%d]: \"parameters\" must have \"type\": "
                         "\"object\" (the arguments are a JSON object)", i);
                return -1;
            }
            /* a call names its function: two of one name could not be told apart */
            for (const cJSON *u = tools->child; u != t; u = u->next) {
                if (strcmp(tc_name(u), nm->valuestring) == 0) {
                    snprintf(msg, cap, "\"tools\"[%d]: a second function \"%.64s\"", i,
                             nm->valuestring);
                    return -1;
                }
            }
            i++;
        }
    }
    if (choice == NULL || cJSON_IsNull(choice) ||
        (cJSON_IsString(choice) && strcmp(choice->valuestring, "auto") == 0))
        return 0;
    if (cJSON_IsString(choice) && strcmp(choice->valuestring, "none") == 0) {
        *none = 1;
        return 0;
    }
    if (i == 0) {
        snprintf(msg, cap, "\"tool_choice\" other than \"auto\" and \"none\" needs \"tools\"");
        return -1;
    }
    if (cJSON_IsString(choice) && strcmp(choice->valuestring, "required") == 0) {
        *forced = "";
        return 0;
    }
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(choice, "function");
    const cJSON *nm = cJSON_GetObjectItemCaseSensitive(fn, "name");
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(choice, "type");
    if (!cJSON_IsObject(choice) || !cJSON_IsString(nm) || !cJSON_IsString(ty) ||
        strcmp(ty->valuestring, "function") != 0) {
        snprintf(msg, cap, "\"tool_choice\" must be \"auto\", \"none\", \"required\" or "
                 "{\"type\": \"function\", \"function\": {\"name\": NAME}}");
        return -1;
    }
    if (tc_tool(tools, nm->valuestring, strlen(nm->valuestring)) == NULL) {
        snprintf(msg, cap, "\"tool_choice\": no function \"%.64s\" in \"tools\"",
                 nm->valuestring);
        return -1;
    }
    *forced = nm->valuestring;
    return 0;
}

/* The parameters schema of a declaration (a new cJSON object; an empty object's schema when
 * it has none). One without "type" gets "type": "object": kli's schemas take the type of their
 * keywords, and {} (or annotations alone) allows any value, where arguments are an object.
 * @return it, or NULL when out of memory or the parameters are not an object. */
static cJSON *
tc_params(const cJSON *tool)
{
    static const char *const typed[] = {"type", "anyOf", "oneOf", "$ref", "enum", "const"};
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tool, "function");
    const cJSON *pa = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
    cJSON *o;

    if (pa != NULL && !cJSON_IsObject(pa))
        return NULL;
    if ((o = pa != NULL ? cJSON_Duplicate(pa, 1) : cJSON_CreateObject()) == NULL)
        return NULL;
    for (size_t i = 0; pa != NULL && i < sizeof(typed) / sizeof(typed[0]); i++) {
        if (cJSON_HasObjectItem(pa, typed[i]))
            return o;
    }
    if (cJSON_AddStringToObject(o, "type", "object") == NULL) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* The one function a forced call goes to: the named one, or the only one; NULL: several. */
static const cJSON *
tc_single(const cJSON *tools, const char *forced)
{
    if (forced != NULL && forced[0] != '\0')
        return tc_tool(tools, forced, strlen(forced));
    return cJSON_GetArraySize(tools) == 1 ? cJSON_GetArrayItem(tools, 0) : NULL;
}

int
tc_forced_grammar(const cJSON *tools, const char *forced, char **schema, char **prefix)
{
    const cJSON *one = tc_single(tools, forced), *t;
    cJSON *any = NULL, *root = NULL;

    *schema = NULL;
    *prefix = NULL;
    if (one != NULL) {
        const char *name = tc_name(one);
        size_t n = strlen(TC_SECTION_BEGIN TC_CALL_BEGIN TC_ARG_BEGIN) + strlen(name) + 16;
        cJSON *pa = tc_params(one);
        *schema = pa != NULL ? cJSON_PrintUnformatted(pa) : NULL;
        cJSON_Delete(pa);
        if (*schema == NULL || (*prefix = malloc(n)) == NULL)
            goto fail;
        snprintf(*prefix, n, "%s%sfunctions.%s:0%s", TC_SECTION_BEGIN, TC_CALL_BEGIN, name,
                 TC_ARG_BEGIN);
        return 0;
    }
    if ((root = cJSON_CreateObject()) == NULL || (any = cJSON_AddArrayToObject(root, "anyOf"))
        == NULL || (*prefix = strdup("")) == NULL)
        goto fail;
    cJSON_ArrayForEach(t, tools) {
        cJSON *alt = cJSON_CreateObject(), *props, *nm, *req, *pa = tc_params(t);
        if (alt == NULL || pa == NULL) {
            cJSON_Delete(alt);
            cJSON_Delete(pa);
            goto fail;
        }
        cJSON_AddItemToArray(any, alt);
        if (cJSON_AddStringToObject(alt, "type", "object") == NULL ||
            (props = cJSON_AddObjectToObject(alt, "properties")) == NULL ||
            (nm = cJSON_AddObjectToObject(props, "name")) == NULL ||
            cJSON_AddStringToObject(nm, "const", tc_name(t)) == NULL ||
            (req = cJSON_CreateStringArray((const char *[]){"name", "arguments"}, 2)) == NULL) {
            cJSON_Delete(pa);
            goto fail;
        }
        cJSON_AddItemToObject(props, "arguments", pa);
        cJSON_AddItemToObject(alt, "required", req);
        if (cJSON_AddFalseToObject(alt, "additionalProperties") == NULL)
            goto fail;
    }
    if ((*schema = cJSON_PrintUnformatted(root)) == NULL)
        goto fail;
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    free(*schema);
    free(*prefix);
    *schema = NULL;
    *prefix = NULL;
    return -1;
}

int
tc_forced_calls(const cJSON *tools, const char *forced, const char *text, size_t len,
                cJSON **calls, char *msg, size_t cap)
{
    const cJSON *one = tc_single(tools, forced);
    cJSON *v = NULL;
    char id[300];
    int rc = 1;

    *calls = NULL;
    if ((*calls = cJSON_CreateArray()) == NULL)
        return -1;
    if (one != NULL) {
        if (!tc_args_ok(text, len)) {
            snprintf(msg, cap, "the arguments are not a complete JSON object");
            goto fail;
        }
        snprintf(id, sizeof(id), "functions.%.256s:0", tc_name(one));
        if (tc_add(*calls, id, strlen(id), tc_name(one), strlen(tc_name(one)), text, len) != 0)
            goto oom;
        return 0;
    }
    v = cJSON_ParseWithLength(text, len);
    const cJSON *nm = cJSON_GetObjectItemCaseSensitive(v, "name");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(v, "arguments");
    if (!cJSON_IsString(nm) || !cJSON_IsObject(args) ||
        tc_tool(tools, nm->valuestring, strlen(nm->valuestring)) == NULL) {
        snprintf(msg, cap, "the call is not a complete {\"name\", \"arguments\"} object");
        goto fail;
    }
    /* the arguments as the model wrote them: cJSON's doubles would print an integer past
     * 2^53 rounded, in e-notation, no longer the integer its schema asked for */
    size_t an = 0;
    const char *raw = tc_member(text, len, "arguments", &an);
    char *a = raw != NULL && tc_args_ok(raw, an) ? strndup(raw, an)
                                                 : cJSON_PrintUnformatted(args);
    snprintf(id, sizeof(id), "functions.%.256s:0", nm->valuestring);
    if (a == NULL || tc_add(*calls, id, strlen(id), nm->valuestring, strlen(nm->valuestring),
                            a, strlen(a)) != 0) {
        free(a);
        goto oom;
    }
    free(a);
    cJSON_Delete(v);
    return 0;
oom:
    rc = -1;
fail:
    cJSON_Delete(v);
    cJSON_Delete(*calls);
    *calls = NULL;
    return rc;
}

/* s with each invalid UTF-8 sequence replaced by U+FFFD (malloc'd), or NULL. */
static char *
tc_clean(const char *s, int (*seq)(const unsigned char *, size_t))
{
    size_t n = strlen(s), o = 0;
    char *r = malloc(n * 3 + 1);

    if (r == NULL)
        return NULL;
    for (size_t i = 0; i < n;) {
        int k = seq((const unsigned char *)s + i, n - i);
        if (k > 0) {
            memcpy(r + o, s + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(r + o, "\xef\xbf\xbd", 3);
            o += 3;
            i += (size_t)-k;
        }
    }
    r[o] = '\0';
    return r;
}

int
tc_utf8(char **content, cJSON *calls, int (*seq)(const unsigned char *, size_t))
{
    cJSON *c;
    char *t = tc_clean(*content, seq);

    if (t == NULL)
        return -1;
    free(*content);
    *content = t;
    cJSON_ArrayForEach(c, calls) {
        cJSON *a = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(c,
                                                    "function"), "arguments");
        if ((t = tc_clean(a->valuestring, seq)) == NULL)
            return -1;
        if (cJSON_SetValuestring(a, t) == NULL) {
            free(t);
            return -1;
        }
        free(t);
    }
    return 0;
}

int
tc_parallel(const cJSON *v, int *one, char *msg, size_t cap)
{
    *one = 0;
    if (v == NULL || cJSON_IsNull(v) || cJSON_IsTrue(v))
        return 0;
    if (cJSON_IsFalse(v)) {
        *one = 1;
        return 0;
    }
    snprintf(msg, cap, "\"parallel_tool_calls\" must be true or false");
    return -1;
}

void
tc_keep_first(cJSON *calls)
{
    while (cJSON_GetArraySize(calls) > 1)
        cJSON_DeleteItemFromArray(calls, cJSON_GetArraySize(calls) - 1);
}

int
tc_answer(const char *text, size_t n, const char *const *stop, int n_stop, const cJSON *tools,
          const char *forced, char **content, cJSON **calls, char *msg, size_t cap,
          int (*seq)(const unsigned char *, size_t))
{
    int rc;

    *content = NULL;
    *calls = NULL;
    for (int i = 0; i < n_stop; i++) {
        const char *st = util_find(text, n, stop[i]);
        if (st != NULL)
            n = (size_t)(st - text);
    }
    if (forced != NULL) {
        rc = tc_forced_calls(tools, forced, text, n, calls, msg, cap);
        if (rc >= 0 && (*content = rc == 1 ? strndup(text, n) : strdup("")) == NULL)
            rc = -1;
    } else {
        rc = tc_parse(text, n, tools, content, calls, msg, cap);
    }
    if (rc >= 0 && tc_utf8(content, *calls, seq) != 0)
        rc = -1;
    if (rc < 0) {
        free(*content);
        cJSON_Delete(*calls);
        *content = NULL;
        *calls = NULL;
    }
    return rc;
}

int64_t
tc_render(const struct kli_tokenizer *tok, const cJSON *messages, const cJSON *tools,
          const char *prefix, int cont, kli_token **ids, struct kli_err *err)
{
    char *msgs = cJSON_PrintUnformatted(messages);
    char *tl = tools != NULL ? cJSON_PrintUnformatted(tools) : NULL;
    size_t pl = prefix != NULL ? strlen(prefix) : 0, tn = tl != NULL ? strlen(tl) : 0;
    int64_t n = KLI_E_NOMEM, np = 0, off = cont ? 1 : 0;
    kli_token end = cont ? kli_tokenizer_find_special(tok, "<|im_end|>") : 0;

    *ids = NULL;
    if (msgs == NULL || (tools != NULL && tl == NULL)) {
        snprintf(err->msg, sizeof(err->msg), "out of memory");
        goto out;
    }
    if (end < 0) {
        n = KLI_E_UNSUPPORTED;
        snprintf(err->msg, sizeof(err->msg), "the tokenizer has no <|im_end|>");
        goto out;
    }
    n = kli_chat_render_json(tok, msgs, strlen(msgs), tl, tn, 1, cont, NULL, 0, err);
    if (n < 0)
        goto out;
    if ((*ids = malloc(((size_t)(n + off) + pl + 1) * sizeof(kli_token))) == NULL) {
        snprintf(err->msg, sizeof(err->msg), "out of memory");
        n = KLI_E_NOMEM;
        goto out;
    }
    if (cont)
        (*ids)[0] = end;
    n = kli_chat_render_json(tok, msgs, strlen(msgs), tl, tn, 1, cont, *ids + off, n, err);
    if (n >= 0 && pl > 0)
        np = kli_tokenize(tok, prefix, pl, KLI_TOKENIZE_SPECIAL, *ids + off + n,
                          (int64_t)pl + 1, err);
    n = n < 0 ? n : np < 0 ? np : off + n + np;
out:
    if (n < 0) {
        free(*ids);
        *ids = NULL;
        err->code = (int)n;
    }
    free(msgs);
    free(tl);
    return n;
}

cJSON *
tc_messages(const char *system, const char *user)
{
    cJSON *arr = cJSON_CreateArray(), *m;

    for (int i = 0; arr != NULL && i < 2; i++) {
        const char *text = i == 0 ? system : user;
        if (text == NULL)
            continue;
        if ((m = cJSON_CreateObject()) == NULL) {
            cJSON_Delete(arr);
            return NULL;
        }
        cJSON_AddItemToArray(arr, m);
        if (cJSON_AddStringToObject(m, "role", i == 0 ? "system" : "user") == NULL ||
            cJSON_AddStringToObject(m, "content", text) == NULL) {
            cJSON_Delete(arr);
            return NULL;
        }
    }
    return arr;
}

/* Whether a[0..n) holds no marker (every one begins so). */
static int
tc_no_marker(const char *a, size_t n)
{
    return util_find(a, n, "<|tool_call") == NULL;
}

int
tc_first_call_end(const char *acc, size_t n, const char *tok, size_t len)
{
    const char *end = acc + n, *sb, *cb, *ab;
    size_t lsb = strlen(TC_SECTION_BEGIN), lcb = strlen(TC_CALL_BEGIN);

    /* acc = CONTENT SECTION_BEGIN CALL_BEGIN ID ARG_BEGIN ARGS, and no other marker after
     * the section's begin: then this end closes a well-formed first call. Anything else is
     * left to the parser whole. */
    if (tok == NULL || len != strlen(TC_CALL_END) || memcmp(tok, TC_CALL_END, len) != 0 ||
        acc == NULL || (sb = util_find(acc, n, TC_SECTION_BEGIN)) == NULL ||
        (cb = util_find(sb + lsb, (size_t)(end - sb - lsb), TC_CALL_BEGIN)) == NULL ||
        !tc_no_marker(sb + lsb, (size_t)(cb - sb - lsb)) ||
        (ab = util_find(cb + lcb, (size_t)(end - cb - lcb), TC_ARG_BEGIN)) == NULL ||
        !tc_no_marker(cb + lcb, (size_t)(ab - cb - lcb)))
        return 0;
    return tc_no_marker(ab + strlen(TC_ARG_BEGIN), (size_t)(end - ab - strlen(TC_ARG_BEGIN)));
}

int
tc_marker(const char *name, size_t len)
{
    return name != NULL && len > 11 && memcmp(name, "<|tool_call", 11) == 0;
}
