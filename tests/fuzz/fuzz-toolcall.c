/*
 * fuzz-toolcall.c - libFuzzer target for the reader of Kimi's tool-call section
 * (src/cli_toolcall.c, tc_parse).
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER; without KLI_LIBFUZZER a main()
 * replays the files named on the command line. The input is generated text, the special
 * tokens by name; it is read with the declarations of two functions, "get_weather" and
 * "f.x". Besides "no crash", it checks: a malformed section carries a message and gives the
 * whole text back as content; calls come only with a section, each with a declared name,
 * an id of the form functions.NAME:INDEX and arguments that parse as a JSON object; the
 * content of a good section is the text without it.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli_toolcall.h"
#define FUZZ_NAME "fuzz-toolcall"
#include "fuzz.h"

/* Whether s[0..n) holds the NUL-terminated needle. */
static int
has(const uint8_t *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);

    for (size_t i = 0; k <= n && i <= n - k; i++) {
        if (memcmp(s + i, needle, k) == 0)
            return 1;
    }
    return 0;
}

static const char *const markers[] = {TC_SECTION_BEGIN, TC_SECTION_END, TC_CALL_BEGIN,
                                      TC_ARG_BEGIN, TC_CALL_END};

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char decl[] = "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}},"
                               "{\"type\":\"function\",\"function\":{\"name\":\"f.x\"}}]";
    cJSON *tools = cJSON_Parse(decl), *calls = NULL, *c;
    char *content = NULL, msg[256] = "";
    const char *text = (const char *)data;
    int rc = tc_parse(text, size, tools, &content, &calls, msg, sizeof(msg));

    fuzz_check(rc >= 0, "out of memory");
    fuzz_check(content != NULL, "no content");
    if (rc == 1) {
        fuzz_check(msg[0] != '\0' && calls == NULL, "a malformed section without a message");
        fuzz_check(strlen(content) == size || memchr(data, 0, size) != NULL,
                   "a malformed section does not give the text back");
    } else {
        fuzz_check(has(data, size, TC_SECTION_BEGIN) == (calls != NULL), "calls without a section, or a section lost");
        int left = 0;
        for (size_t i = 0; i < sizeof(markers) / sizeof(markers[0]); i++)
            left |= strstr(content, markers[i]) != NULL;
        fuzz_check(!left || memchr(data, 0, size) != NULL, "markers left in the content");
        cJSON_ArrayForEach(c, calls) {
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
            const char *id = cJSON_GetObjectItemCaseSensitive(c, "id")->valuestring;
            const char *nm = cJSON_GetObjectItemCaseSensitive(fn, "name")->valuestring;
            const char *a = cJSON_GetObjectItemCaseSensitive(fn, "arguments")->valuestring;
            cJSON *v = cJSON_Parse(a);
            fuzz_check(strcmp(nm, "get_weather") == 0 || strcmp(nm, "f.x") == 0,
                       "an undeclared function");
            fuzz_check(strstr(id, nm) != NULL && strchr(id, ':') != NULL, "a bad id");
            fuzz_check(cJSON_IsObject(v), "arguments that are not an object");
            cJSON_Delete(v);
        }
    }
    free(content);
    cJSON_Delete(calls);
    cJSON_Delete(tools);
    return 0;
}
