/*
 * test-moe.c - the router (moe_route, doc/model.md 6.2 and decision 1) on hand-made cases:
 * selection on the biased scores, weights from the unbiased ones, renormalisation (+1e-20,
 * only with top_k > 1), the scaling factor, ties to the lower index, the softmax router and
 * group-limited selection. Expected indices are written out by hand; expected weights are
 * computed here in double from the formula.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "moe.h"
#include "tap.h"
#include "testlib.h"

#define MAXE 64

static double
sigm(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

static struct config_moe
cfg_make(int32_t E, int32_t top_k, int32_t sigmoid, int32_t renormalize, float scaling)
{
    struct config_moe c;

    memset(&c, 0, sizeof(c));
    c.n_experts = E;
    c.top_k = top_k;
    c.n_shared = 1;
    c.d_ff = 8;
    c.first_dense = 1;
    c.layer_freq = 1;
    c.n_group = 1;
    c.topk_group = 1;
    c.sigmoid = sigmoid;
    c.renormalize = renormalize;
    c.scaling = scaling;
    return c;
}

/* Runs moe_route and checks idx exactly and the weights to 1e-6 relative. `want_w` are the
 * expected weights in double. */
static void
expect(const char *what, const struct config_moe *c, const float *logits,
       const float *bias, const int32_t *want_idx, const double *want_w)
{
    int32_t idx[MAXE];
    float wt[MAXE], tmp[2 * MAXE + 16];
    char got_i[256], want_i[256];
    int idx_ok = 1, wt_ok = 1;
    size_t gl = 0, wl = 0;
    double worst = 0.0;

    for (int k = 0; k < MAXE; k++) {
        idx[k] = -7;
        wt[k] = NAN;
    }
    moe_route(c, logits, bias, idx, wt, tmp);
    got_i[0] = want_i[0] = '\0';
    for (int32_t k = 0; k < c->top_k; k++) {
        if (idx[k] != want_idx[k])
            idx_ok = 0;
        double e = fabs((double)wt[k] - want_w[k]) / fabs(want_w[k]);
        if (!(e <= 1e-6))
            wt_ok = 0;
        worst = e > worst || isnan(e) ? e : worst;
        gl += (size_t)snprintf(got_i + gl, sizeof(got_i) - gl, "%s%d(%.7g)", k ? " " : "",
                               idx[k], wt[k]);
        wl += (size_t)snprintf(want_i + wl, sizeof(want_i) - wl, "%s%d(%.7g)", k ? " " : "",
                               want_idx[k], want_w[k]);
        if (gl >= sizeof(got_i) || wl >= sizeof(want_i))
            break;
    }
    if (!ok(idx_ok && wt_ok, "%s: experts(weights) %s", what, got_i))
        diag("wanted %s; worst weight error %.3g", want_i, worst);
    ok(idx[c->top_k] == -7, "%s: nothing written past top_k", what);
}

static const float zero[MAXE];
/* eight router logits used by several cases */
static const float lg[8] = {0.5f, -1.0f, 2.0f, 0.1f, 1.5f, -3.0f, 0.0f, 0.7f};
static const float all_eq[8] = {0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f};
static const float ties[8] = {-1.0f, 0.5f, -2.0f, 1.0f, -1.0f, 1.0f, 0.5f, -3.0f};
static const float tie40[8] = {-4.0f, 0.0f, -4.0f, -4.0f, -4.0f, -4.0f, 40.0f, -4.0f};
/* four groups of four experts (cases 10 and 11) */
static const float grouped[16] = {6.0f, -4.0f, -4.0f, -5.0f,  2.0f, 1.8f, -1.0f, -1.0f,
                                  1.2f, 1.2f, 1.2f, 1.2f,     1.5f, 1.4f, -2.0f, -2.0f};
static const float tied_groups[12] = {-3.0f, -3.0f, -3.0f, -3.0f,  1.0f, 0.5f, 0.0f, 0.0f,
                                      0.0f, 0.5f, 1.0f, 0.0f};
static const float bias7[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.3f};
static const float bias2_neg[8] = {0.0f, 0.0f, -0.5f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
static const float bias1[8] = {0.0f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
static const float bias9[16] = {[9] = 0.5f};

/* A sigmoid-router case: the config, the logits and bias, the experts expected in order and
 * the raw logit x of each (its unbiased score is sigm(x)). The expected weights are those
 * scores, renormalised (over their sum + 1e-20) when `renorm`, times the scaling. */
struct sigmoid_case {
    const char *name;   /* the TAP case; NULL: a further check of the case above */
    const char *what;
    int32_t E, top_k, renormalize, n_group, topk_group;
    float scaling;
    const float *logits, *bias;
    int32_t idx[6];
    double x[6];
    int renorm;
};

static const struct sigmoid_case sigmoid_cases[] = {
    /* 1. Sigmoid scores, no bias, top-2 renormalised, scaling 1: experts 2 and 4. */
    {"sigmoid_top2", "sigmoid top-2, renormalised", 8, 2, 1, 1, 1, 1.0f, lg, zero,
     {2, 4}, {2.0, 1.5}, 1},
    /* 2. The scaling factor multiplies the renormalised weights. */
    {"scaling", "sigmoid top-2, scaling 2.446", 8, 2, 1, 1, 1, 2.446f, lg, zero,
     {2, 4}, {2.0, 1.5}, 1},
    /* 3. The bias changes the selection but not the weights: bias[7] = 0.3 lifts expert 7
     *    (sigmoid(0.7) + 0.3 = 0.968) above expert 2 (0.881) and expert 4 (0.818); the
     *    weights stay the unbiased sigmoid of experts 7 and 2, in biased-score order. */
    {"bias_select", "bias selects expert 7, weights unbiased", 8, 2, 1, 1, 1, 2.446f, lg, bias7,
     {7, 2}, {0.7, 2.0}, 1},
    /* 4. A negative bias drops the best raw expert: bias[2] = -0.5 leaves 0.381 for it, so
     *    experts 4 (0.818) and 7 (0.668) are chosen. */
    {"negative_bias", "negative bias drops the best raw expert", 8, 2, 1, 1, 1, 1.0f, lg,
     bias2_neg, {4, 7}, {1.5, 0.7}, 1},
    /* 5. Renormalisation off: the weights are the plain sigmoid times the scaling. */
    {"no_renorm", "renormalize off, top-3", 8, 3, 0, 1, 1, 2.446f, lg, zero,
     {2, 4, 7}, {2.0, 1.5, 0.7}, 0},
    /* 6. top_k = 1 with renormalize on: no renormalisation (it applies only for top_k > 1),
     *    so the weight is sigmoid(2) * scaling, not 1 * scaling. */
    {"top1", "top_k 1, renormalize on: not renormalised", 8, 1, 1, 1, 1, 2.446f, lg, zero,
     {2}, {2.0}, 0},
    /* 7. Ties go to the lower index: all logits equal. */
    {"ties_all", "all equal: lowest indices", 8, 3, 1, 1, 1, 1.0f, all_eq, zero,
     {0, 1, 2}, {0.25, 0.25, 0.25}, 1},
    /* 8. Ties among the best: experts 5 and 3 tie above the rest, then 1 and 6 tie. */
    {"ties_best", "ties 3/5 and 1/6: lower index first", 8, 3, 1, 1, 1, 1.0f, ties, zero,
     {3, 5, 1}, {1.0, 1.0, 0.5}, 1},
    /* 9. A tie made by the bias: expert 1 has sigmoid(0) + 0.5 = 1.0 and expert 6 has
     *    sigmoid(40) = 1.0 in float, no bias. They tie on the biased score, so expert 1
     *    comes first; the weights are the unbiased 0.5 and 1.0. */
    {"bias_tie", "tie on biased scores: lower index first, weights unbiased", 8, 2, 1, 1, 1,
     1.0f, tie40, bias1, {1, 6}, {0.0, 40.0}, 1},
    /* 10. Grouped routing: 16 experts in 4 groups of 4, keep the 2 best groups, where a
     *     group's score is the sum of its two best biased scores.
     *       group 0 (0..3):   one very good expert (logit 6) and three poor ones -> the
     *                         sum of its top 2 is low (0.998 + 0.018)
     *       group 1 (4..7):   two good experts (2, 1.8)          -> 0.881 + 0.858 = 1.739
     *       group 2 (8..11):  four fair experts (1.2 each)       -> 0.769 * 2 = 1.537
     *                         (the sum of all four would be the largest: 3.07)
     *       group 3 (12..15): two medium (1.5, 1.4)              -> 0.818 + 0.802 = 1.620
     *     Groups 1 and 3 stay: expert 0, the single best, is never chosen. Top-3 gives
     *     4, 5, 12 in that order. */
    {"grouped", "groups 4x4 keep 2: best single expert's group dropped", 16, 3, 1, 4, 2,
     2.446f, grouped, zero, {4, 5, 12}, {2.0, 1.8, 1.5}, 1},
    /*     Ungrouped, the same logits pick 0, 4, 5. */
    {NULL, "same logits ungrouped: expert 0 chosen", 16, 3, 1, 1, 1, 2.446f, grouped, zero,
     {0, 4, 5}, {6.0, 2.0, 1.8}, 1},
    /*     top_k 6 > the 4 useful experts of groups 1 and 3: the rest of those groups fill
     *     up before anything from groups 0 and 2 (better individually) is taken. */
    {NULL, "groups: top-6 only from the two kept groups", 16, 6, 1, 4, 2, 2.446f, grouped,
     zero, {4, 5, 12, 13, 6, 7}, {2.0, 1.8, 1.5, 1.4, -1.0, -1.0}, 1},
    /* 11. The group score uses the biased scores: a bias of +0.5 on expert 9 lifts group 2
     *     to 1.269 + 0.769 = 2.038, above group 1 (1.739) and group 3 (1.620); groups 2 and
     *     1 stay. Selection: 9 (1.269), 4 (0.881), 5 (0.858); weights unbiased. */
    {"group_bias", "groups: bias lifts a group, weights unbiased", 16, 3, 1, 4, 2, 1.0f,
     grouped, bias9, {9, 4, 5}, {1.2, 2.0, 1.8}, 1},
    /* 12. Group ties go to the lower group: groups 1 and 2 identical, keep 1 group. */
    {"group_ties", "groups: tied groups, the lower one stays", 12, 2, 1, 3, 1, 1.0f,
     tied_groups, zero, {4, 5}, {1.0, 0.5}, 1},
    /* 13. One expert per group (n_group = E): the group score is the expert's own score, so
     *     grouping changes nothing. */
    {"group_per_expert", "groups of one expert", 8, 2, 1, 8, 3, 1.0f, lg, zero,
     {2, 4}, {2.0, 1.5}, 1},
};

static void
expect_sigmoid(const struct sigmoid_case *t)
{
    struct config_moe c = cfg_make(t->E, t->top_k, 1, t->renormalize, t->scaling);
    double w[6], sum = 0.0;

    c.n_group = t->n_group;
    c.topk_group = t->topk_group;
    for (int32_t k = 0; k < t->top_k; k++)
        sum += sigm(t->x[k]);
    sum += 1e-20;
    for (int32_t k = 0; k < t->top_k; k++)
        w[k] = (t->renorm ? sigm(t->x[k]) / sum : sigm(t->x[k])) * c.scaling;
    expect(t->what, &c, t->logits, t->bias, t->idx, w);
}

int
main(int argc, char **argv)
{
    int run = 0;

    (void)plan;       /* tap.h: the plan is printed at the end instead */
    (void)skip_all;   /* no test data needed */
    tap_init(argc, argv);

    for (size_t i = 0; i < sizeof(sigmoid_cases) / sizeof(sigmoid_cases[0]); i++) {
        if (sigmoid_cases[i].name != NULL)
            run = tap_case(sigmoid_cases[i].name);
        if (run)
            expect_sigmoid(&sigmoid_cases[i]);
    }
    /* 14. Softmax router: scores are softmax(logits), selection on score + bias, weights the
     *     unbiased softmax probabilities renormalised over the chosen experts. */
    if (tap_case("softmax")) {
        struct config_moe c = cfg_make(8, 2, 0, 1, 2.446f);
        double p[8], z = 0.0;
        for (int i = 0; i < 8; i++)
            z += exp((double)lg[i]);
        for (int i = 0; i < 8; i++)
            p[i] = exp((double)lg[i]) / z;
        double sum = p[2] + p[4] + 1e-20;
        int32_t wi[] = {2, 4};
        double ww[] = {p[2] / sum * 2.446f, p[4] / sum * 2.446f};
        expect("softmax router, renormalised", &c, lg, zero, wi, ww);

        struct config_moe c2 = cfg_make(8, 2, 0, 0, 1.0f);
        double ww2[] = {p[2], p[4]};
        expect("softmax router, renormalize off", &c2, lg, zero, wi, ww2);

        /* bias 0.4 on expert 0: p0 = 0.088 + 0.4 beats p2 = 0.39 */
        float bias[8] = {0.4f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        double sum3 = p[0] + p[2] + 1e-20;
        int32_t wi3[] = {0, 2};
        double ww3[] = {p[0] / sum3, p[2] / sum3};
        struct config_moe c3 = cfg_make(8, 2, 0, 1, 1.0f);
        expect("softmax router, bias selects, weights unbiased", &c3, lg, bias, wi3, ww3);
    }
    /* 15. Renormalisation with tiny scores: the +1e-20 keeps the sum non-zero; with
     *     logits -40 the sigmoid is 4.25e-18 each, so each weight is s / (2s + 1e-20). */
    if (tap_case("tiny_scores")) {
        struct config_moe c = cfg_make(4, 2, 1, 1, 1.0f);
        float l[4] = {-40.0f, -40.0f, -41.0f, -42.0f};
        double s = 1.0 / (1.0 + (double)expf(40.0f));
        int32_t wi[] = {0, 1};
        double ww[] = {s / (2.0 * s + 1e-20), s / (2.0 * s + 1e-20)};
        expect("tiny scores: +1e-20 in the renormalisation", &c, l, zero, wi, ww);
    }

    plan_done();
    return tap_exit();
}
