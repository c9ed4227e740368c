/* logits-cmp: compare two n x V float32 logit files (row per position).
 * usage: logits-cmp A.f32 B.f32 V
 * prints: max |A-B|, max and median over positions of ||A_i-B_i||2/||B_i||2,
 * top-1 agreement (positions whose argmax is the same) out of n. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static float *load(const char *p, long *n) {
    FILE *f = fopen(p, "rb");
    if (!f) { perror(p); exit(1); }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *v = malloc(sz);
    if (fread(v, 1, sz, f) != (size_t)sz) { perror(p); exit(1); }
    fclose(f);
    *n = sz / 4;
    return v;
}

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: logits-cmp A B V\n"); return 2; }
    long na, nb, V = atol(argv[3]);
    float *a = load(argv[1], &na), *b = load(argv[2], &nb);
    if (na != nb || V <= 0 || na % V) { fprintf(stderr, "logits-cmp: sizes differ (%ld vs %ld floats)\n", na, nb); return 1; }
    long n = na / V;
    double maxabs = 0, *rel = malloc(n * sizeof *rel);
    int agree = 0;
    for (long i = 0; i < n; i++) {
        const float *x = a + i * V, *y = b + i * V;
        double d2 = 0, y2 = 0;
        long ax = 0, ay = 0;
        for (long j = 0; j < V; j++) {
            double d = (double)x[j] - y[j];
            if (!isfinite(x[j]) || !isfinite(y[j])) { fprintf(stderr, "logits-cmp: non-finite at %ld,%ld\n", i, j); return 1; }
            if (fabs(d) > maxabs) maxabs = fabs(d);
            d2 += d * d;
            y2 += (double)y[j] * y[j];
            if (x[j] > x[ax]) ax = j;
            if (y[j] > y[ay]) ay = j;
        }
        rel[i] = sqrt(d2 / (y2 > 0 ? y2 : 1));
        agree += ax == ay;
    }
    qsort(rel, n, sizeof *rel, cmpd);
    printf("max_abs=%.3g max_relL2=%.3g median_relL2=%.3g top1=%d/%ld\n", maxabs, rel[n - 1], rel[n / 2], agree, n);
    return 0;
}
