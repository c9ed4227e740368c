/*
 * cli_oai.c - response_format, logit_bias and the tool messages of an OpenAI request, for kli
 * batch and kli serve (cli_oai.h).
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kli.h"
#include "cli_oai.h"

int
oai_response_format(const cJSON *f, enum oai_format *fmt, char **schema, char *msg, size_t cap)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(f, "type");

    *fmt = OAI_FMT_NONE;
    *schema = NULL;
    if (cJSON_IsNull(f))
        return 0;
    if (!cJSON_IsObject(f) || !cJSON_IsString(type)) {
        snprintf(msg, cap, "\"response_format\" must be an object with a string \"type\"");
        return -1;
    }
    if (strcmp(type->valuestring, "text") == 0) {
        *fmt = OAI_FMT_TEXT;
    } else if (strcmp(type->valuestring, "json_object") == 0) {
        *fmt = OAI_FMT_OBJECT;
    } else if (strcmp(type->valuestring, "json_schema") == 0) {
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(f, "json_schema");
        const cJSON *sc = cJSON_GetObjectItemCaseSensitive(js, "schema");
        if (!cJSON_IsObject(js) || !(cJSON_IsObject(sc) || cJSON_IsBool(sc))) {
            snprintf(msg, cap, "\"response_format\": json_schema needs \"json_schema\": "
                     "{\"schema\": {...}}");
            return -1;
        }
        if ((*schema = cJSON_PrintUnformatted(sc)) == NULL) {
            snprintf(msg, cap, "out of memory");
            return -1;
        }
        *fmt = OAI_FMT_SCHEMA;
    } else {
        snprintf(msg, cap, "\"response_format\": type \"%.64s\" is not supported (text, "
                 "json_object, json_schema)", type->valuestring);
        return -1;
    }
    return 0;
}

int
oai_grammar(struct kli_grammar **out, const struct kli_tokenizer *tok, enum oai_format fmt,
            const char *schema, const char *what, char *msg, size_t cap)
{
    struct kli_err err = {0};
    int rc;

    *out = NULL;
    if (fmt != OAI_FMT_OBJECT && fmt != OAI_FMT_SCHEMA)
        return 0;
    if (fmt == OAI_FMT_OBJECT)
        schema = NULL;
    rc = kli_grammar_create(out, tok, schema, schema != NULL ? strlen(schema) : 0, &err);
    if (rc == KLI_E_NOMEM)
        return -1;
    if (rc != KLI_OK) {
        snprintf(msg, cap, "\"%s\": %s", what != NULL ? what : "response_format", err.msg);
        return 1;
    }
    return 0;
}

int
oai_logit_bias(const cJSON *lb, int32_t n_vocab, kli_token **ids, float **bias, int32_t *n,
               char *msg, size_t cap)
{
    const cJSON *k;
    int32_t count = 0;
    long top = n_vocab > 0 ? (long)n_vocab - 1 : (long)INT32_MAX;

    *ids = NULL;
    *bias = NULL;
    *n = 0;
    if (cJSON_IsNull(lb))
        return 0;
    if (!cJSON_IsObject(lb) || cJSON_GetArraySize(lb) > OAI_MAX_BIAS) {
        snprintf(msg, cap, "\"logit_bias\" must be an object of at most %d \"token id\": bias "
                 "members", OAI_MAX_BIAS);
        return -1;
    }
    *ids = malloc(((size_t)cJSON_GetArraySize(lb) + 1) * sizeof(kli_token));
    *bias = malloc(((size_t)cJSON_GetArraySize(lb) + 1) * sizeof(float));
    if (*ids == NULL || *bias == NULL)
        return -2;
    cJSON_ArrayForEach(k, lb) {
        char *end;
        long id = strtol(k->string, &end, 10);
        /* only the id's decimal digits (strtol also takes " 5", "+5", "-0" and "05"): one
         * key per token, as biases given twice would add up past [-100, 100] */
        size_t nd = strspn(k->string, "0123456789");
        if (nd == 0 || k->string[nd] != '\0' || (k->string[0] == '0' && nd > 1) ||
            end == k->string || *end != '\0' || id < 0 || id > top) {
            snprintf(msg, cap, "\"logit_bias\": \"%.32s\" is not a token id%s", k->string,
                     n_vocab > 0 ? " of the model's vocabulary" : "");
            return -1;
        }
        for (int32_t i = 0; i < count; i++) {
            if ((*ids)[i] == (kli_token)id) {
                snprintf(msg, cap, "\"logit_bias\": token %ld is given twice", id);
                return -1;
            }
        }
        if (!cJSON_IsNumber(k) || !(k->valuedouble >= -100 && k->valuedouble <= 100)) {
            snprintf(msg, cap, "\"logit_bias\": the bias of %ld must be a number in "
                     "[-100, 100]", id);
            return -1;
        }
        (*ids)[count] = (kli_token)id;
        (*bias)[count++] = (float)k->valuedouble;
    }
    *n = count;
    return 0;
}

int
oai_tool_messages(const cJSON *messages)
{
    const cJSON *m;

    if (!cJSON_IsArray(messages))
        return 0;
    cJSON_ArrayForEach(m, messages) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (cJSON_GetObjectItemCaseSensitive(m, "tool_calls") != NULL ||
            cJSON_GetObjectItemCaseSensitive(m, "tool_call_id") != NULL ||
            (cJSON_IsString(role) && strcmp(role->valuestring, "tool") == 0))
            return 1;
    }
    return 0;
}
