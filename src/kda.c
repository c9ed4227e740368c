/*
 * kda.c - Kimi Delta Attention (doc/model.md section 4).
 *
 * Per token and head, with state S [K][V] (row = key channel):
 *
 *     S <- Diag(exp(g)) S                  channel-wise decay, g <= 0
 *     u  = beta * (v - S^T k)              delta-rule error against the decayed state
 *     S <- S + k u^T                       rank-1 write
 *     o  = S^T q                           read with the updated state
 *
 * i.e. S_t = (I - beta k k^T) Diag(alpha_t) S_{t-1} + beta k v^T (tech report eq. 1).
 * Decoding uses this recurrence as written. Prefill uses the chunked form, which computes
 * the same thing for 64 tokens at a time with matrix products; both live here side by side
 * and tests/test-kda.c checks that they agree.
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "imatrix.h"
#include "kda.h"
#include "ops.h"
#include "simd.h"
#include "threads.h"

/* ==== the recurrence ====================================================================== */

void
kda_recurrent(int64_t T, int64_t K, int64_t V, const float *q, const float *k, const float *v,
              const float *g, const float *beta, int64_t ld_qk, int64_t ld_v, int64_t ld_b,
              float *S, float *o, int64_t ld_o)
{
    const struct k_kernels *kk = k_kernels();
    float u[1024];   /* V <= 1024 is checked at session creation */

    for (int64_t t = 0; t < T; t++) {
        const float *qt = q + t * ld_qk, *kt = k + t * ld_qk, *gt = g + t * ld_qk;
        const float *vt = v + t * ld_v;
        float *ot = o + t * ld_o;
        float b = beta[t * ld_b];

        /* 1-2: decay the rows and predict v from the decayed state. */
        memset(u, 0, (size_t)V * sizeof(float));
        for (int64_t d = 0; d < K; d++) {
            float *row = S + d * V;
            kk->scale(row, expf(gt[d]), V);
            kk->axpy(u, kt[d], row, V);
        }
        /* 3: the delta-rule error. */
        for (int64_t j = 0; j < V; j++)
            u[j] = b * (vt[j] - u[j]);
        /* 4-5: rank-1 write, then read with the updated state. */
        memset(ot, 0, (size_t)V * sizeof(float));
        for (int64_t d = 0; d < K; d++) {
            float *row = S + d * V;
            kk->axpy(row, kt[d], u, V);
            kk->axpy(ot, qt[d], row, V);
        }
    }
}

/* ==== the chunked form ====================================================================
 *
 * For a chunk of C tokens r = 0..C-1 starting from state S0, with the local cumulative
 * log-decay G_r = g_0 + ... + g_r (per key channel, non-increasing):
 *
 *   L[r][j] = beta_r sum_d k_r[d] k_j[d] exp(G_r[d] - G_j[d])     j < r
 *   (I + L) U = beta (.) V,   (I + L) W = beta (.) exp(G) (.) K    (forward substitution)
 *   V_new  = U - W S0                                              the per-token errors u_r
 *   A[r][j] = sum_d q_r[d] k_j[d] exp(G_r[d] - G_j[d])             j <= r
 *   O      = (q (.) exp(G)) S0 + A V_new
 *   S_next = Diag(exp(G_C)) S0 + (K (.) exp(G_C - G))^T V_new
 *
 * Unrolling the recurrence gives u_r + sum_{j<r} L[r][j] u_j = beta_r (v_r - S0^T(exp(G_r) k_r)),
 * which is the triangular system above. Only differences G_r - G_j with j <= r and G_r itself
 * are exponentiated, so every factor lies in [0, 1]: exp(-G) is never formed (it overflows
 * within one chunk when the decay is strong). */

/* Rows per sub-block of a chunk. Between sub-blocks the decay factors split at the later
 * block's first row R0: exp(G_r - G_j) = exp(G_r - G_R0) exp(G_R0 - G_j) for j < R0 <= r,
 * both factors in [0, 1], so the off-diagonal blocks of L and A are matrix products of
 * decay-scaled rows; only the 16 x 16 diagonal blocks take pairwise decayed dots. */
#define KDA_SUB 16

int64_t
kda_state_floats(const struct k_config *cfg, int64_t *n_S, int64_t *n_conv)
{
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim;
    /* S [H][K][K] (the value dimension equals the key dimension); conv [3][H*K][W-1] */
    int64_t ns = H * K * K, nc = 3 * H * K * (int64_t)(cfg->kda.conv_size - 1);

    if (n_S != NULL)
        *n_S = ns;
    if (n_conv != NULL)
        *n_conv = nc;
    return ns + nc;
}

int64_t
kda_chunk_floats(int64_t K, int64_t V)
{
    int64_t C = KDA_CHUNK;

    /* G, W, Q', Tb [C][K]; U [C][V]; L, A [C][C]; TbT [K][C]; Z [K] */
    return 4 * C * K + C * V + 2 * C * C + K * C + K + 64;
}

/* dst [cols][ldd] = src [rows][cols]^T (src row stride lds). */
static void
kda_transpose(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols)
{
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++)
            dst[j * ldd + i] = src[i * lds + j];
    }
}

void
kda_chunked(int64_t T, int64_t K, int64_t V, const float *q, const float *k, const float *v,
            const float *g, const float *beta, int64_t ld_qk, int64_t ld_v, int64_t ld_b,
            float *S, float *o, int64_t ld_o, float *work)
{
    const struct k_kernels *kk = k_kernels();
    const int64_t CM = KDA_CHUNK;
    float *G = work;              /* [C][K] cumulative log-decay */
    float *W = G + CM * K;        /* [C][K] */
    float *Q = W + CM * K;        /* [C][K] decay-scaled q (and k) rows */
    float *Tb = Q + CM * K;       /* [C][K] decay-scaled k rows */
    float *U = Tb + CM * K;       /* [C][V]: U, then V_new in place */
    float *L = U + CM * V;        /* [C][C] strictly lower, beta-scaled */
    float *A = L + CM * CM;       /* [C][C] lower with the diagonal, zero above */
    float *TbT = A + CM * CM;     /* [K][C] */
    float *Z = TbT + K * CM;      /* [K] zeros: exp(G - 0) */

    memset(Z, 0, (size_t)K * sizeof(float));
    for (int64_t t0 = 0; t0 < T; t0 += CM) {
        int64_t C = T - t0 < CM ? T - t0 : CM;
        const float *qc = q + t0 * ld_qk, *kc = k + t0 * ld_qk, *gc = g + t0 * ld_qk;
        const float *vc = v + t0 * ld_v, *bc = beta + t0 * ld_b;
        float *oc = o + t0 * ld_o;

        /* Local cumulative decay. */
        for (int64_t r = 0; r < C; r++) {
            for (int64_t d = 0; d < K; d++)
                G[r * K + d] = (r ? G[(r - 1) * K + d] : 0.0f) + gc[r * ld_qk + d];
        }
        for (int64_t r = 0; r < C; r++)
            memset(A + r * CM, 0, (size_t)C * sizeof(float));
        /* L (strictly lower, scaled by beta_r) and A (lower), a sub-block of rows at a time. */
        for (int64_t R0 = 0; R0 < C; R0 += KDA_SUB) {
            int64_t nr = C - R0 < KDA_SUB ? C - R0 : KDA_SUB;
            const float *G0 = G + R0 * K;
            if (R0 > 0) {
                /* this block's rows decayed to R0 (q in Q, k in Q + 16 rows); the earlier
                 * rows j < R0 decayed from j to R0, transposed into TbT [K][R0] */
                float *Qk = Q + KDA_SUB * K;
                for (int64_t i = 0; i < nr; i++) {
                    kk->mul_decay(Q + i * K, qc + (R0 + i) * ld_qk, G + (R0 + i) * K, G0, K);
                    kk->mul_decay(Qk + i * K, kc + (R0 + i) * ld_qk, G + (R0 + i) * K, G0, K);
                }
                for (int64_t j = 0; j < R0; j++)
                    kk->mul_decay(Tb + j * K, kc + j * ld_qk, G0, G + j * K, K);
                kda_transpose(TbT, R0, Tb, K, R0, K);
                kk->gemm_nn(A + R0 * CM, CM, Q, K, TbT, R0, nr, R0, K, 1.0f, 0);
                kk->gemm_nn(L + R0 * CM, CM, Qk, K, TbT, R0, nr, R0, K, 1.0f, 0);
                for (int64_t i = 0; i < nr; i++)
                    kk->scale(L + (R0 + i) * CM, bc[(R0 + i) * ld_b], R0);
            }
            /* the diagonal block: pairwise decayed dots */
            for (int64_t r = R0; r < R0 + nr; r++) {
                const float *kr = kc + r * ld_qk, *qr = qc + r * ld_qk, *Gr = G + r * K;
                for (int64_t j = R0; j <= r; j++) {
                    const float *kj = kc + j * ld_qk, *Gj = G + j * K;
                    A[r * CM + j] = kk->dot_decay(qr, kj, Gr, Gj, K);
                    if (j < r)
                        L[r * CM + j] = bc[r * ld_b] * kk->dot_decay(kr, kj, Gr, Gj, K);
                }
            }
        }
        /* Forward substitution: (I + L) U = beta V and (I + L) W = beta exp(G) K, a block of
         * rows at a time: the earlier blocks' share as one product, then row by row. */
        for (int64_t R0 = 0; R0 < C; R0 += KDA_SUB) {
            int64_t nr = C - R0 < KDA_SUB ? C - R0 : KDA_SUB;
            for (int64_t r = R0; r < R0 + nr; r++) {
                float b = bc[r * ld_b];
                for (int64_t j = 0; j < V; j++)
                    U[r * V + j] = b * vc[r * ld_v + j];
                kk->mul_decay(W + r * K, kc + r * ld_qk, G + r * K, Z, K);
                kk->scale(W + r * K, b, K);
            }
            if (R0 > 0) {
                kk->gemm_nn(U + R0 * V, V, L + R0 * CM, CM, U, V, nr, V, R0, -1.0f, 1);
                kk->gemm_nn(W + R0 * K, K, L + R0 * CM, CM, W, K, nr, K, R0, -1.0f, 1);
            }
            for (int64_t r = R0; r < R0 + nr; r++) {
                for (int64_t j = R0; j < r; j++) {
                    float l = L[r * CM + j];
                    kk->axpy(U + r * V, -l, U + j * V, V);
                    kk->axpy(W + r * K, -l, W + j * K, K);
                }
            }
        }
        /* V_new = U - W S0 (in place in U). */
        kk->gemm_nn(U, V, W, K, S, V, C, V, K, -1.0f, 1);
        /* O = (q exp(G)) S0 + A V_new. */
        for (int64_t r = 0; r < C; r++)
            kk->mul_decay(Q + r * K, qc + r * ld_qk, G + r * K, Z, K);
        kk->gemm_nn(oc, ld_o, Q, K, S, V, C, V, K, 1.0f, 0);
        kk->gemm_nn(oc, ld_o, A, CM, U, V, C, V, C, 1.0f, 1);
        /* S_next = Diag(exp(G_C)) S0 + (K exp(G_C - G))^T V_new. */
        const float *GC = G + (C - 1) * K;
        for (int64_t r = 0; r < C; r++)
            kk->mul_decay(Tb + r * K, kc + r * ld_qk, GC, G + r * K, K);
        kda_transpose(TbT, C, Tb, K, C, K);
        for (int64_t d = 0; d < K; d++)
            kk->scale(S + d * V, expf(GC[d]), V);
        kk->gemm_nn(S, V, TbT, C, U, V, K, V, C, 1.0f, 1);
    }
}

/* ==== the layer =========================================================================== */

/* Rows of the scratch are n_seq sequences of T tokens each: row s * T + t is token t of
 * sequence s, whose state is st[s]. Prefill has one sequence; batched decode has many
 * sequences of one token. */
struct kda_job {
    const struct kli_model *m;
    const struct k_kda_w *w;
    struct kda_state *const *st;
    int64_t n_seq;
    struct kda_scratch *sc;
    int64_t T;
};

/* Short causal depthwise convolution + SiLU over channels [c0, c1) of q, k and v; the
 * state holds the last W-1 raw inputs (oldest first) and is advanced. */
static void
kda_conv_range(void *ctx, int64_t c0, int64_t c1, int ith)
{
    struct kda_job *j = ctx;
    const struct k_kernels *kk = k_kernels();
    const struct k_config *cfg = &j->m->cfg;
    int64_t HK = (int64_t)cfg->kda.n_heads * cfg->kda.head_dim, Wn = cfg->kda.conv_size;
    int64_t T = j->T;

    (void)ith;
    for (int64_t sq = 0; sq < j->n_seq; sq++) {
        for (int p = 0; p < 3; p++) {
            const float *raw = j->sc->raw[p] + sq * T * HK;
            float *y = j->sc->qkv[p] + sq * T * HK;
            float *state = j->st[sq]->conv + (int64_t)p * HK * (Wn - 1);
            const float *wts = j->w->conv[p];
            /* Row by row over the channels, so every read of raw and y is contiguous (a
             * column walk strides a whole row per token). The first W-1 tokens reach back
             * into the state. */
            for (int64_t t = 0; t < T; t++) {
                float *yt = y + t * HK;
                if (t >= Wn - 1) {
                    const float *in0 = raw + (t - (Wn - 1)) * HK;
                    for (int64_t c = c0; c < c1; c++) {
                        const float *wc = wts + c * Wn;
                        float a = 0.0f;
                        for (int64_t i = 0; i < Wn; i++)
                            a += wc[i] * in0[i * HK + c];
                        yt[c] = a;
                    }
                } else {
                    for (int64_t c = c0; c < c1; c++) {
                        const float *wc = wts + c * Wn, *sc = state + c * (Wn - 1);
                        float a = 0.0f;
                        for (int64_t i = 0; i < Wn; i++) {
                            int64_t tt = t - (Wn - 1) + i;
                            a += wc[i] * (tt >= 0 ? raw[tt * HK + c] : sc[(Wn - 1) + tt]);
                        }
                        yt[c] = a;
                    }
                }
                kk->silu(yt + c0, yt + c0, NULL, c1 - c0);
            }
            /* New state: the last W-1 inputs of (old state ++ raw). */
            for (int64_t c = c0; c < c1; c++) {
                float *sc = state + c * (Wn - 1);
                for (int64_t i = 0; i < Wn - 1; i++) {
                    int64_t tt = T - (Wn - 1) + i;
                    sc[i] = tt >= 0 ? raw[tt * HK + c] : sc[(Wn - 1) + tt];
                }
            }
        }
    }
}

static void
l2norm(float *x, int64_t n, float scale)
{
    double ss = 0.0;

    for (int64_t i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss + 1e-6)) * scale;
    for (int64_t i = 0; i < n; i++)
        x[i] *= r;
}

/* Per token and head [i0, i1) of T*H: gate, beta, q/k normalisation. */
static void
kda_prep_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct kda_job *j = ctx;
    const struct k_config *cfg = &j->m->cfg;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim, HK = H * K;
    float qscale = 1.0f / sqrtf((float)K);

    (void)ith;
    for (int64_t i = i0; i < i1; i++) {
        int64_t t = i / H, h = i % H;
        float *g = j->sc->g + t * HK + h * K;
        const float *bias = j->w->dt_bias + h * K;
        float a = j->w->a_neg[h];
        for (int64_t d = 0; d < K; d++)
            g[d] = a * ops_softplus(g[d] + bias[d]);
        j->sc->beta[t * H + h] = ops_sigmoid(j->sc->beta[t * H + h]);
        l2norm(j->sc->qkv[0] + t * HK + h * K, K, qscale);
        l2norm(j->sc->qkv[1] + t * HK + h * K, K, 1.0f);
    }
}

static void
kda_heads_range(void *ctx, int64_t h0, int64_t h1, int ith)
{
    struct kda_job *j = ctx;
    const struct k_config *cfg = &j->m->cfg;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim, HK = H * K;
    struct kda_scratch *sc = j->sc;

    /* Items are (sequence, head) pairs. (Strong decay drives the state and the decay-scaled
     * rows below float's normal range: threads_parallel_for runs every range with denormals
     * flushed to zero.) */
    for (int64_t i = h0; i < h1; i++) {
        int64_t sq = i / H, h = i % H, r0 = sq * j->T;
        const float *q = sc->qkv[0] + r0 * HK + h * K, *k = sc->qkv[1] + r0 * HK + h * K;
        const float *v = sc->qkv[2] + r0 * HK + h * K, *g = sc->g + r0 * HK + h * K;
        const float *beta = sc->beta + r0 * H + h;
        float *S = j->st[sq]->S + h * K * K, *o = sc->o + r0 * HK + h * K;
        if (j->T == 1)
            kda_recurrent(1, K, K, q, k, v, g, beta, HK, HK, H, S, o, HK);
        else
            kda_chunked(j->T, K, K, q, k, v, g, beta, HK, HK, H, S, o, HK,
                        sc->chunk + ith * kda_chunk_floats(K, K));
    }
}

/* Gated RMSNorm per head: y = rmsnorm(o) * w * sigmoid(gate) (doc/model.md 4.8). */
static void
kda_outnorm_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct kda_job *j = ctx;
    const struct k_config *cfg = &j->m->cfg;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim;

    (void)ith;
    for (int64_t i = i0; i < i1; i++) {
        float *o = j->sc->o + i * K;
        const float *gg = j->sc->gate + i * K;
        ops_rmsnorm(o, o, j->w->o_norm, K, cfg->norm_eps);
        for (int64_t d = 0; d < K; d++)
            o[d] *= ops_sigmoid(gg[d]);
    }
    (void)H;
}

struct kda_fused {
    struct kda_job *j;
    struct ops_mm up[2];      /* f_b and g_b */
    int tn;
};

/* Workers [t0, t1)'s shares (one each, or all of them when run serially) of the
 * convolution's channels and of both up-projections' rows. */
static void
kda_fused_range(void *ctx, int64_t t0, int64_t t1, int ith)
{
    struct kda_fused *f = ctx;
    const struct k_config *cfg = &f->j->m->cfg;
    int64_t HK = (int64_t)cfg->kda.n_heads * cfg->kda.head_dim, c0, c1;

    for (int64_t wk = t0; wk < t1; wk++) {
        ops_share(HK, 64, (int)wk, f->tn, &c0, &c1);
        if (c1 > c0)
            kda_conv_range(f->j, c0, c1, ith);
        for (int i = 0; i < 2; i++) {
            int64_t r0, r1;
            ops_share(f->up[i].w->shape[0], 16, (int)wk, f->tn, &r0, &r1);
            if (r1 > r0)
                ops_matmul_rows(f->up[i].w, r0, r1, f->up[i].x, f->up[i].ldx, f->up[i].y,
                                f->up[i].ldy, f->j->T * f->j->n_seq);
        }
    }
}

void
kda_forward(const struct kli_model *m, const struct k_kda_w *w, struct kda_state *const *st,
            int64_t n_seq, struct kda_scratch *sc, const float *x, int64_t T_seq, float *out)
{
    const struct k_config *cfg = &m->cfg;
    int64_t D = cfg->d_model, H = cfg->kda.n_heads, K = cfg->kda.head_dim, HK = H * K;
    int64_t rf = w->f_a.shape[0], rg = w->g_a.shape[0], T = n_seq * T_seq;
    struct kda_job j = {m, w, st, n_seq, sc, T_seq};

    /* Everything that reads x in one region; the convolution and both low-rank
     * up-projections in a second; then gates, heads, norm and output. (Decode's products are
     * small, and the barriers between them cost more than the products.) */
    float *low_f = sc->low, *low_g = sc->low + T * rf;
    const struct ops_mm first[6] = {
        {&w->q_proj, x, D, sc->raw[0], HK}, {&w->k_proj, x, D, sc->raw[1], HK},
        {&w->v_proj, x, D, sc->raw[2], HK}, {&w->f_a, x, D, low_f, rf},
        {&w->b_proj, x, D, sc->beta, H}, {&w->g_a, x, D, low_g, rg},
    };
    ops_matmul_multi(first, 6, T);
    struct kda_fused f = {&j, {{&w->f_b, low_f, rf, sc->g, HK},
                               {&w->g_b, low_g, rg, sc->gate, HK}}, threads_count()};
    imat_hook(&w->f_b, low_f, rf, T);
    imat_hook(&w->g_b, low_g, rg, T);
    threads_parallel_for(f.tn, 1, kda_fused_range, &f);
    threads_parallel_for(T * H, 4, kda_prep_range, &j);
    threads_parallel_for(n_seq * H, 1, kda_heads_range, &j);
    threads_parallel_for(T * H, 4, kda_outnorm_range, &j);
    ops_matmul(&w->o_proj, sc->o, HK, out, D, T);
}
