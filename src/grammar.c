/*
 * grammar.c - the matcher of a compiled JSON Schema (grammar.h) and the token mask.
 *
 * A state is a packed list of configurations, each a stack of frames (struct gr_frame). A
 * byte goes to every configuration's top frame, which takes it (and may push a child, or
 * pop itself when its value is complete), passes it on to its parent (a number ends at the
 * byte after it), or rejects it; a union frame forks its configuration into one per branch.
 *
 * The mask: the vocabulary's byte strings sit in a trie laid out in preorder, so the walk
 * feeds each shared prefix once and skips a whole subtree at the first byte that does not
 * fit; every token that ends at a live node and leaves a value still completable within the
 * tokens left is allowed. Masks are cached per state (the state's bytes are the key), with
 * the largest distance to completion among their tokens: while the budget covers that, the
 * cached mask is exact.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "grammar.h"
#include "internal.h"
#include "tokenizer.h"
#include "tokenizer_impl.h"
#include "util.h"

#define GR_MAX_DEPTH 24     /* frames of a configuration: how deep a value nests */
#define GR_MAX_CFG 8        /* configurations of a state (branches alive at once) */
#define GR_CACHE 256        /* cached masks per grammar */

struct gr_frame {
    int32_t node;
    uint8_t phase;
    uint8_t k;              /* string: bytes of a character left; number: negative */
    uint8_t lo, hi;         /* string: the range of the next continuation byte */
    int32_t a, b;           /* counters (see the phases) */
    uint64_t bits;          /* candidate set; number: the digits so far */
};

struct gr_cfg {
    int32_t depth;
    struct gr_frame fr[GR_MAX_DEPTH];
};

/* Packed state: int32 count, then per configuration int32 depth and its frames. */
#define GR_STATE_MAX (4 + GR_MAX_CFG * (4 + GR_MAX_DEPTH * (int)sizeof(struct gr_frame)))

struct gr_state {
    int32_t len;                        /* bytes used of b */
    unsigned char b[GR_STATE_MAX];
};

/* Frame phases. */
enum {
    P_OPEN = 0,                         /* nothing written yet: every kind */
    O_FIRST, O_KEY, O_AFTER, O_COMMA,   /* objects of declared properties */
    F_FIRST, F_COLON, F_AFTER, F_COMMA, /* objects of free keys */
    A_FIRST, A_AFTER, A_NEXT,           /* arrays */
    S_IN, S_ESC, S_UTF,                 /* strings */
    N_NEG, N_INT, N_DOT, N_FRAC,        /* numbers */
    L_IN                                /* literals */
};

/* What a frame does with a byte. */
enum { R_DEAD, R_TAKE, R_POP, R_PASS, R_PUSH, R_PUSH_PASS, R_REPLACE, R_FORK };

/* ==== numbers =========================================================================== */

static const double gr_pow10[] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

/* Whether the value sign * q / 10^K is inside n's range, compared as a parser compares. */
static int
gr_num_in(const struct gr_node *n, int neg, double q, int K)
{
    double v = q / gr_pow10[K];

    v = neg ? -v : v;
    if (n->has_min && (n->min_excl ? !(v > n->min) : !(v >= n->min)))
        return 0;
    if (n->has_max && (n->max_excl ? !(v < n->max) : !(v <= n->max)))
        return 0;
    return 1;
}

/* Whether some integer q in [A, B] gives a value (sign * q / 10^K) in n's range. */
static int
gr_num_grid(const struct gr_node *n, int neg, double A, double B, int K)
{
    double lo = -INFINITY, hi = INFINITY, s = gr_pow10[K];

    /* the range on q: neg flips it */
    if (n->has_min) {
        if (neg)
            hi = -n->min * s;
        else
            lo = n->min * s;
    }
    if (n->has_max) {
        if (neg)
            lo = -n->max * s;
        else
            hi = n->max * s;
    }
    double q = ceil(lo > A ? lo : A), top = floor(hi < B ? hi : B);
    if (!(q <= top + 1))
        return 0;
    /* the bounds were scaled in floating point: try the candidates near each end */
    for (int d = -1; d <= 1; d++) {
        if (q + d >= A && q + d <= B && gr_num_in(n, neg, q + d, K))
            return 1;
        if (top + d >= A && top + d <= B && gr_num_in(n, neg, top + d, K))
            return 1;
    }
    return q + 1 < top;
}

/* The fewest bytes that finish the number of frame f (0: it may end here); GR_INF if none.
 * A number is written as -?(0|[1-9][0-9]*)(\.[0-9]+)? with at most GR_MAX_DIGITS digits,
 * GR_MAX_FRAC of them after the point. */
static int64_t
gr_num_dist(const struct gr_node *n, const struct gr_frame *f)
{
    int64_t best = GR_INF;
    int a = f->a, b = f->b;
    double m = (double)f->bits;
    int maxk = n->integer ? 0 : GR_MAX_FRAC;

    if (f->phase == N_DOT || f->phase == N_FRAC) {
        for (int k = b == 0 ? 1 : 0; k + b <= maxk && a + b + k <= GR_MAX_DIGITS; k++) {
            double A = m * gr_pow10[k];
            if (gr_num_grid(n, f->k, A, A + gr_pow10[k] - 1, b + k))
                return k;
        }
        return GR_INF;
    }
    for (int neg = 0; neg < 2; neg++) {
        int cost0 = f->phase == P_OPEN ? neg : 0;
        if (f->phase != P_OPEN && neg != f->k)
            continue;
        for (int j = 0; a + j <= GR_MAX_DIGITS; j++) {
            double ilo, ihi;
            if (a + j == 0)
                continue;
            if (a > 0 && f->bits == 0 && j > 0)
                break;   /* a leading zero takes no more digits */
            if (a == 0) {
                ilo = j == 1 ? 0 : gr_pow10[j - 1];
                ihi = gr_pow10[j] - 1;
            } else {
                ilo = m * gr_pow10[j];
                ihi = ilo + gr_pow10[j] - 1;
            }
            for (int k = 0; k <= maxk && a + j + k <= GR_MAX_DIGITS; k++) {
                int64_t cost = cost0 + j + (k > 0 ? k + 1 : 0);
                if (cost >= best)
                    break;
                if (gr_num_grid(n, neg, ilo * gr_pow10[k], ihi * gr_pow10[k] +
                                gr_pow10[k] - 1, k))
                    best = cost;
            }
        }
    }
    return best;
}

int64_t
gr_num_shortest(const struct gr_node *n)
{
    struct gr_frame f = {0};

    return gr_num_dist(n, &f);
}

/* A number frame takes byte c. */
static int
gr_num_step(const struct gr_node *n, struct gr_frame *f, int c)
{
    int digit = c >= '0' && c <= '9';

    switch (f->phase) {
    case P_OPEN:
        if (c == '-') {
            f->phase = N_NEG;
            f->k = 1;
            break;
        }
        /* fall through */
    case N_NEG:
        if (!digit)
            return R_DEAD;
        f->phase = N_INT;
        f->a = 1;
        f->bits = (uint64_t)(c - '0');
        break;
    case N_INT:
    case N_FRAC:
        if (digit) {
            if ((f->phase == N_INT && f->bits == 0) || f->a + f->b >= GR_MAX_DIGITS ||
                (f->phase == N_FRAC && f->b >= GR_MAX_FRAC))
                return R_DEAD;
            f->bits = f->bits * 10 + (uint64_t)(c - '0');
            if (f->phase == N_INT)
                f->a++;
            else
                f->b++;
            break;
        }
        if (c == '.' && f->phase == N_INT && !n->integer) {
            f->phase = N_DOT;
            break;
        }
        return gr_num_dist(n, f) == 0 ? R_PASS : R_DEAD;
    case N_DOT:
        if (!digit)
            return R_DEAD;
        f->phase = N_FRAC;
        f->b = 1;
        f->bits = f->bits * 10 + (uint64_t)(c - '0');
        break;
    default:
        return R_DEAD;
    }
    return gr_num_dist(n, f) < GR_INF ? R_TAKE : R_DEAD;
}

/* ==== the other frames ================================================================== */

/* Candidate properties from index i of object n: up to and including the first required. */
static uint64_t
gr_cands(const struct kli_grammar *g, const struct gr_node *n, int32_t i)
{
    uint64_t s = 0;

    for (; i < n->n; i++) {
        s |= 1ull << i;
        if (g->props[n->first + i].required)
            break;
    }
    return s;
}

/* A frame that has written nothing takes its opening byte `open`, going to `phase`. */
static int
gr_open(struct gr_frame *f, int c, int open, int phase)
{
    if (c != open)
        return R_DEAD;
    f->phase = (uint8_t)phase;
    return R_TAKE;
}

/* A string frame of a pattern takes byte c: printable ASCII but " and \, the pattern's
 * positions in bits. */
static int
gr_pat_step(const struct gr_regex *r, struct gr_frame *f, int c)
{
    if (f->phase == P_OPEN) {
        f->bits = 1;   /* the start position */
        return gr_open(f, c, '"', S_IN);
    }
    if (c == '"')
        return (f->bits & r->accept) != 0 ? R_POP : R_DEAD;
    f->bits = rx_step(r, f->bits, c);
    return f->bits != 0 && rx_dist(r, f->bits) < GR_INF ? R_TAKE : R_DEAD;
}

/* A string frame takes byte c. */
static int
gr_str_step(const struct kli_grammar *g, const struct gr_node *n, struct gr_frame *f, int c)
{
    int full = n->max_len >= 0 && f->a >= n->max_len;

    if (n->pattern)
        return gr_pat_step(&g->res[n->pattern - 1], f, c);
    switch (f->phase) {
    case P_OPEN:
        return gr_open(f, c, '"', S_IN);
    case S_IN:
        if (c == '"')
            return f->a >= n->min_len ? R_POP : R_DEAD;
        if (c < 0x20 || full)
            return R_DEAD;
        if (c == '\\') {
            f->phase = S_ESC;
        } else if (c >= 0x80) {
            f->lo = 0x80;
            f->hi = 0xbf;
            if (c >= 0xc2 && c <= 0xdf)
                f->k = 1;
            else if (c >= 0xe0 && c <= 0xef)
                f->k = 2;
            else if (c >= 0xf0 && c <= 0xf4)
                f->k = 3;
            else
                return R_DEAD;
            f->lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
            f->hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
            f->phase = S_UTF;
        }
        /* count characters only while a bound cares */
        if (n->max_len >= 0 || f->a < n->min_len)
            f->a++;
        return R_TAKE;
    case S_ESC:
        if (strchr("\"\\/bfnrt", c) == NULL || c == 0)
            return R_DEAD;
        f->phase = S_IN;
        return R_TAKE;
    case S_UTF:
        if (c < f->lo || c > f->hi)
            return R_DEAD;
        f->lo = 0x80;
        f->hi = 0xbf;
        if (--f->k == 0)
            f->phase = S_IN;
        return R_TAKE;
    default:
        return R_DEAD;
    }
}

/* A literal frame (enum, const, true, false, null) takes byte c. */
static int
gr_lit_step(const struct kli_grammar *g, const struct gr_node *n, struct gr_frame *f, int c)
{
    uint64_t next = 0, bits = f->phase == P_OPEN ? (n->n == 64 ? ~0ull : (1ull << n->n) - 1) :
                                                   f->bits;
    int done = 0, longer = 0;

    for (int32_t i = 0; i < n->n; i++) {
        const struct gr_lit *l = &g->lits[n->first + i];
        if (!((bits >> i) & 1))
            continue;
        if (l->len == f->a)
            done = 1;
        else if ((unsigned char)l->s[f->a] == c)
            next |= 1ull << i;
    }
    if (next == 0)
        return done ? R_PASS : R_DEAD;
    f->phase = L_IN;
    f->bits = next;
    f->a++;
    for (int32_t i = 0; i < n->n; i++)
        longer |= ((next >> i) & 1) && g->lits[n->first + i].len > f->a;
    return longer ? R_TAKE : R_POP;
}

/* Frame f (of node n) takes byte c; *child receives a node to push for R_PUSH, R_PUSH_PASS
 * and R_REPLACE. */
static int
gr_step(const struct kli_grammar *g, struct gr_frame *f, int c, int32_t *child)
{
    const struct gr_node *n = &g->nodes[f->node];

    switch (n->kind) {
    case GR_ANY:
        *child = c == '{' ? GR_N_OBJ : c == '[' ? GR_N_ARR : c == '"' ? GR_N_STR :
                 c == '-' || (c >= '0' && c <= '9') ? GR_N_NUM : c == 't' ? GR_N_TRUE :
                 c == 'f' ? GR_N_FALSE : c == 'n' ? GR_N_NULL : -1;
        return *child >= 0 ? R_REPLACE : R_DEAD;
    case GR_UNION:
        return R_FORK;
    case GR_STRING:
        return gr_str_step(g, n, f, c);
    case GR_NUMBER:
        return gr_num_step(n, f, c);
    case GR_LITERAL:
        return gr_lit_step(g, n, f, c);
    case GR_ARRAY:
        switch (f->phase) {
        case P_OPEN:
            return gr_open(f, c, '[', A_FIRST);
        case A_FIRST:
            if (c == ']')
                return n->min_len == 0 ? R_POP : R_DEAD;
            if (n->max_len == 0)
                return R_DEAD;
            f->a = 1;
            f->phase = A_AFTER;
            *child = n->child;
            return R_PUSH_PASS;
        case A_AFTER:
            if (c == ']')
                return f->a >= n->min_len ? R_POP : R_DEAD;
            if (c != ',' || (n->max_len >= 0 && f->a >= n->max_len))
                return R_DEAD;
            f->phase = A_NEXT;
            return R_TAKE;
        default:   /* A_NEXT */
            f->a++;
            f->phase = A_AFTER;
            *child = n->child;
            return R_PUSH_PASS;
        }
    default:
        break;
    }
    /* objects */
    switch (f->phase) {
    case P_OPEN:
        return gr_open(f, c, '{', n->free_keys ? F_FIRST : O_FIRST);
    case O_FIRST:
        if (c == '}')
            return n->n == 0 || g->props[n->first].rest == 0 ? R_POP : R_DEAD;
        /* fall through */
    case O_COMMA:
        if (c != '"')
            return R_DEAD;
        f->bits = gr_cands(g, n, f->phase == O_FIRST ? 0 : f->b);
        f->phase = O_KEY;
        f->a = 0;
        /* fall through */
    case O_KEY: {
        uint64_t next = 0;
        int32_t last = -1;
        for (int32_t i = 0; i < n->n; i++) {
            const struct gr_prop *p = &g->props[n->first + i];
            if (((f->bits >> i) & 1) && (unsigned char)p->lit[f->a] == c) {
                next |= 1ull << i;
                last = i;
            }
        }
        if (next == 0)
            return R_DEAD;
        f->bits = next;
        if (++f->a < g->props[n->first + last].len || (next & (next - 1)) != 0)
            return R_TAKE;
        /* the key is whole (keys end in `":`, so no other can go on) */
        f->phase = O_AFTER;
        f->b = last + 1;
        f->bits = 0;
        f->a = 0;
        *child = g->props[n->first + last].node;
        return R_PUSH;
    }
    case O_AFTER:
        if (c == '}')
            return f->b >= n->n || g->props[n->first + f->b].rest == 0 ? R_POP : R_DEAD;
        if (c != ',' || f->b >= n->n)
            return R_DEAD;
        f->phase = O_COMMA;
        return R_TAKE;
    case F_FIRST:
    case F_COMMA:
        if (c == '}' && f->phase == F_FIRST)
            return R_POP;
        if (c != '"')
            return R_DEAD;
        f->phase = F_COLON;
        *child = GR_N_STR;
        return R_PUSH_PASS;
    case F_COLON:
        if (c != ':')
            return R_DEAD;
        f->phase = F_AFTER;
        *child = n->child;
        return R_PUSH;
    case F_AFTER:
        if (c == '}')
            return R_POP;
        if (c != ',')
            return R_DEAD;
        f->phase = F_COMMA;
        return R_TAKE;
    default:
        return R_DEAD;
    }
}

/* ==== distances ========================================================================= */

static int64_t
gr_add64(int64_t a, int64_t b)
{
    return a >= GR_INF || b >= GR_INF ? GR_INF : a + b;
}

/* The bytes of object n from a key start at property i (its key, value, what must follow). */
static int64_t
gr_obj_from(const struct kli_grammar *g, const struct gr_node *n, uint64_t cands, int32_t off)
{
    int64_t best = GR_INF;

    for (int32_t i = 0; i < n->n; i++) {
        const struct gr_prop *p = &g->props[n->first + i];
        if (!((cands >> i) & 1))
            continue;
        int64_t d = (int64_t)p->len - off + g->nodes[p->node].minlen;
        if (g->nodes[p->node].minlen >= GR_INF)
            continue;
        d += i + 1 < n->n ? p[1].rest : 0;
        best = d < best ? d : best;
    }
    return best;
}

/* The fewest bytes that finish frame f (what its parents add comes from them). */
static int64_t
gr_frame_dist(const struct kli_grammar *g, const struct gr_frame *f)
{
    const struct gr_node *n = &g->nodes[f->node];
    int64_t d, item;

    if (f->phase == P_OPEN && n->kind != GR_NUMBER)
        return n->minlen;
    switch (n->kind) {
    case GR_NUMBER:
        return gr_num_dist(n, f);
    case GR_STRING:
        if (n->pattern)
            return gr_add64(rx_dist(&g->res[n->pattern - 1], f->bits), 1);
        d = f->a < n->min_len ? n->min_len - f->a : 0;
        return d + 1 + (f->phase == S_ESC ? 1 : f->phase == S_UTF ? f->k : 0);
    case GR_LITERAL:
        d = GR_INF;
        for (int32_t i = 0; i < n->n; i++) {
            if ((f->bits >> i) & 1)
                d = g->lits[n->first + i].len - f->a < d ? g->lits[n->first + i].len - f->a : d;
        }
        return d;
    case GR_ARRAY:
        item = g->nodes[n->child].minlen;
        switch (f->phase) {
        case A_FIRST:
            return n->min_len == 0 ? 1 : n->min_len * (item + 1);
        case A_AFTER:
            return (f->a < n->min_len ? (n->min_len - f->a) * (item + 1) : 0) + 1;
        default:   /* A_NEXT: an item must come */
            d = f->a + 1 < n->min_len ? n->min_len - f->a - 1 : 0;
            return item + d * (item + 1) + 1;
        }
    default:
        break;
    }
    switch (f->phase) {
    case O_FIRST:
        d = gr_obj_from(g, n, gr_cands(g, n, 0), 0);
        d = d < GR_INF ? d + 1 : d;
        return n->n == 0 || g->props[n->first].rest == 0 ? 1 : d;
    case O_KEY:
        d = gr_obj_from(g, n, f->bits, f->a);
        return d < GR_INF ? d + 1 : d;
    case O_AFTER:
        return (f->b < n->n ? g->props[n->first + f->b].rest : 0) + 1;
    case O_COMMA:
        d = gr_obj_from(g, n, gr_cands(g, n, f->b), 0);
        return d < GR_INF ? d + 1 : d;
    case F_FIRST:
    case F_AFTER:
        return 1;
    case F_COLON:
        return 1 + (int64_t)g->nodes[n->child].minlen + 1;
    default:   /* F_COMMA */
        return 2 + 1 + (int64_t)g->nodes[n->child].minlen + 1;
    }
}

static int64_t
gr_cfg_dist(const struct kli_grammar *g, const struct gr_cfg *c)
{
    int64_t d = 0;

    for (int32_t i = 0; i < c->depth; i++) {
        int64_t e = gr_frame_dist(g, &c->fr[i]);
        if (e >= GR_INF)
            return GR_INF;
        d += e;
    }
    return d;
}

/* ==== states ============================================================================ */

static void
gr_cfg_load(struct gr_cfg *c, const unsigned char *p)
{
    memcpy(&c->depth, p, 4);
    memcpy(c->fr, p + 4, (size_t)c->depth * sizeof(struct gr_frame));
}

static size_t
gr_cfg_size(const unsigned char *p)
{
    int32_t d;

    memcpy(&d, p, 4);
    return 4 + (size_t)d * sizeof(struct gr_frame);
}

/* Appends configuration c to state s unless it is there already or s is full. */
static void
gr_state_add(struct gr_state *s, const struct gr_cfg *c)
{
    size_t sz = 4 + (size_t)c->depth * sizeof(struct gr_frame);
    int32_t n;
    unsigned char *p = s->b + 4;

    memcpy(&n, s->b, 4);
    if (n == GR_MAX_CFG)
        return;
    for (int32_t i = 0; i < n; i++) {
        size_t z = gr_cfg_size(p);
        if (z == sz && memcmp(&c->depth, p, 4) == 0 && memcmp(c->fr, p + 4, sz - 4) == 0)
            return;
        p += z;
    }
    memcpy(p, &c->depth, 4);
    memcpy(p + 4, c->fr, sz - 4);
    n++;
    memcpy(s->b, &n, 4);
    s->len = (int32_t)(p + sz - s->b);
}

static void
gr_state_init(struct gr_state *s)
{
    memset(s->b, 0, 4);
    s->len = 4;
}

/* Pushes node `node` on c: 0, or -1 when too deep. */
static int
gr_push(struct gr_cfg *c, int32_t node)
{
    if (c->depth == GR_MAX_DEPTH)
        return -1;
    memset(&c->fr[c->depth], 0, sizeof(c->fr[0]));
    c->fr[c->depth++].node = node;
    return 0;
}

/* Feeds byte c to configuration *cf (modified), adding what survives to out. */
static void
gr_feed_cfg(const struct kli_grammar *g, struct gr_cfg *cf, int c, struct gr_state *out)
{
    for (;;) {
        int32_t child = -1;
        if (cf->depth == 0)
            return;   /* complete: nothing may follow */
        struct gr_frame *f = &cf->fr[cf->depth - 1];
        switch (gr_step(g, f, c, &child)) {
        case R_DEAD:
            return;
        case R_TAKE:
            gr_state_add(out, cf);
            return;
        case R_POP:
            cf->depth--;
            gr_state_add(out, cf);
            return;
        case R_PASS:
            cf->depth--;
            continue;
        case R_PUSH:
            if (gr_push(cf, child) == 0)
                gr_state_add(out, cf);
            return;
        case R_PUSH_PASS:
            if (gr_push(cf, child) < 0)
                return;
            continue;
        case R_REPLACE:
            cf->depth--;
            gr_push(cf, child);
            continue;
        default: {   /* R_FORK */
            const struct gr_node *n = &g->nodes[f->node];
            struct gr_cfg alt;
            cf->depth--;
            for (int32_t i = 0; i < n->n; i++) {
                memcpy(&alt, cf, 4 + (size_t)cf->depth * sizeof(struct gr_frame));
                gr_push(&alt, g->alts[n->first + i]);
                gr_feed_cfg(g, &alt, c, out);
            }
            return;
        }
        }
    }
}

/* out = in after byte c. @return the number of configurations left. */
static int32_t
gr_feed(const struct kli_grammar *g, const struct gr_state *in, int c, struct gr_state *out)
{
    int32_t n, k;
    const unsigned char *p = in->b + 4;
    struct gr_cfg cf;

    gr_state_init(out);
    memcpy(&n, in->b, 4);
    for (int32_t i = 0; i < n; i++) {
        gr_cfg_load(&cf, p);
        p += gr_cfg_size(p);
        gr_feed_cfg(g, &cf, c, out);
    }
    memcpy(&k, out->b, 4);
    return k;
}

/* The fewest bytes to a complete value over the configurations of s (0: complete, or may
 * end here: every frame left may end at the next byte). */
static int64_t
gr_state_dist(const struct kli_grammar *g, const struct gr_state *s)
{
    int32_t n;
    int64_t best = GR_INF;
    const unsigned char *p = s->b + 4;
    struct gr_cfg cf;

    memcpy(&n, s->b, 4);
    for (int32_t i = 0; i < n; i++) {
        gr_cfg_load(&cf, p);
        p += gr_cfg_size(p);
        int64_t d = gr_cfg_dist(g, &cf);
        best = d < best ? d : best;
    }
    return best;
}

/* Whether some configuration of s is complete (empty stack). */
static int
gr_state_done(const struct gr_state *s)
{
    int32_t n, d;
    const unsigned char *p = s->b + 4;

    memcpy(&n, s->b, 4);
    for (int32_t i = 0; i < n; i++) {
        memcpy(&d, p, 4);
        if (d == 0)
            return 1;
        p += gr_cfg_size(p);
    }
    return 0;
}

/* ==== the trie ========================================================================== */

struct gr_sorted {
    const unsigned char *s;
    int32_t len;
    kli_token id;
};

static int
gr_sorted_cmp(const void *x, const void *y)
{
    const struct gr_sorted *a = x, *b = y;
    int32_t m = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->s, b->s, (size_t)m);

    if (c != 0)
        return c;
    if (a->len != b->len)
        return a->len < b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

void
gr_trie_free(struct gr_trie *t)
{
    if (t == NULL)
        return;
    free(t->byte);
    free(t->depth);
    free(t->tok);
    free(t->skip);
    free(t->dup);
    free(t);
}

/* The vocabulary's ordinary tokens (ids below n_base, 1 to 255 bytes) in preorder.
 * @return the trie, or NULL when out of memory. */
static struct gr_trie *
gr_trie_build(const struct kli_tokenizer *tok, int32_t nv, int32_t n_base)
{
    struct gr_sorted *v = k_mallocarray((size_t)nv, sizeof(*v));
    struct gr_trie *t = k_calloc(1, sizeof(*t));
    int32_t nt = 0, nodes = 0, *stack = NULL;

    if (v == NULL || t == NULL || (t->dup = k_mallocarray((size_t)nv, sizeof(int32_t))) == NULL)
        goto fail;
    for (int32_t i = 0; i < nv; i++) {
        size_t len;
        const char *p = i < n_base ? kli_token_bytes(tok, i, &len) : NULL;
        t->dup[i] = -1;
        if (p == NULL || len == 0 || len > 255)
            continue;
        v[nt++] = (struct gr_sorted){(const unsigned char *)p, (int32_t)len, i};
    }
    qsort(v, (size_t)nt, sizeof(*v), gr_sorted_cmp);
    /* count the nodes: each token adds the bytes past its common prefix with the previous */
    for (int32_t i = 0; i < nt; i++) {
        int32_t l = 0;
        if (i > 0) {
            while (l < v[i].len && l < v[i - 1].len && v[i].s[l] == v[i - 1].s[l])
                l++;
        }
        nodes += v[i].len - l;
        t->max_len = v[i].len > t->max_len ? v[i].len : t->max_len;
    }
    t->byte = k_malloc((size_t)nodes + 1);
    t->depth = k_malloc((size_t)nodes + 1);
    t->tok = k_mallocarray((size_t)nodes + 1, sizeof(int32_t));
    t->skip = k_mallocarray((size_t)nodes + 1, sizeof(int32_t));
    stack = k_mallocarray(256, sizeof(int32_t));   /* open node at each depth */
    if (t->byte == NULL || t->depth == NULL || t->tok == NULL || t->skip == NULL ||
        stack == NULL)
        goto fail;
    int32_t k = 0, open = 0;
    for (int32_t i = 0; i < nt; i++) {
        int32_t l = 0;
        if (i > 0) {
            while (l < v[i].len && l < v[i - 1].len && v[i].s[l] == v[i - 1].s[l])
                l++;
        }
        if (l == v[i].len) {   /* the same bytes as the previous token */
            int32_t at = stack[l - 1];
            t->dup[v[i].id] = t->dup[t->tok[at]];
            t->dup[t->tok[at]] = v[i].id;
            continue;
        }
        /* close the subtrees deeper than the common prefix */
        while (open > l)
            t->skip[stack[--open]] = k;
        for (int32_t d = l; d < v[i].len; d++) {
            t->byte[k] = v[i].s[d];
            t->depth[k] = (uint8_t)(d + 1);
            t->tok[k] = d + 1 == v[i].len ? v[i].id : -1;
            stack[open++] = k++;
        }
    }
    while (open > 0)
        t->skip[stack[--open]] = k;
    t->n = k;
    free(v);
    free(stack);
    return t;
fail:
    free(v);
    free(stack);
    gr_trie_free(t);
    return NULL;
}

/* The tokenizer's trie, built on first use. A tokenizer is immutable to its users; the trie
 * is a cache of it, set once under this lock and freed with the tokenizer. */
static pthread_mutex_t gr_trie_lock = PTHREAD_MUTEX_INITIALIZER;

static const struct gr_trie *
gr_trie_get(const struct kli_tokenizer *tok)
{
    struct kli_tokenizer *t = (struct kli_tokenizer *)tok;
    const struct gr_trie *r;

    pthread_mutex_lock(&gr_trie_lock);
    if (t->trie == NULL)
        t->trie = gr_trie_build(tok, kli_tokenizer_n_vocab(tok), kli_tokenizer_n_base(tok));
    r = t->trie;
    pthread_mutex_unlock(&gr_trie_lock);
    return r;
}

/* ==== the mask cache ==================================================================== */

struct gr_entry {
    uint64_t hash;
    int32_t len;                /* of the key, 0: empty */
    int32_t max_dist;           /* the largest distance left after any of its tokens */
    unsigned char *key;
    uint64_t *mask;
};

struct gr_cache {
    int32_t n_words;
    int32_t used;
    struct gr_entry e[GR_CACHE];
};

static void
gr_cache_clear(struct gr_cache *c)
{
    for (int i = 0; i < GR_CACHE; i++) {
        free(c->e[i].key);
        free(c->e[i].mask);
        memset(&c->e[i], 0, sizeof(c->e[i]));
    }
    c->used = 0;
}

/* Copies the mask of state s into mask (nw words), if cached with max_dist <= limit.
 * @return 1 if. */
static int
gr_cache_get(struct kli_grammar *g, const struct gr_state *s, uint64_t h, int64_t limit,
             uint64_t *mask, int32_t nw)
{
    struct gr_cache *c = g->cache;
    int hit = 0;

    pthread_mutex_lock(&g->lock);
    for (int i = 0; i < GR_CACHE; i++) {
        struct gr_entry *e = &c->e[(h + (uint64_t)i) % GR_CACHE];
        if (e->len == 0)
            break;
        if (e->hash == h && e->len == s->len && memcmp(e->key, s->b, (size_t)s->len) == 0) {
            if (e->max_dist <= limit) {
                int32_t k = nw < c->n_words ? nw : c->n_words;
                memcpy(mask, e->mask, (size_t)k * sizeof(uint64_t));
                memset(mask + k, 0, (size_t)(nw - k) * sizeof(uint64_t));
                hit = 1;
            }
            break;
        }
    }
    pthread_mutex_unlock(&g->lock);
    return hit;
}

/* Caches mask (nw words; its bits past the tokenizer's vocabulary are 0) for state s. */
static void
gr_cache_put(struct kli_grammar *g, const struct gr_state *s, uint64_t h, int64_t max_dist,
             const uint64_t *mask, int32_t nw)
{
    struct gr_cache *c = g->cache;
    size_t mb = (size_t)c->n_words * sizeof(uint64_t);
    unsigned char *key = k_malloc((size_t)s->len);
    uint64_t *m = k_malloc(mb);

    if (key == NULL || m == NULL) {
        free(key);
        free(m);
        return;
    }
    memcpy(key, s->b, (size_t)s->len);
    memset(m, 0, mb);
    memcpy(m, mask, (size_t)(nw < c->n_words ? nw : c->n_words) * sizeof(uint64_t));
    pthread_mutex_lock(&g->lock);
    if (c->used >= GR_CACHE / 2)
        gr_cache_clear(c);   /* a full table starts over: states recur, old ones seldom */
    struct gr_entry *e = NULL;
    for (int i = 0; i < GR_CACHE; i++) {
        e = &c->e[(h + (uint64_t)i) % GR_CACHE];
        if (e->len == 0 || (e->hash == h && e->len == s->len &&
                            memcmp(e->key, s->b, (size_t)s->len) == 0))
            break;
    }
    free(e->key);
    free(e->mask);
    c->used += e->len == 0;
    *e = (struct gr_entry){h, s->len, (int32_t)(max_dist < INT32_MAX ? max_dist : INT32_MAX),
                           key, m};
    pthread_mutex_unlock(&g->lock);
}

/* ==== the matcher ======================================================================= */

struct gr_matcher {
    const struct kli_grammar *g;
    int32_t n_vocab;            /* the sampler's (may exceed the tokenizer's) */
    int32_t n_words;
    int32_t budget;             /* tokens left */
    int stuck;
    struct gr_state st;
    struct gr_state *walk;      /* [trie.max_len + 1] */
    struct gr_frame *top;       /* [trie.max_len + 1] the light walk's top frames */
    uint8_t *light;             /* [trie.max_len + 1] whether depth d is light */
    uint64_t *mask;
};

void
gr_matcher_free(struct gr_matcher *m)
{
    if (m == NULL)
        return;
    free(m->walk);
    free(m->top);
    free(m->light);
    free(m->mask);
    free(m);
}

void
gr_matcher_reset(struct gr_matcher *m, int32_t budget)
{
    struct gr_cfg c;

    c.depth = 0;
    gr_push(&c, m->g->root);
    gr_state_init(&m->st);
    gr_state_add(&m->st, &c);
    m->budget = budget;
    m->stuck = 0;
}

int
gr_matcher_create(struct gr_matcher **out, const struct kli_grammar *g, int32_t n_vocab,
                  struct kli_err *err)
{
    struct gr_matcher *m = k_calloc(1, sizeof(*m));

    *out = NULL;
    if (m == NULL)
        goto fail;
    m->g = g;
    m->n_vocab = n_vocab;
    m->n_words = (n_vocab + 63) / 64;
    m->walk = k_mallocarray((size_t)g->trie->max_len + 1, sizeof(struct gr_state));
    m->top = k_mallocarray((size_t)g->trie->max_len + 1, sizeof(struct gr_frame));
    m->light = k_calloc((size_t)g->trie->max_len + 1, 1);
    m->mask = k_calloc((size_t)m->n_words, sizeof(uint64_t));
    if (m->walk == NULL || m->top == NULL || m->light == NULL || m->mask == NULL)
        goto fail;
    gr_matcher_reset(m, INT32_MAX);
    *out = m;
    return KLI_OK;
fail:
    gr_matcher_free(m);
    return err_set(err, KLI_E_NOMEM, "out of memory");
}

int
gr_matcher_status(const struct gr_matcher *m)
{
    int32_t n;

    if (m->stuck)
        return -1;
    if (gr_state_done(&m->st))
        return 1;
    memcpy(&n, m->st.b, 4);
    return n > 0 ? 0 : -1;
}

kli_token
gr_matcher_end(const struct gr_matcher *m)
{
    return m->g->end;
}

int64_t
gr_matcher_dist(const struct gr_matcher *m)
{
    return gr_state_dist(m->g, &m->st);
}

static uint64_t
gr_hash(const struct gr_state *s)
{
    return util_fnv1a(UTIL_FNV_BASIS, s->b, (size_t)s->len);
}

/* The walk over the trie from state st: allowed tokens into mask (cleared first) whose
 * distance left is at most limit. @return the largest such distance, or -1 for none.
 *
 * A state of one configuration walks light: while the bytes only change its top frame (a
 * string's characters, a number's digits, a key's letters), depth d keeps that frame alone
 * (top[d]) instead of a whole state; the first byte that pops, pushes or forks makes the
 * parent's state whole again and its subtree walks as usual. */
static int64_t
gr_walk(struct gr_matcher *m, int64_t limit)
{
    const struct kli_grammar *g = m->g;
    const struct gr_trie *t = g->trie;
    int64_t max_dist = -1, below = 0;
    struct gr_cfg base;
    int32_t n_cfg;

    memset(m->mask, 0, (size_t)m->n_words * sizeof(uint64_t));
    m->walk[0] = m->st;
    memcpy(&n_cfg, m->st.b, 4);
    m->light[0] = 0;
    if (n_cfg == 1) {
        gr_cfg_load(&base, m->st.b + 4);
        if (base.depth > 0) {
            base.depth--;
            below = gr_cfg_dist(g, &base);   /* the frames under the top */
            m->top[0] = base.fr[base.depth];
            m->light[0] = below < GR_INF;
        }
    }
    for (int32_t i = 0; i < t->n;) {
        int d = t->depth[i], took = 0;
        int64_t e = -1;
        if (m->light[d - 1]) {
            struct gr_frame f = m->top[d - 1];
            int32_t child;
            int r = gr_step(g, &f, t->byte[i], &child);
            if (r == R_DEAD) {
                i = t->skip[i];
                continue;
            }
            if (r == R_TAKE) {
                m->top[d] = f;
                m->light[d] = 1;
                took = 1;
                if (t->tok[i] >= 0)
                    e = gr_add64(below, gr_frame_dist(g, &f));
            } else {   /* the parent's state whole, then as below */
                base.fr[base.depth] = m->top[d - 1];
                base.depth++;
                gr_state_init(&m->walk[d - 1]);
                gr_state_add(&m->walk[d - 1], &base);
                base.depth--;
            }
        }
        if (!took) {
            m->light[d] = 0;
            if (gr_feed(g, &m->walk[d - 1], t->byte[i], &m->walk[d]) == 0) {
                i = t->skip[i];
                continue;
            }
            if (t->tok[i] >= 0)
                e = gr_state_dist(g, &m->walk[d]);
        }
        if (t->tok[i] >= 0) {
            if (e <= limit) {
                for (int32_t id = t->tok[i]; id >= 0; id = t->dup[id]) {
                    if (id < m->n_vocab)
                        m->mask[id / 64] |= 1ull << (id % 64);
                }
                max_dist = e > max_dist ? e : max_dist;
            } else if (e >= GR_INF) {
                i = t->skip[i];   /* no completion now, none after more bytes */
                continue;
            }
        }
        i++;
    }
    return max_dist;
}

const uint64_t *
gr_matcher_mask(struct gr_matcher *m)
{
    struct kli_grammar *g = (struct kli_grammar *)m->g;   /* the cache is shared */
    int64_t limit = (int64_t)m->budget - 1, max_dist;
    int any = 0;

    if (m->stuck || gr_state_done(&m->st))
        return NULL;
    uint64_t h = gr_hash(&m->st);
    if (!gr_cache_get(g, &m->st, h, limit, m->mask, m->n_words)) {
        max_dist = gr_walk(m, GR_INF - 1);
        gr_cache_put(g, &m->st, h, max_dist, m->mask, m->n_words);
        if (max_dist > limit)   /* the budget cuts: walk again, within it */
            gr_walk(m, limit);
    }
    if (gr_state_dist(g, &m->st) == 0) {   /* the value may end here */
        for (int i = 0; i < 3; i++) {
            kli_token e = g->ends[i];
            if (e >= 0 && e < m->n_vocab)
                m->mask[e / 64] |= 1ull << (e % 64);
        }
    }
    for (int32_t w = 0; w < m->n_words && !any; w++)
        any = m->mask[w] != 0;
    return any ? m->mask : NULL;
}

void
gr_matcher_mask_plain(struct gr_matcher *m, uint64_t *mask)
{
    const struct kli_grammar *g = m->g;
    int64_t limit = (int64_t)m->budget - 1;

    memset(mask, 0, (size_t)m->n_words * sizeof(uint64_t));
    for (int32_t id = 0; id < m->n_vocab && id < g->n_vocab; id++) {
        size_t len;
        const char *p = id < kli_tokenizer_n_base(g->tok) ? kli_token_bytes(g->tok, id, &len) :
                        NULL;
        struct gr_state *a = &m->walk[0], *b = &m->walk[1];
        int live = p != NULL && len > 0 && len <= 255;
        *a = m->st;
        for (size_t i = 0; live && i < len; i++) {
            live = gr_feed(g, a, (unsigned char)p[i], b) > 0;
            struct gr_state *t = a;
            a = b;
            b = t;
        }
        if (live && gr_state_dist(g, a) <= limit)
            mask[id / 64] |= 1ull << (id % 64);
    }
    if (!gr_state_done(&m->st) && gr_state_dist(g, &m->st) == 0) {
        for (int i = 0; i < 3; i++) {
            if (g->ends[i] >= 0 && g->ends[i] < m->n_vocab)
                mask[g->ends[i] / 64] |= 1ull << (g->ends[i] % 64);
        }
    }
}

int
gr_matcher_feed(struct gr_matcher *m, const char *s, size_t n)
{
    struct gr_state *a = &m->walk[0], *b = &m->walk[1];

    *a = m->st;
    for (size_t i = 0; i < n; i++) {
        if (gr_feed(m->g, a, (unsigned char)s[i], b) == 0)
            return -1;
        struct gr_state *t = a;
        a = b;
        b = t;
    }
    if (gr_state_dist(m->g, a) >= GR_INF)
        return -1;
    m->st = *a;
    return 0;
}

void
gr_matcher_accept(struct gr_matcher *m, kli_token t)
{
    const struct kli_grammar *g = m->g;
    size_t len = 0;
    const char *p = NULL;
    int end = 0;

    for (int i = 0; i < 3; i++)
        end |= t >= 0 && t == g->ends[i];
    if (m->budget > 0)
        m->budget--;
    if (end) {
        if (gr_state_dist(g, &m->st) != 0)
            m->stuck = 1;
        else {   /* the value ends here: the configurations that may, popped */
            struct gr_cfg c;
            c.depth = 0;
            gr_state_init(&m->st);
            gr_state_add(&m->st, &c);
        }
        return;
    }
    if (t >= 0 && t < g->n_vocab)
        p = kli_token_bytes(g->tok, t, &len);
    if (p == NULL || len == 0 || gr_matcher_feed(m, p, len) != 0)
        m->stuck = 1;
}

/* ==== the public grammar ================================================================ */

void
kli_grammar_free(struct kli_grammar *g)
{
    if (g == NULL)
        return;
    for (int32_t i = 0; i < g->n_props; i++)
        free(g->props[i].lit);
    for (int32_t i = 0; i < g->n_lits; i++)
        free(g->lits[i].s);
    free(g->nodes);
    free(g->props);
    free(g->alts);
    free(g->lits);
    free(g->res);
    if (g->cache != NULL) {
        gr_cache_clear(g->cache);
        free(g->cache);
        pthread_mutex_destroy(&g->lock);
    }
    free(g);
}

int
kli_grammar_create(struct kli_grammar **out, const struct kli_tokenizer *tok,
                   const char *schema, size_t len, struct kli_err *err)
{
    struct kli_grammar *g;
    int rc;

    if (out == NULL || tok == NULL)
        return err_set(err, KLI_E_INVALID, "kli_grammar_create: invalid arguments");
    *out = NULL;
    if ((g = k_calloc(1, sizeof(*g))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    g->tok = tok;
    g->n_vocab = kli_tokenizer_n_vocab(tok);
    tokenizer_end_tokens(tok, -1, g->ends);
    g->end = g->ends[1] >= 0 ? g->ends[1] : g->ends[2];
    if (g->end < 0) {
        rc = err_set(err, KLI_E_UNSUPPORTED, "kli_grammar_create: the tokenizer has no end "
                     "token (<|im_end|> or [EOS])");
        goto fail;
    }
    if ((rc = schema_compile(g, schema, len, err)) != KLI_OK)
        goto fail;
    if ((g->cache = k_calloc(1, sizeof(*g->cache))) != NULL)
        g->cache->n_words = (g->n_vocab + 63) / 64;
    if (g->cache == NULL || (g->trie = gr_trie_get(tok)) == NULL) {
        free(g->cache);
        g->cache = NULL;
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto fail;
    }
    pthread_mutex_init(&g->lock, NULL);
    *out = g;
    return KLI_OK;
fail:
    kli_grammar_free(g);
    return rc;
}
