/*
 * test-xcache.c - edge mode (kli_model_options.mem_budget, src/xcache.c) on the tiny model:
 * logits bit-identical to the resident run for budgets from the least one up to every
 * expert, fed in one call, token by token and in chunks, from the directory and from a
 * .kli; the counters add up (every expert asked for is a hit or a read; a cache that holds
 * every expert hits on a second pass); a budget below the least is refused with the least
 * in the message; load-time conversion and --numa placement are refused; a damaged expert
 * in a .kli is named when first read, leaves the session broken (eval and snapshot refuse)
 * until it is reset, and other experts keep working; two threads driving two sessions of
 * one edge-mode model at once get the logits each gets alone.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"
#include "weights.h"

#define N_IDS 60

static kli_token ids[N_IDS];

/* Logits of ids fed in pieces of `chunk` (0: one call). NULL on failure (err filled). */
static float *
run(const char *path, uint64_t budget, int chunk, struct kli_cache_stats *st,
    struct kli_err *err)
{
    struct kli_model *m = NULL;
    struct kli_model_options mo;
    float *out = NULL;

    kli_model_options_init(&mo);
    mo.mem_budget = budget;
    mo.gpu = KLI_GPU_OFF;   /* with a GPU the resident run would compute hot experts there */
    memset(err, 0, sizeof(*err));
    if (kli_model_open(&m, path, &mo, err) == KLI_OK)
        out = tl_logits(m, ids, N_IDS, chunk, err);
    if (out != NULL && st != NULL)
        kli_model_cache_stats(m, st);
    kli_model_close(m);
    return out;
}

static int
same(const float *a, const float *b, int32_t V)
{
    return a != NULL && b != NULL &&
           memcmp(a, b, (size_t)N_IDS * (size_t)V * sizeof(float)) == 0;
}

static uint64_t
least_budget(const char *path)
{
    struct kli_model *m = NULL;
    struct kli_model_options mo;
    struct kli_err err = {0};
    uint64_t least = 0;

    /* Ask with a budget of 1 byte: the refusal names the least, and so does kli info; here
     * the least comes from the message so the test reads what a user reads. */
    kli_model_options_init(&mo);
    mo.mem_budget = 1;
    if (kli_model_open(&m, path, &mo, &err) == KLI_OK) {
        kli_model_close(m);
        return 0;
    }
    const char *p = strstr(err.msg, "the least budget is ");
    if (p != NULL)
        least = (uint64_t)(strtod(p + 20, NULL) * 1048576.0) + 1048576 / 10;
    return least;
}

static void
check_edge(const char *path, const char *what, int32_t V, float *const ref[3])
{
    struct kli_err err;
    struct kli_cache_stats st;
    uint64_t least = least_budget(path);

    ok(least > (32u << 20), "%s: a budget of 1 byte is refused and names the least (%.1f MiB)",
       what, (double)least / 1048576.0);
    /* from the least (a few slots: constant eviction) to every expert */
    const uint64_t extra[] = {0, 64u << 10, 256u << 10, 4u << 20};
    for (size_t b = 0; b < sizeof(extra) / sizeof(extra[0]); b++) {
        const int chunks[] = {0, 1, 7};
        for (size_t c = 0; c < 3; c++) {
            float *l = run(path, least + extra[b], chunks[c], &st, &err);
            ok(same(l, ref[c], V) && st.requests > 0 && st.hits <= st.requests &&
               st.bytes_read > 0,
               "%s: budget least+%llu KiB (%d of %d experts), chunk %d: logits bit-identical "
               "(%llu asked, %llu hits, %llu bytes read) %s", what,
               (unsigned long long)(extra[b] >> 10), st.n_slots, st.n_experts, chunks[c],
               (unsigned long long)st.requests, (unsigned long long)st.hits,
               (unsigned long long)st.bytes_read, l == NULL ? err.msg : "");
            free(l);
        }
    }
}

/* A cache holding every expert, two passes over the same tokens: the second pass hits all. */
static void
check_counters(const char *path)
{
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_model_options mo;
    struct kli_err err = {0};
    struct kli_cache_stats a, b;

    kli_model_options_init(&mo);
    mo.mem_budget = 256u << 20;
    if (!ok(kli_model_open(&m, path, &mo, &err) == KLI_OK &&
            kli_session_create(&s, m, NULL, &err) == KLI_OK, "open with 256 MiB: %s", err.msg))
        goto out;
    kli_model_cache_stats(m, &a);
    ok(a.n_slots == a.n_experts && a.budget == mo.mem_budget && a.requests == 0,
       "a large budget caches every expert (%d of %d)", a.n_slots, a.n_experts);
    int rc1 = kli_session_eval(s, ids, N_IDS, NULL, &err);
    kli_model_cache_stats(m, &a);
    kli_model_cache_reset(m);
    kli_session_reset(s);
    int rc2 = kli_session_eval(s, ids, N_IDS, NULL, &err);
    kli_model_cache_stats(m, &b);
    ok(rc1 == KLI_OK && rc2 == KLI_OK && a.requests > 0 && a.hits < a.requests &&
       b.requests == a.requests && b.hits == b.requests && b.bytes_read == 0,
       "first pass reads (%llu of %llu missed), the second hits every expert (%llu/%llu, "
       "%llu bytes read)", (unsigned long long)(a.requests - a.hits),
       (unsigned long long)a.requests, (unsigned long long)b.hits,
       (unsigned long long)b.requests, (unsigned long long)b.bytes_read);
    struct kli_cache_stats z;
    ok(kli_model_cache_stats(NULL, &z) == -1 && z.n_slots == 0,
       "no stats without a budget");
out:
    kli_session_free(s);
    kli_model_close(m);
}

static void
check_refusals(const char *path)
{
    struct kli_model *m = NULL;
    struct kli_model_options mo;
    struct kli_err err = {0};

    kli_model_options_init(&mo);
    mo.mem_budget = 256u << 20;
    mo.weight_type = "q8_0";
    ok(kli_model_open(&m, path, &mo, &err) == KLI_E_UNSUPPORTED && m == NULL &&
       strstr(err.msg, "kli convert") != NULL, "a budget with load-time conversion is "
       "refused: %s", err.msg);
    kli_model_options_init(&mo);
    mo.mem_budget = 256u << 20;
    mo.numa = KLI_NUMA_INTERLEAVE;
    memset(&err, 0, sizeof(err));
    ok(kli_model_open(&m, path, &mo, &err) == KLI_E_UNSUPPORTED && m == NULL &&
       strstr(err.msg, "--numa") != NULL, "a budget with --numa placement is refused: %s",
       err.msg);
}

/* Damages one routed expert of a .kli copy: edge mode names it when it is read. */
static void
check_damage(const char *kli, const char *dir)
{
    char bad[4200];
    struct wfile *w = NULL;
    struct kli_err err = {0};
    FILE *f;

    snprintf(bad, sizeof(bad), "%s/damaged.kli", dir);
    if (wfile_open(&w, kli, &err) != KLI_OK) {
        ok(0, "open %s: %s", kli, err.msg);
        return;
    }
    const struct pack_info *pk = wfile_pack(w);
    /* the first group is expert 0 of the first MoE layer */
    uint64_t off = pk->groups[0].offset + pk->groups[0].size / 2;
    int32_t layer = pk->groups[0].layer, expert = pk->groups[0].expert;
    wfile_close(w);
    char cmd[9000];
    snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", kli, bad);
    if (system(cmd) != 0 || (f = fopen(bad, "r+b")) == NULL) {
        ok(0, "copy the .kli");
        return;
    }
    int ch;
    if (fseek(f, (long)off, SEEK_SET) != 0 || (ch = fgetc(f)) == EOF ||
        fseek(f, (long)off, SEEK_SET) != 0 || fputc(ch ^ 0x5a, f) == EOF) {
        fclose(f);
        ok(0, "damage the copy");
        return;
    }
    fclose(f);

    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_model_options mo;
    kli_model_options_init(&mo);
    mo.mem_budget = 256u << 20;
    if (!ok(kli_model_open(&m, bad, &mo, &err) == KLI_OK &&
            kli_session_create(&s, m, NULL, &err) == KLI_OK,
            "a .kli with a damaged expert opens in edge mode (nothing read yet): %s", err.msg))
        goto out;
    /* feed tokens until that expert is chosen */
    int rc = KLI_OK, fed = 0;
    for (int i = 0; i < N_IDS && rc == KLI_OK; i++, fed++)
        rc = kli_session_eval(s, ids + i, 1, NULL, &err);
    char want[64];
    snprintf(want, sizeof(want), "experts.%d.", expert);
    ok(rc == KLI_E_IO && strstr(err.msg, "damaged") != NULL && strstr(err.msg, want) != NULL,
       "expert %d of layer %d is named when first read (after %d tokens): %s", expert, layer,
       fed, err.msg);
    if (rc != KLI_OK) {
        kli_token t = ids[0];
        uint8_t buf[64];
        memset(&err, 0, sizeof(err));
        ok(kli_session_eval(s, &t, 1, NULL, &err) == KLI_E_INVALID &&
           strstr(err.msg, "incomplete") != NULL, "the session then refuses to go on: %s",
           err.msg);
        memset(&err, 0, sizeof(err));
        ok(kli_session_snapshot(s, NULL, buf, sizeof(buf), &err) == KLI_E_INVALID,
           "and to be saved: %s", err.msg);
        kli_session_reset(s);
        memset(&err, 0, sizeof(err));
        /* token ids[0] alone chose other experts at first: it runs again */
        ok(kli_session_eval(s, &t, 1, NULL, &err) == KLI_OK || fed == 1,
           "after a reset, tokens that avoid the damaged expert run: %s", err.msg);
    }
out:
    kli_session_free(s);
    kli_model_close(m);
    unlink(bad);
}

/* ---- two threads, two sessions, one model with a small cache ---- */

struct runner {
    struct kli_model *m;
    float *out;
    int rc;
    int offset;    /* each thread feeds ids rotated by this much */
};

static void *
runner_main(void *arg)
{
    struct runner *r = arg;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    int32_t V = kli_model_n_vocab(r->m);

    r->rc = kli_session_create(&s, r->m, NULL, &err);
    for (int i = 0; r->rc == KLI_OK && i < N_IDS; i++) {
        kli_token t = ids[(i + r->offset) % N_IDS];
        r->rc = kli_session_eval(s, &t, 1, r->out + (size_t)i * (size_t)V, &err);
    }
    kli_session_free(s);
    return NULL;
}

static void
check_threads(const char *path, uint64_t budget)
{
    struct kli_model *m = NULL;
    struct kli_model_options mo;
    struct kli_err err = {0};
    struct runner r[2];
    float *alone[2];
    pthread_t th[2];

    kli_model_options_init(&mo);
    mo.mem_budget = budget;
    mo.gpu = KLI_GPU_OFF;
    if (!ok(kli_model_open(&m, path, &mo, &err) == KLI_OK, "open for threads: %s", err.msg))
        return;
    int32_t V = kli_model_n_vocab(m);
    for (int k = 0; k < 2; k++) {
        r[k].m = m;
        r[k].offset = 17 * k;
        r[k].out = malloc((size_t)N_IDS * (size_t)V * sizeof(float));
        alone[k] = malloc((size_t)N_IDS * (size_t)V * sizeof(float));
    }
    /* each alone first, then both at once */
    for (int k = 0; k < 2; k++) {
        runner_main(&r[k]);
        memcpy(alone[k], r[k].out, (size_t)N_IDS * (size_t)V * sizeof(float));
    }
    for (int k = 0; k < 2; k++)
        pthread_create(&th[k], NULL, runner_main, &r[k]);
    for (int k = 0; k < 2; k++)
        pthread_join(th[k], NULL);
    int same = 1;
    for (int k = 0; k < 2; k++)
        same &= r[k].rc == KLI_OK &&
                memcmp(alone[k], r[k].out, (size_t)N_IDS * (size_t)V * sizeof(float)) == 0;
    ok(same, "two threads decoding two sessions of one model under a small budget get the "
       "logits each gets alone");
    for (int k = 0; k < 2; k++) {
        free(r[k].out);
        free(alone[k]);
    }
    kli_model_close(m);
}

int
main(int argc, char **argv)
{
    const char *td = tl_data();
    char fixture[4096], dir[] = "/tmp/kli-xcache-XXXXXX", kli[4200];
    struct kli_err err = {0};
    struct kli_convert_options co;

    tap_init(argc, argv);
    snprintf(fixture, sizeof(fixture), "%s/tiny-kimi-linear", td);
    if (mkdtemp(dir) == NULL)
        skip_all("mkdtemp failed");
    for (int i = 0; i < N_IDS; i++)
        ids[i] = (kli_token)((i * 53 + 7) % 500);

    /* the resident run fed the same way is the reference (a chunked feed takes other kernel
     * paths, so only same-feed logits are bit-identical) */
    float *ref[3] = {run(fixture, 0, 0, NULL, &err), run(fixture, 0, 1, NULL, &err),
                     run(fixture, 0, 7, NULL, &err)};
    struct kli_model *m = NULL;
    int32_t V = 0;
    if (kli_model_open(&m, fixture, NULL, &err) == KLI_OK)
        V = kli_model_n_vocab(m);
    kli_model_close(m);
    if (!ok(ref[0] != NULL && ref[1] != NULL && ref[2] != NULL && V > 0, "resident logits: %s",
            err.msg))
        return tap_exit();
    if (tap_case("edge_dir"))
        check_edge(fixture, "directory", V, ref);

    /* edge_kli and damage need the .kli */
    int edge_kli = tap_case("edge_kli"), damage = tap_case("damage");
    snprintf(kli, sizeof(kli), "%s/tiny.kli", dir);
    kli_convert_options_init(&co);
    if (edge_kli || damage)
        ok(kli_convert(fixture, kli, &co, &err) == KLI_OK, "convert to .kli: %s", err.msg);
    if (edge_kli)
        check_edge(kli, ".kli", V, ref);
    if (tap_case("counters"))
        check_counters(fixture);
    if (tap_case("threads"))
        check_threads(fixture, least_budget(fixture) + (64u << 10));
    if (tap_case("refusals"))
        check_refusals(fixture);
    if (damage)
        check_damage(kli, dir);

    for (int i = 0; i < 3; i++)
        free(ref[i]);
    unlink(kli);
    rmdir(dir);
    plan_done();
    return tap_exit();
}
