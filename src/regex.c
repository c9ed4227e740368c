/*
 * regex.c - the "simple patterns" of JSON Schema strings, compiled to a position automaton
 * (Glushkov's construction) of at most GR_RX_MAX positions, so that a set of positions fits
 * a uint64_t and a step is an OR of follow sets and an AND with the positions a byte may
 * take.
 *
 * The syntax: literal characters, ".", escapes (\d \w \s \D \W \S and escaped
 * punctuation), classes ([a-z0-9_], [^...]), groups ((...) and (?:...)), alternation, the
 * quantifiers * + ? {n} {n,} {n,m} (a lazy ? after one is accepted: the language is the
 * same), and ^ and $ at the ends. As in JSON Schema the pattern is searched for: without
 * ^ (or $) anything may come before (or after) the match. Only printable ASCII other than
 * " and \ is ever written into such a string, so a pattern is matched byte by byte.
 */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "grammar.h"

struct rx {
    struct gr_regex *r;
    const char *p, *end;
    char *msg;
    size_t cap;
};

/* A fragment: its first and last positions, and whether it matches the empty string. */
struct rx_frag {
    uint64_t first, last;
    int nullable;
};

static int
rx_fail(struct rx *x, const char *what)
{
    snprintf(x->msg, x->cap, "pattern: %s", what);
    return -1;
}

/* Bytes a string under a pattern may hold. */
static int
rx_allowed(int c)
{
    return c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
}

/* A new position taking the bytes of class[2] (bit c of the 128). */
static int
rx_pos(struct rx *x, const uint64_t cls[2], struct rx_frag *f)
{
    int p = x->r->n;

    if (p == GR_RX_MAX)
        return rx_fail(x, "too complex (more than 63 character positions)");
    x->r->n++;
    for (int c = 0; c < 128; c++) {
        if (((cls[c / 64] >> (c % 64)) & 1) && rx_allowed(c))
            x->r->on[c] |= 1ull << p;
    }
    x->r->follow[p] = 0;
    f->first = f->last = 1ull << p;
    f->nullable = 0;
    return 0;
}

static void
rx_set(uint64_t cls[2], int c)
{
    cls[c / 64] |= 1ull << (c % 64);
}

static void
rx_range(uint64_t cls[2], int lo, int hi)
{
    for (int c = lo; c <= hi; c++)
        rx_set(cls, c);
}

/* \d \w \s and their complements into cls; @return 1 if e was one. */
static int
rx_shorthand(uint64_t cls[2], int e)
{
    uint64_t t[2] = {0, 0};

    switch (e | 0x20) {
    case 'd':
        rx_range(t, '0', '9');
        break;
    case 'w':
        rx_range(t, '0', '9');
        rx_range(t, 'a', 'z');
        rx_range(t, 'A', 'Z');
        rx_set(t, '_');
        break;
    case 's':
        rx_range(t, 9, 13);
        rx_set(t, ' ');
        break;
    default:
        return 0;
    }
    if (e >= 'A' && e <= 'Z') {
        t[0] = ~t[0];
        t[1] = ~t[1];
    }
    cls[0] |= t[0];
    cls[1] |= t[1];
    return 1;
}

/* An escaped character (after the backslash) as a literal, or -1 for one not supported. */
static int
rx_escape_char(int e)
{
    switch (e) {
    case 'n': return '\n';
    case 't': return '\t';
    case 'r': return '\r';
    case 'f': return '\f';
    case 'v': return '\v';
    default:
        return e >= 0x20 && e < 0x7f && !((e >= '0' && e <= '9') || (e >= 'a' && e <= 'z') ||
                                          (e >= 'A' && e <= 'Z')) ? e : -1;
    }
}

static int rx_alt(struct rx *x, struct rx_frag *f);

static int
rx_class(struct rx *x, uint64_t cls[2])
{
    int neg = 0, prev = -1;

    if (x->p < x->end && *x->p == '^') {
        neg = 1;
        x->p++;
    }
    for (int first = 1;; first = 0) {
        int c;
        if (x->p >= x->end)
            return rx_fail(x, "a [ without its ]");
        c = (unsigned char)*x->p++;
        if (c == ']' && !first)
            break;
        if (c >= 0x80)
            return rx_fail(x, "only ASCII is supported");
        if (c == '\\') {
            if (x->p >= x->end)
                return rx_fail(x, "a \\ at the end");
            int e = (unsigned char)*x->p++;
            if (rx_shorthand(cls, e)) {
                prev = -1;
                continue;
            }
            if ((c = rx_escape_char(e)) < 0)
                return rx_fail(x, "an escape it does not support");
        }
        if (c == '-' && prev >= 0 && x->p < x->end && *x->p != ']') {
            int hi = (unsigned char)*x->p++;
            if (hi == '\\') {
                if (x->p >= x->end || (hi = rx_escape_char((unsigned char)*x->p++)) < 0)
                    return rx_fail(x, "an escape it does not support");
            }
            if (hi < prev || hi >= 0x80)
                return rx_fail(x, "a range out of order or outside ASCII");
            rx_range(cls, prev, hi);
            prev = -1;
            continue;
        }
        rx_set(cls, c);
        prev = c;
    }
    if (neg) {
        cls[0] = ~cls[0];
        cls[1] = ~cls[1];
    }
    return 0;
}

static int
rx_atom(struct rx *x, struct rx_frag *f)
{
    uint64_t cls[2] = {0, 0};
    int c = (unsigned char)*x->p++;

    switch (c) {
    case '(':
        if (x->end - x->p >= 2 && x->p[0] == '?') {
            if (x->p[1] != ':')
                return rx_fail(x, "lookarounds and named groups are not supported");
            x->p += 2;
        }
        if (rx_alt(x, f) != 0)
            return -1;
        if (x->p >= x->end || *x->p != ')')
            return rx_fail(x, "a ( without its )");
        x->p++;
        return 0;
    case '[':
        if (rx_class(x, cls) != 0)
            return -1;
        break;
    case '.':
        cls[0] = ~0ull;
        cls[1] = ~0ull;
        cls[0] &= ~(1ull << '\n');
        break;
    case '\\':
        if (x->p >= x->end)
            return rx_fail(x, "a \\ at the end");
        c = (unsigned char)*x->p++;
        if (!rx_shorthand(cls, c)) {
            if ((c = rx_escape_char(c)) < 0)
                return rx_fail(x, "an escape it does not support (backreferences, \\b, ...)");
            rx_set(cls, c);
        }
        break;
    case '^':
    case '$':
        return rx_fail(x, "^ and $ are supported at the ends of the pattern only");
    case '*':
    case '+':
    case '?':
    case '{':
        return rx_fail(x, "a quantifier without anything to repeat");
    default:
        if (c >= 0x80)
            return rx_fail(x, "only ASCII is supported");
        rx_set(cls, c);
    }
    return rx_pos(x, cls, f);
}

/* f := f followed by g. */
static void
rx_concat(struct rx *x, struct rx_frag *f, const struct rx_frag *g)
{
    for (int p = 0; p < x->r->n; p++) {
        if ((f->last >> p) & 1)
            x->r->follow[p] |= g->first;
    }
    f->first |= f->nullable ? g->first : 0;
    f->last = g->last | (g->nullable ? f->last : 0);
    f->nullable &= g->nullable;
}

/* f := f repeated (the loop of * and +). */
static void
rx_loop(struct rx *x, struct rx_frag *f)
{
    for (int p = 0; p < x->r->n; p++) {
        if ((f->last >> p) & 1)
            x->r->follow[p] |= f->first;
    }
}

/* {n}, {n,}, {n,m}: @return 0 with *lo, *hi (-1: no bound), 1 when `{` starts no
 * quantifier, -1 after an error. */
static int
rx_braces(struct rx *x, int *lo, int *hi)
{
    const char *q = x->p + 1;
    int a = 0, b, digits = 0;

    while (q < x->end && *q >= '0' && *q <= '9' && a < 1000) {
        a = a * 10 + (*q++ - '0');
        digits++;
    }
    if (digits == 0)
        return 1;
    b = a;
    if (q < x->end && *q == ',') {
        q++;
        b = -1;
        if (q < x->end && *q >= '0' && *q <= '9') {
            b = 0;
            while (q < x->end && *q >= '0' && *q <= '9' && b < 1000)
                b = b * 10 + (*q++ - '0');
        }
    }
    if (q >= x->end || *q != '}')
        return 1;
    if ((b >= 0 && b < a) || a > 32 || b > 32)
        return rx_fail(x, "a {n,m} out of order or over 32");
    x->p = q + 1;
    *lo = a;
    *hi = b;
    return 0;
}

static int
rx_rep(struct rx *x, struct rx_frag *f)
{
    const char *start = x->p;

    if (rx_atom(x, f) != 0)
        return -1;
    const char *stop = x->p;
    while (x->p < x->end) {
        int c = *x->p, lo, hi, r;
        if (c == '*' || c == '+') {
            rx_loop(x, f);
            f->nullable |= c == '*';
            x->p++;
        } else if (c == '?') {
            f->nullable = 1;
            x->p++;
        } else if (c == '{' && (r = rx_braces(x, &lo, &hi)) <= 0) {
            if (r < 0)
                return -1;
            /* x{lo,hi}: lo copies, then hi - lo optional ones (or one looped) */
            struct rx_frag acc = {0, 0, 1}, g;
            const char *after = x->p;
            int n = hi < 0 ? lo + 1 : hi;
            for (int i = 0; i < n; i++) {
                x->p = start;
                const char *save = x->end;
                x->end = stop;
                int rc = i == 0 ? (g = *f, 0) : rx_atom(x, &g);
                x->end = save;
                if (rc != 0)
                    return -1;
                if (i >= lo)
                    g.nullable = 1;
                if (hi < 0 && i == lo)
                    rx_loop(x, &g);
                rx_concat(x, &acc, &g);
            }
            x->p = after;
            *f = acc;
        } else {
            break;
        }
        if (x->p < x->end && *x->p == '?')   /* lazy: the same language */
            x->p++;
    }
    return 0;
}

static int
rx_seq(struct rx *x, struct rx_frag *f)
{
    struct rx_frag g;

    *f = (struct rx_frag){0, 0, 1};
    while (x->p < x->end && *x->p != '|' && *x->p != ')') {
        if (rx_rep(x, &g) != 0)
            return -1;
        rx_concat(x, f, &g);
    }
    return 0;
}

static int
rx_alt(struct rx *x, struct rx_frag *f)
{
    struct rx_frag g;

    if (rx_seq(x, f) != 0)
        return -1;
    while (x->p < x->end && *x->p == '|') {
        x->p++;
        if (rx_seq(x, &g) != 0)
            return -1;
        f->first |= g.first;
        f->last |= g.last;
        f->nullable |= g.nullable;
    }
    return 0;
}

/* Any byte, repeated: what an unanchored end may add. */
static int
rx_any_loop(struct rx *x, struct rx_frag *f)
{
    const uint64_t all[2] = {~0ull, ~0ull};

    if (rx_pos(x, all, f) != 0)
        return -1;
    rx_loop(x, f);
    f->nullable = 1;
    return 0;
}

int
rx_compile(struct gr_regex *r, const char *pat, size_t len, char *msg, size_t cap)
{
    struct rx x = {r, pat, pat + len, msg, cap};
    struct rx_frag f = {0, 0, 1}, g;
    int head = len > 0 && pat[0] == '^';
    int tail = len > (size_t)head && pat[len - 1] == '$' && (len < 2 || pat[len - 2] != '\\');

    memset(r, 0, sizeof(*r));
    r->n = 1;   /* position 0: the start */
    x.p += head;
    x.end -= tail;
    for (const char *q = x.p; q < x.end; q++) {
        if (*q == '|' && (head || tail)) {
            /* ^a|b$ is (^a)|(b$): refused rather than read as ^(a|b)$ */
            int depth = 0;
            for (const char *s = x.p; s < q; s++)
                depth += *s == '(' ? 1 : *s == ')' ? -1 : 0;
            if (depth == 0)
                return rx_fail(&x, "^ or $ beside a top-level | (put the alternatives "
                               "in a group)");
        }
    }
    if (!head && rx_any_loop(&x, &f) != 0)
        return -1;
    if (rx_alt(&x, &g) != 0)
        return -1;
    if (x.p != x.end)
        return rx_fail(&x, "a ) without its (");
    rx_concat(&x, &f, &g);
    if (!tail) {
        if (rx_any_loop(&x, &g) != 0)
            return -1;
        rx_concat(&x, &f, &g);
    }
    r->follow[0] = f.first;
    r->accept = f.last | (f.nullable ? 1ull : 0);
    /* the fewest bytes from each position to an accepting one */
    for (int p = 0; p < r->n; p++)
        r->dist[p] = ((r->accept >> p) & 1) ? 0 : GR_INF;
    uint64_t live = 0;
    for (int c = 0; c < 128; c++)
        live |= r->on[c];
    for (int changed = 1; changed;) {
        changed = 0;
        for (int p = 0; p < r->n; p++) {
            uint64_t nx = r->follow[p] & live;
            for (int q = 0; q < r->n; q++) {
                if (((nx >> q) & 1) && r->dist[q] < GR_INF && r->dist[q] + 1 < r->dist[p]) {
                    r->dist[p] = r->dist[q] + 1;
                    changed = 1;
                }
            }
        }
    }
    if (r->dist[0] >= GR_INF)
        return rx_fail(&x, "no string of printable ASCII (without \" and \\) matches it");
    return 0;
}

uint64_t
rx_step(const struct gr_regex *r, uint64_t set, int c)
{
    uint64_t next = 0;

    if (c < 0 || c >= 128)
        return 0;
    for (uint64_t s = set; s != 0; s &= s - 1)
        next |= r->follow[__builtin_ctzll(s)];
    return next & r->on[c];
}

int32_t
rx_dist(const struct gr_regex *r, uint64_t set)
{
    int32_t d = GR_INF;

    for (uint64_t s = set; s != 0; s &= s - 1) {
        int p = __builtin_ctzll(s);
        d = r->dist[p] < d ? r->dist[p] : d;
    }
    return d;
}
