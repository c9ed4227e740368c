/*
 * minimal.c - generating text with libkli: open a model, render a chat prompt, stream the
 * answer. Uses only kli.h. Build: cc minimal.c $(pkg-config --cflags --libs --static kli)
 *
 *   usage: minimal MODEL_DIR [PROMPT]
 */
#include <stdio.h>
#include <string.h>

#include <kli.h>

static int
print_text(void *ud, const char *text, size_t len)
{
    (void)ud;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;   /* non-zero would stop generation */
}

int
main(int argc, char **argv)
{
    struct kli_err err = {0};
    struct kli_model *model = NULL;
    struct kli_session *session = NULL;
    struct kli_sampler *sampler = NULL;
    struct kli_generate_options gen;
    struct kli_generate_result res;
    kli_token ids[4096];
    int rc = 1;

    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [PROMPT]\n", argv[0]);
        return 2;
    }
    struct kli_chat_message msg = {"user", argc > 2 ? argv[2] : "Hello!"};

    if (kli_model_open(&model, argv[1], NULL, &err) != KLI_OK)
        goto out;
    const struct kli_tokenizer *tok = kli_model_tokenizer(model);
    if (tok == NULL) {
        snprintf(err.msg, sizeof(err.msg), "%s has no tokenizer", argv[1]);
        goto out;
    }
    int64_t n = kli_chat_render(tok, &msg, 1, 1, 0, ids, 4096, &err);
    if (n < 0 || n > 4096)
        goto out;
    if (kli_session_create(&session, model, NULL, &err) != KLI_OK ||
        kli_sampler_create(&sampler, NULL, kli_model_n_vocab(model), &err) != KLI_OK)
        goto out;
    kli_generate_options_init(&gen);
    gen.max_tokens = 32;
    gen.on_text = print_text;
    if (kli_generate(session, tok, sampler, ids, (int32_t)n, &gen, &res, &err) != KLI_OK)
        goto out;
    printf("\n[%d prompt tokens, %d generated]\n", res.n_prompt, res.n_generated);
    rc = 0;
out:
    if (rc != 0)
        fprintf(stderr, "minimal: %s\n", err.msg);
    kli_sampler_free(sampler);
    kli_session_free(session);
    kli_model_close(model);
    return rc;
}
