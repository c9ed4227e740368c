/*
 * backend_int.h - what the three files of the backend glue share (backend.c: the plan at
 * model open; backend_hot.c: the hot set and the mover; backend_sess.c: a session's device
 * state and the per-layer calls): the model's and the session's device state, and a few
 * helpers. Nothing outside them includes it.
 */
#ifndef KLI_BACKEND_INT_H
#define KLI_BACKEND_INT_H

#include <pthread.h>
#include <stdint.h>

#include "backend.h"
#include "model.h"

/* The most experts one re-choice of a hot set replaces (backend_hot.c). */
#define BK_MAX_SWAPS 8

/* One MoE layer's device experts. */
struct bk_layer {
    struct gpu_ffn shared;    /* gate NULL: none */
    void *shared_buf;
    struct gpu_ffn *exp;      /* [E]; gate NULL: not resident */
    void **buf;                   /* [E] the allocation holding gate, up, down */
    uint32_t *count;              /* [E] routing counts (halved at each choice) */
    uint64_t since;               /* slots routed since the last choice */
};

/* One KDA layer's resident weights (whole-model mode only). */
struct bk_kda {
    struct gpu_kda_w w;
    void *buf;
    uint64_t bytes;
};

/* One MLA layer's resident weights (NULL buf: its projections run on the CPU). */
struct bk_mla {
    struct gpu_mla_w w;
    void *buf;
    uint64_t bytes;
};

struct backend_model {
    const struct kli_model *m;
    const struct backend_ops *ops;
    struct k_gpu *g;            /* NULL: CPU only, status says why */
    struct gpu_info info;
    char status[512];
    pthread_mutex_t status_lock;
    int failed;                   /* a session's step failed (status says so) */
    unsigned cpu_caches;          /* bit t: a session of cache type t ran on the CPU (said) */
    int mla;                      /* MLA attention on the device */
    int mla_proj;                 /* and the projections of every MLA layer (mla_w) */
    struct bk_mla *mla_w;         /* [n_layers], used for MLA layers */
    int all;                      /* the whole model fits: KDA layers and lm_head too */
    struct bk_kda *kda_w;         /* [n_layers], used for KDA layers when all */
    struct gpu_mat lm;        /* lm_head when all */
    void *lm_buf;
    uint64_t lm_bytes;
    int experts;                  /* shared and hot routed experts on the device */
    int32_t n_hot;                /* routed experts per MoE layer kept resident */
    uint64_t exp_bytes;           /* device bytes of one routed expert (the most of a layer) */
    struct bk_layer *layer;       /* [n_layers], used for MoE layers */
    pthread_rwlock_t lock;        /* read: a job in flight; write: changing a hot set */
    uint64_t st_routed, st_on_gpu, st_swaps;   /* kli_model_gpu_stats (atomic) */
    /* the mover: one re-choice at a time, copied in the background */
    pthread_t mover;
    int have_mover;
    pthread_mutex_t mv_lock;
    pthread_cond_t mv_cond;
    int mv_busy, mv_stop;         /* under mv_lock; mv_busy also read atomically */
    int mv_layer, mv_n;
    int32_t mv_in[BK_MAX_SWAPS], mv_out[BK_MAX_SWAPS];
    int have_locks;
};

struct backend_sess {
    struct backend_model *bm;
    struct kli_session *s;
    struct gpu_queue *q;
    int dead;                     /* a step failed: the CPU from now on */
    int mla_off;                  /* the mirrors no longer fit the budget */
    uint8_t **dc;                 /* [n_layers] device mirrors: [dcap] rows of rb bytes */
    enum k_dtype dt;              /* the mirrors' rows: the session's cache type */
    int64_t rb;                   /* bytes of a mirror row (mla_row_bytes of dt) */
    int64_t *dcap, *synced;       /* [n_layers] rows allocated, rows equal to the host's */
    kli_token *toks;              /* [toks_cap] the ids the mirrors were built from */
    int64_t toks_n, toks_cap;
    /* job scratch, sized for batch_max rows */
    const float **cptr;           /* [B] */
    float *newrows;               /* [B][L+rope]: cache rows made on the device */
    /* whole-model mode: the KDA states of every layer on the device. While dirty they are
     * ahead of the host's (which backend_sess_pull brings up to date); valid says they
     * equal or lead the host's, so a pass may start from them. */
    float **dS, **dconv;          /* [n_layers] */
    int kda_dev, kda_valid, kda_dirty;
    int kda_pass;                 /* this pass runs the KDA layers on the device */
    int64_t *nrow;                /* [B] */
    struct gpu_ffn *items;    /* [E+1] */
    int32_t *start;               /* [E+2] */
    int32_t *row;                 /* [B*(top_k+1)] */
    float *wt;                    /* [B*(top_k+1)] */
    int moe_locked;               /* holds bm->lock for reading (launch..wait) */
    void *mem;                    /* the block dc .. wt are carved from */
};

/* ---- backend.c ---- */

/* Records a step's failure once in the model's status line. */
void bk_note_failure(struct backend_model *bm, const char *msg);
/* Records once per type that sessions of a cache type other than f32 compute on the CPU. */
void bk_note_cpu(struct backend_model *bm, const char *type);
/* Bytes of a tensor's data. */
uint64_t bk_tensor_bytes(const struct tensor *t);
/* Device bytes of one sequence's states of one KDA layer (*bs the recurrent state, *bc the
 * conv state); returns their sum. */
uint64_t bk_kda_state_bytes(const struct k_config *cfg, uint64_t *bs, uint64_t *bc);

/* ---- backend_hot.c ---- */

/* Whether cuda/moe.cu computes this FFN. */
int bk_ffn_ok(const struct ffn_w *f);
/* Copies one FFN's three matrices into one device allocation (*buf), described by d. */
int bk_ffn_upload(struct backend_model *bm, const struct ffn_w *f, struct gpu_ffn *d,
                  void **buf, struct kli_err *err);
/* Frees what bk_ffn_upload made (bytes: bk_alloc_bytes of the FFN); d becomes empty. */
void bk_ffn_release(struct backend_model *bm, struct gpu_ffn *d, void **buf,
                    uint64_t bytes);
/* The size of bk_ffn_upload's allocation for f. */
uint64_t bk_alloc_bytes(const struct ffn_w *f);
/* Adds a routing trace's choices (--gpu-profile) to the layers' counts. */
int bk_read_profile(struct backend_model *bm, const char *path, struct kli_err *err);
/* Uploads MoE layer i's first hot set. */
void bk_fill(struct backend_model *bm, int i);
/* The mover's thread (arg: the backend_model). */
void *bk_mover(void *arg);

/* ---- backend_sess.c ---- */

/* Marks a session's device state unusable after a failed step (the CPU from now on). */
void bk_dead(struct backend_sess *g, const struct kli_err *e);

#endif
