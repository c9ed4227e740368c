/*
 * test-toolcall.c - the reader of Kimi's tool-call section (src/cli_toolcall.c, tc_parse)
 * and the constraint of tool_choice (tc_forced_grammar, tc_forced_calls): good sections
 * give the calls and the content around them; every damaged section is named and gives the
 * whole text back as content.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli_toolcall.h"
#include "tap.h"

#define SB TC_SECTION_BEGIN
#define SE TC_SECTION_END
#define CB TC_CALL_BEGIN
#define AB TC_ARG_BEGIN
#define CE TC_CALL_END

static const char decl[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":"
    "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}}}}},"
    "{\"type\":\"function\",\"function\":{\"name\":\"ping\"}}]";

/* Parses text; the result's calls as "id|name|arguments;" into out. */
static int
parse(const char *text, char **content, char *out, size_t cap, char *msg)
{
    cJSON *tools = cJSON_Parse(decl), *calls = NULL, *c;
    int rc = tc_parse(text, strlen(text), tools, content, &calls, msg, 256);

    out[0] = '\0';
    cJSON_ArrayForEach(c, calls) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s|%s|%s;",
                 cJSON_GetObjectItemCaseSensitive(c, "id")->valuestring,
                 cJSON_GetObjectItemCaseSensitive(fn, "name")->valuestring,
                 cJSON_GetObjectItemCaseSensitive(fn, "arguments")->valuestring);
    }
    if (rc == 0 && calls == NULL)
        snprintf(out, cap, "(none)");
    cJSON_Delete(calls);
    cJSON_Delete(tools);
    return rc;
}

static void
test_good(void)
{
    char *content = NULL, out[1024], msg[256];
    int rc;

    rc = parse("Let me look." SB CB "functions.get_weather:0" AB "{\"city\": \"Paris\"}" CE
               CB " functions.ping:1 " AB " {} " CE SE " Done.", &content, out, sizeof(out), msg);
    ok(rc == 0, "two calls parse");
    ok(strcmp(out, "functions.get_weather:0|get_weather|{\"city\": \"Paris\"};"
                   "functions.ping:1|ping|{};") == 0, "their ids, names and arguments: %s", out);
    ok(content != NULL && strcmp(content, "Let me look. Done.") == 0,
       "the content is the text around the section: \"%s\"", content);
    free(content);
    rc = parse("no calls at all", &content, out, sizeof(out), msg);
    ok(rc == 0 && strcmp(out, "(none)") == 0 && strcmp(content, "no calls at all") == 0,
       "text without a section is all content");
    free(content);
    rc = parse(SB CB "ping:0" AB " {\"s\": \"\\u00e9\\n\", \"n\": -0.5e+3, \"t\": [true, false]}\n"
               CE SE, &content, out, sizeof(out), msg);
    ok(rc == 0, "strict JSON arguments with escapes, exponents and literals: %s", msg);
    free(content);
    rc = parse(SB "\n" CB "ping:3" AB "{\"a\":[1,{\"b\":null}]}" CE "\n" SE, &content, out,
               sizeof(out), msg);
    ok(rc == 0 && strcmp(out, "ping:3|ping|{\"a\":[1,{\"b\":null}]};") == 0 &&
       content[0] == '\0', "an id without functions., blanks between calls: %s", out);
    free(content);
}

static void
test_damaged(void)
{
    static const struct {
        const char *text, *why;
    } bad[] = {
        {SB CB "functions.get_weather:0" AB "{\"city\": \"Par", "no " SE},
        {SB CB "functions.get_weather:0" AB "{\"city\": 1" CE SE, "not a JSON object"},
        {SB CB "functions.get_weather:0" AB "[1]" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{\"a\":01}" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{\"a\":+1}" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{\"a\":\"x\ny\"}" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{\"a\"\x14:1}" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{\"a\":\"\\q\"}" CE SE, "not a JSON object"},
        {SB CB "functions.ping:0" AB "{} {}" CE SE, "not a JSON object"},
        {"x" CE, "outside"},
        {SB CB "functions.nope:0" AB "{}" CE SE, "no function \"nope\""},
        {SB CB "get_weather" AB "{}" CE SE, "not functions.NAME:INDEX"},
        {SB CB "functions.ping:x" AB "{}" CE SE, "not functions.NAME:INDEX"},
        {SB CB "functions.ping:0" "{}" CE SE, "has no " AB},
        {SB CB "functions.ping:0" AB "{}" SE, "has no " CE},
        {SB CB "functions.ping:0" AB "{}" CB "functions.ping:1" AB "{}" CE SE, "before the next"},
        {SB SE, "no call"},
        {SB "hello" CB "functions.ping:0" AB "{}" CE SE, "text other than calls"},
        {"x" CB "functions.ping:0" AB "{}" CE, "outside"},
        {SB CB "functions.ping:0" AB "{}" CE SE SB SE, "outside the section"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *content = NULL, out[1024], msg[256] = "";
        int rc = parse(bad[i].text, &content, out, sizeof(out), msg);
        ok(rc == 1 && strstr(msg, bad[i].why) != NULL && out[0] == '\0' &&
           content != NULL && strcmp(content, bad[i].text) == 0,
           "damaged %zu: named (\"%s\") and given back whole", i, msg);
        free(content);
    }
}

static void
test_forced(void)
{
    cJSON *tools = cJSON_Parse(decl), *one = cJSON_Parse(decl), *calls = NULL;
    char *schema = NULL, *prefix = NULL, msg[256];
    const char *forced = NULL;
    int none = 0;

    cJSON_DeleteItemFromArray(one, 1);
    ok(tc_forced_grammar(tools, "get_weather", &schema, &prefix) == 0 &&
       strcmp(prefix, SB CB "functions.get_weather:0" AB) == 0 &&
       strstr(schema, "\"city\"") != NULL, "named: the section's start forced, its schema");
    free(schema);
    free(prefix);
    ok(tc_forced_grammar(one, "", &schema, &prefix) == 0 &&
       strcmp(prefix, SB CB "functions.get_weather:0" AB) == 0,
       "required with one function: as named");
    free(schema);
    free(prefix);
    ok(tc_forced_grammar(tools, "", &schema, &prefix) == 0 && prefix[0] == '\0' &&
       strstr(schema, "\"anyOf\"") != NULL && strstr(schema, "\"const\":\"ping\"") != NULL,
       "required with two: one {name, arguments} object per function");
    free(schema);
    free(prefix);
    ok(tc_forced_calls(tools, "", "{\"name\":\"ping\",\"arguments\":{}}", 30, &calls, msg,
                       sizeof(msg)) == 0 && cJSON_GetArraySize(calls) == 1,
       "a {name, arguments} answer is one call");
    cJSON_Delete(calls);
    /* the arguments as written: an integer past 2^53 stays that integer, not 1.2e+20 */
    const char *big = "{\"name\":\"ping\", \"arguments\" : {\"n\":123456789012345678901,"
                      "\"s\":\"\\u00e9\"}}";
    int rc = tc_forced_calls(tools, "", big, strlen(big), &calls, msg, sizeof(msg));
    const char *a = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(calls, 0), "function"), "arguments"));
    ok(rc == 0 && a != NULL &&
       strcmp(a, "{\"n\":123456789012345678901,\"s\":\"\\u00e9\"}") == 0,
       "required with two: the arguments are the model's text: %s", a != NULL ? a : "(none)");
    cJSON_Delete(calls);
    ok(tc_forced_calls(tools, "ping", "{\"a\":", 5, &calls, msg, sizeof(msg)) == 1 &&
       calls == NULL, "cut-short arguments are named");
    cJSON *c = cJSON_CreateString("required");
    ok(tc_check(tools, c, &forced, &none, msg, sizeof(msg)) == 0 && forced != NULL &&
       forced[0] == '\0', "tool_choice required");
    cJSON_Delete(c);
    c = cJSON_Parse("{\"type\":\"function\",\"function\":{\"name\":\"zz\"}}");
    ok(tc_check(tools, c, &forced, &none, msg, sizeof(msg)) == -1 && strstr(msg, "zz") != NULL,
       "an unknown named function is refused by name: %s", msg);
    cJSON_Delete(c);
    c = cJSON_CreateString("none");
    ok(tc_check(tools, c, &forced, &none, msg, sizeof(msg)) == 0 && none && forced == NULL,
       "tool_choice none");
    cJSON_Delete(c);
    c = cJSON_CreateString("required");
    ok(tc_check(NULL, c, &forced, &none, msg, sizeof(msg)) == -1,
       "required without tools is refused: %s", msg);
    cJSON_Delete(c);
    /* another type of choice (OpenAI's allowed_tools, custom) is not a function's */
    c = cJSON_Parse("{\"type\":\"custom\",\"function\":{\"name\":\"ping\"}}");
    ok(tc_check(tools, c, &forced, &none, msg, sizeof(msg)) == -1,
       "a choice of type custom is refused: %s", msg);
    cJSON_Delete(c);
    c = cJSON_Parse("{\"function\":{\"name\":\"ping\"}}");
    ok(tc_check(tools, c, &forced, &none, msg, sizeof(msg)) == -1,
       "a choice without type is refused: %s", msg);
    cJSON_Delete(c);
    cJSON *two = cJSON_Parse("[{\"type\":\"function\",\"function\":{\"name\":\"f\"}},"
                             "{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]");
    ok(tc_check(two, NULL, &forced, &none, msg, sizeof(msg)) == -1 &&
       strstr(msg, "[1]") != NULL, "a function declared twice is refused: %s", msg);
    cJSON_Delete(two);
    /* names up to TC_NAME_MAX bytes; parameters of type object, or untyped */
    char decl2[512], name[TC_NAME_MAX + 2];
    for (int len = TC_NAME_MAX; len <= TC_NAME_MAX + 1; len++) {
        memset(name, 'n', (size_t)len);
        name[len] = '\0';
        snprintf(decl2, sizeof(decl2), "[{\"type\":\"function\",\"function\":{\"name\":"
                 "\"%s\"}}]", name);
        two = cJSON_Parse(decl2);
        rc = tc_check(two, NULL, &forced, &none, msg, sizeof(msg));
        ok(len == TC_NAME_MAX ? rc == 0 : rc == -1 && strstr(msg, "name") != NULL,
           "a name of %d bytes is %s", len, rc == 0 ? "taken" : msg);
        cJSON_Delete(two);
    }
    static const char *const params[] = {"{\"type\":\"object\"}", "{}",
                                          "{\"type\":\"string\"}", "{\"type\":[\"object\"]}"};
    for (int k = 0; k < 4; k++) {
        snprintf(decl2, sizeof(decl2), "[{\"type\":\"function\",\"function\":{\"name\":"
                 "\"f\",\"parameters\":%s}}]", params[k]);
        two = cJSON_Parse(decl2);
        rc = tc_check(two, NULL, &forced, &none, msg, sizeof(msg));
        ok(k < 2 ? rc == 0 : rc == -1 && strstr(msg, "object") != NULL,
           "parameters %s: %s", params[k], rc == 0 ? "taken" : msg);
        cJSON_Delete(two);
    }
    cJSON_Delete(tools);
    cJSON_Delete(one);
}

/* parallel_tool_calls: true, null or absent keep every call; false keeps the first. */
static void
test_parallel(void)
{
    static const char text[] = SB CB "functions.get_weather:0" AB "{\"city\": \"Oslo\"}" CE
                               CB "functions.ping:1" AB "{}" CE CB "ping:2" AB "{}" CE SE;
    static const char *const good[] = {"true", "null", "false"};
    cJSON *tools = cJSON_Parse(decl);
    char msg[256] = "", *content = NULL;
    int one = -1;

    for (int i = 0; i < 3; i++) {
        cJSON *v = cJSON_Parse(good[i]), *calls = NULL;
        ok(tc_parallel(v, &one, msg, sizeof(msg)) == 0 && one == (i == 2),
           "parallel_tool_calls %s is read", good[i]);
        tc_parse(text, strlen(text), tools, &content, &calls, msg, sizeof(msg));
        if (one)
            tc_keep_first(calls);
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(calls, 0),
                                                           "function");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        ok(cJSON_GetArraySize(calls) == (one ? 1 : 3) && cJSON_IsString(name) &&
           strcmp(name->valuestring, "get_weather") == 0,
           "%s: %d calls, the first first", good[i], cJSON_GetArraySize(calls));
        free(content);
        cJSON_Delete(calls);
        cJSON_Delete(v);
    }
    ok(tc_parallel(NULL, &one, msg, sizeof(msg)) == 0 && one == 0, "absent: every call");
    tc_keep_first(NULL);   /* no calls at all: nothing to drop */
    static const char *const bad[] = {"1", "\"false\"", "[]", "{}"};
    for (int i = 0; i < 4; i++) {
        cJSON *v = cJSON_Parse(bad[i]);
        msg[0] = '\0';
        ok(tc_parallel(v, &one, msg, sizeof(msg)) == -1 &&
           strstr(msg, "parallel_tool_calls") != NULL, "%s is refused: %s", bad[i], msg);
        cJSON_Delete(v);
    }
    cJSON_Delete(tools);
}

/* parallel_tool_calls false ends an answer at the end of its first call when that call is
 * well formed (tc_first_call_end): what was generated, the end and the section's end then
 * parse into exactly the first call of the whole answer. Anything else is never cut. */
static void
test_first_end(void)
{
    static const char whole[] = "Let me see." SB CB "functions.get_weather:0" AB
                                "{\"city\": \"Oslo\"}" CE CB "functions.ping:1" AB "{}" CE SE;
    static const char *const cut[] = {
        SB CB "functions.ping:0" AB "{}",
        "text" SB CB "functions.ping:0" AB "",
        SB CB AB "{\"a\": 1}",
    };
    static const char *const never[] = {
        "", "plain text", SB, SB CB "functions.ping:0", CB "functions.ping:0" AB "{}",
        SB AB "{}", SB AB CB "x", SB CB "x" AB "{}" CE, SB CB "x" AB "{}" SE,
        SB SB CB "x" AB "{}", SB CB CB "x" AB "{}", SB "junk" CE CB "x" AB "{}",
        SB CB "x" AB "{}" CE CB "y" AB "{}", SE SB "" CB "x" AB AB "{}",
    };
    cJSON *tools = cJSON_Parse(decl), *all = NULL, *first = NULL;
    char msg[256] = "", *content = NULL, buf[512];
    const char *ce = strstr(whole, CE);
    size_t n = (size_t)(ce - whole);

    ok(tc_first_call_end(whole, n, CE, strlen(CE)) &&
       !tc_first_call_end(whole, n, AB, strlen(AB)) && !tc_first_call_end(whole, n, "x", 1) &&
       !tc_first_call_end(whole, n, CE, strlen(CE) - 1),
       "the first call's end, and no other token, ends it");
    snprintf(buf, sizeof(buf), "%.*s%s%s", (int)n, whole, CE, SE);
    tc_parse(whole, strlen(whole), tools, &content, &all, msg, sizeof(msg));
    free(content);
    content = NULL;
    tc_parse(buf, strlen(buf), tools, &content, &first, msg, sizeof(msg));
    tc_keep_first(all);
    ok(cJSON_GetArraySize(first) == 1 && cJSON_Compare(first, all, 1) &&
       content != NULL && strcmp(content, "Let me see.") == 0,
       "cut there and closed, the answer is the first call and the text before it");
    free(content);
    cJSON_Delete(all);
    cJSON_Delete(first);
    for (size_t i = 0; i < sizeof(cut) / sizeof(cut[0]); i++)
        ok(tc_first_call_end(cut[i], strlen(cut[i]), CE, strlen(CE)), "cut after %s", cut[i]);
    for (size_t i = 0; i < sizeof(never) / sizeof(never[0]); i++)
        ok(!tc_first_call_end(never[i], strlen(never[i]), CE, strlen(CE)),
           "not cut after '%s'", never[i]);
    ok(!tc_first_call_end(NULL, 0, CE, strlen(CE)) && !tc_first_call_end(whole, n, NULL, 0),
       "nothing yet, or no token: not cut");
    cJSON_Delete(tools);
}

static const struct tap_fn cases[] = {
    {"good", test_good},
    {"damaged", test_damaged},
    {"forced", test_forced},
    {"parallel", test_parallel},
    {"first_end", test_first_end},
};

TAP_MAIN(cases)
