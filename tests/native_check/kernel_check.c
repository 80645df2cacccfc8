/* kernel_check: chatforge's C kernels as one variant builds them against the
 * plain-C build of the same sources, in one program, on deterministic
 * pseudo-random inputs. What tests/test_kernels_arm.py builds for the ARM
 * variants (aarch64-linux-gnu-gcc -static, run under qemu-aarch64) and for this
 * machine's own:
 *
 *   cc -O3 <variant flags> -fopenmp -I<kernels> kernel_check.c kernels_under_test.c \
 *      kernels_plain.c -lm -o kernel_check
 *
 * Checks, exiting 1 at the first failure:
 * - exact: the quantised linears (kinds 5, 8, 9; rows 1-13 around the tile sizes,
 *   partial groups of 16 weight rows, bias or none, 1 or 2 threads) and their
 *   dequantisation, byte for byte against plain C;
 * - close: the fp32 linear (kind 32), the norms and the forward pass of a tiny
 *   Llama (int4, GQA, RoPE, paged cache, a LoRA row) and GPT-2 (int8, biases),
 *   whose float sums a vector build may order differently (as AVX2 does).
 * Prints "isa <variant>", "exact <hash of every exact output>" (the same on every
 * machine and variant: the test compares x86 with ARM) and "ok".
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* kernels_plain.c's names for the plain-C build. */
int plain_cf_qlinear(int kind, const float *x, int64_t M, int64_t K, const void *w,
                     const void *scales, const float *bias, int64_t N, float *y, int threads);
void plain_cf_dequantize(int kind, const void *w, const void *scales, int64_t N, int64_t K,
                         float *out, int threads);
void plain_cf_norm(const float *x, const float *w, const float *b, float eps, int64_t R,
                   int64_t H, float *y);
int plain_cf_forward(const cf_model *m, float *x, int64_t R, const int64_t *pos,
                     const int32_t *seq, const int32_t *tables, int64_t max_blocks, int threads,
                     const int32_t *row_lora, const cf_lora *loras);
const char *plain_cf_isa(void);

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float uniform(void) { /* [-1, 1), a multiple of 2^-23 */
    return (float)(int32_t)(next() >> 40) / 8388608.f - 1.f;
}

/* An fp16 scale: mostly normal values 2^-8..2^0, sometimes subnormal or zero;
 * negative where `sign` (Q4_1's m). */
static uint16_t half(int sign) {
    const uint64_t r = next();
    const uint16_t man = (uint16_t)(r & 0x3ff), s = sign && (r & 0x400) ? 0x8000 : 0;
    const unsigned pick = (unsigned)(r >> 11) % 64;
    if (pick == 0) return s;                /* zero */
    if (pick == 1) return (uint16_t)(s | man); /* subnormal */
    return (uint16_t)(s | ((7 + (r >> 20) % 9) << 10) | man);
}

static void *alloc(size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static uint64_t digest = 0xcbf29ce484222325ull; /* FNV-1a over every exact output */
static long exact_values = 0;

static void hash(const void *p, size_t bytes) {
    const unsigned char *b = p;
    for (size_t i = 0; i < bytes; i++) digest = (digest ^ b[i]) * 0x100000001b3ull;
}

static void fail(const char *what) {
    fprintf(stderr, "FAIL %s\n", what);
    exit(1);
}

/* got against want byte for byte (then hashed), or fail naming the first difference. */
static void same(const float *got, const float *want, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        if (memcmp(got + i, want + i, 4)) {
            fprintf(stderr, "FAIL %s: [%lld] %.9g != plain C's %.9g\n", what, (long long)i,
                    got[i], want[i]);
            exit(1);
        }
    hash(got, (size_t)n * 4);
    exact_values += n;
}

static double worst = 0.; /* the largest relative difference of the float checks */

/* got close to want: |got - want| / |want| over the whole array (norms), at most tol. */
static void close_to(const float *got, const float *want, int64_t n, double tol,
                     const char *what) {
    double d = 0., w = 0.;
    for (int64_t i = 0; i < n; i++) {
        d += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        w += (double)want[i] * want[i];
        if (!isfinite(got[i])) fail(what);
    }
    const double rel = w > 0. ? sqrt(d / w) : sqrt(d);
    if (rel > worst) worst = rel;
    if (rel > tol) {
        fprintf(stderr, "FAIL %s: relative difference %.3g > %.3g\n", what, rel, tol);
        exit(1);
    }
}

/* Activations (M, K): blocks of every sort the quantiser meets. */
static void activations(float *x, int64_t M, int64_t K) {
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform();
    for (int64_t b = 0; b < M * K / 32; b++) {
        float *v = x + 32 * b;
        const int sort = (int)(next() % 8);
        if (sort == 0) { /* zeros: d = 0 */
            for (int j = 0; j < 32; j++) v[j] = j % 2 ? 0.f : -0.f;
        } else if (sort == 1) { /* amax 127, d = 1: halves round to even (x1) */
            for (int j = 0; j < 32; j++) v[j] = (float)((int)(next() % 254) - 127) + 0.5f;
            v[0] = 127.f;
        } else if (sort == 2) { /* d = 1: residuals of 1/256, ties of x2 */
            for (int j = 0; j < 32; j++)
                v[j] = (float)((int)(next() % 200) - 100) + (float)(next() % 3) / 256.f;
            v[5] = -127.f;
        } else if (sort == 3) { /* one outlier */
            for (int j = 0; j < 32; j++) v[j] *= 1e-3f;
            v[next() % 32] = 300.f;
        } else if (sort == 4) { /* large and tiny scales */
            const float s = next() % 2 ? 1e4f : 1e-6f;
            for (int j = 0; j < 32; j++) v[j] *= s;
        }
    }
}

/* A quantised weight (N, K) of `kind` in its packed layout (kernels.h): the bytes of
 * any layout are valid weights, so random ones; scales as the kind stores them. */
static void weight(int kind, int64_t N, int64_t K, uint8_t **w, void **scales) {
    const int64_t G = (N + 15) / 16, nb = K / QK;
    const int64_t bytes = G * nb * (kind == 5 ? 256 : 512);
    *w = alloc((size_t)bytes);
    for (int64_t i = 0; i < bytes; i++) (*w)[i] = (uint8_t)next();
    if (kind == 9) {
        float *s = alloc((size_t)N * 4);
        for (int64_t i = 0; i < N; i++) s[i] = (uniform() + 1.5f) * 0.01f;
        *scales = s;
    } else {
        const int64_t n = G * nb * (kind == 5 ? 32 : 16);
        uint16_t *s = alloc((size_t)n * 2);
        for (int64_t i = 0; i < n; i++) s[i] = half(kind == 5 && (i / 16) % 2);
        *scales = s;
    }
}

static void check_quantised(void) {
    static const int kinds[] = {5, 8, 9};
    static const int64_t ns[] = {1, 16, 17, 37};
    static const int64_t ks[] = {32, 160};
    static const int64_t ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 13};
    char what[160];
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 2; c++) {
                const int kind = kinds[a];
                const int64_t N = ns[b], K = ks[c];
                uint8_t *w;
                void *scales;
                weight(kind, N, K, &w, &scales);
                float *bias = alloc((size_t)N * 4);
                for (int64_t i = 0; i < N; i++) bias[i] = uniform();
                float *deq = alloc((size_t)(N * K) * 4), *deq_ref = alloc((size_t)(N * K) * 4);
                cf_dequantize(kind, w, scales, N, K, deq, 2);
                plain_cf_dequantize(kind, w, scales, N, K, deq_ref, 1);
                snprintf(what, sizeof what, "dequantize kind %d N %lld K %lld", kind,
                         (long long)N, (long long)K);
                same(deq, deq_ref, N * K, what);
                for (int d = 0; d < 9; d++) {
                    const int64_t M = ms[d];
                    float *x = alloc((size_t)(M * K) * 4);
                    float *y = alloc((size_t)(M * N) * 4), *ref = alloc((size_t)(M * N) * 4);
                    activations(x, M, K);
                    const float *bs = d % 2 ? bias : NULL;
                    const int threads = 1 + d % 2;
                    snprintf(what, sizeof what, "qlinear kind %d N %lld K %lld M %lld", kind,
                             (long long)N, (long long)K, (long long)M);
                    if (cf_qlinear(kind, x, M, K, w, scales, bs, N, y, threads) ||
                        plain_cf_qlinear(kind, x, M, K, w, scales, bs, N, ref, 1))
                        fail(what);
                    same(y, ref, M * N, what);
                    free(x), free(y), free(ref);
                }
                free(w), free(scales), free(bias), free(deq), free(deq_ref);
            }
}

static void check_fp32_and_norms(void) {
    char what[120];
    for (int64_t N = 1; N <= 37; N += 9)
        for (int64_t M = 1; M <= 6; M++) {
            const int64_t K = 96;
            float *w = alloc((size_t)(N * K) * 4), *x = alloc((size_t)(M * K) * 4);
            float *bias = alloc((size_t)N * 4), *y = alloc((size_t)(M * N) * 4);
            float *ref = alloc((size_t)(M * N) * 4);
            for (int64_t i = 0; i < N * K; i++) w[i] = uniform();
            for (int64_t i = 0; i < M * K; i++) x[i] = uniform();
            for (int64_t i = 0; i < N; i++) bias[i] = uniform();
            snprintf(what, sizeof what, "qlinear kind 32 N %lld M %lld", (long long)N,
                     (long long)M);
            if (cf_qlinear(32, x, M, K, w, NULL, bias, N, y, 2) ||
                plain_cf_qlinear(32, x, M, K, w, NULL, bias, N, ref, 1))
                fail(what);
            close_to(y, ref, M * N, 1e-5, what);
            free(w), free(x), free(bias), free(y), free(ref);
        }
    const int64_t R = 5, H = 72;
    float *x = alloc(R * H * 4), *w = alloc(H * 4), *b = alloc(H * 4);
    float *y = alloc(R * H * 4), *ref = alloc(R * H * 4);
    for (int64_t i = 0; i < R * H; i++) x[i] = uniform() * 3.f;
    for (int64_t i = 0; i < H; i++) w[i] = uniform(), b[i] = uniform();
    for (int layer = 0; layer < 2; layer++) {
        cf_norm(x, w, layer ? b : NULL, 1e-5f, R, H, y);
        plain_cf_norm(x, w, layer ? b : NULL, 1e-5f, R, H, ref);
        close_to(y, ref, R * H, 1e-6, layer ? "LayerNorm" : "RMSNorm");
    }
    free(x), free(w), free(b), free(y), free(ref);
}

/* A tiny model with random weights, two copies of its KV cache (one per build). */
typedef struct {
    cf_model m;
    cf_layer layers[2];
    float *k[2][2], *v[2][2]; /* [build][layer] */
    float *rope;
    cf_lora loras[2 * 4]; /* one adapter: (1, n_layers, 4) */
} tiny;

static float *floats(int64_t n, float scale) {
    float *p = alloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = uniform() * scale;
    return p;
}

/* fp16 values of magnitude 2^-4..2^-2, either sign (as lora.py stores them, scaled). */
static uint16_t *halves(int64_t n) {
    uint16_t *p = alloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++)
        p[i] = (uint16_t)((next() % 2 ? 0x8000 : 0) | (0x2c00 + next() % 0x800));
    return p;
}

/* A random LoRA delta on a linear k -> n of rank r, B^T's rows over all n columns. */
static cf_lora lora(int64_t k, int64_t n, int64_t r) {
    int64_t *spans = alloc((size_t)r * 3 * 8);
    float *scales = alloc((size_t)r * 4);
    for (int64_t i = 0; i < r; i++)
        spans[3 * i] = 0, spans[3 * i + 1] = n, spans[3 * i + 2] = i * n, scales[i] = 0.25f;
    return (cf_lora){halves(k * r), halves(r * n), r, spans, scales};
}

static cf_lin linear(int kind, int64_t n, int64_t k, int bias) {
    cf_lin l = {kind, 0, NULL, NULL, NULL, n, k};
    uint8_t *w;
    void *s;
    weight(kind, n, k, &w, &s);
    /* weights of a real model's size (|w| < ~0.1), as the activations grow otherwise */
    if (kind == 5) /* d and m: 2^-8..2^-7 */
        for (int64_t i = 0; i < (n + 15) / 16 * (k / QK) * 32; i++)
            ((uint16_t *)s)[i] = (uint16_t)((i / 16 % 2 ? 0x8000 : 0) | (0x1c00 + next() % 0x400));
    else /* kind 9: s 2^-11..2^-10 */
        for (int64_t i = 0; i < n; i++) ((float *)s)[i] *= 0.05f;
    l.w = w, l.scales = s, l.bias = bias ? floats(n, 0.1f) : NULL;
    return l;
}

enum { BS = 4, NBLK = 10, MAXB = 5 };

static void make_tiny(tiny *t, int gpt2) {
    memset(t, 0, sizeof *t);
    const int H = 64, Hq = 4, Hkv = gpt2 ? 4 : 2, D = 16, I = 96, kind = gpt2 ? 9 : 5;
    t->m = (cf_model){2, H, Hq, Hkv, D, I, 1e-5f, gpt2, BS, t->layers, NULL, NULL, NULL};
    for (int li = 0; li < 2; li++) {
        cf_layer *L = &t->layers[li];
        L->norm1 = floats(H, 1.f), L->norm2 = floats(H, 1.f);
        L->norm1_b = gpt2 ? floats(H, 0.1f) : NULL, L->norm2_b = gpt2 ? floats(H, 0.1f) : NULL;
        L->qkv = linear(kind, (Hq + 2 * Hkv) * D, H, 1);
        L->out = linear(kind, H, Hq * D, gpt2);
        L->up = linear(kind, gpt2 ? I : 2 * I, H, gpt2);
        L->down = linear(kind, H, I, gpt2);
        for (int b = 0; b < 2; b++) {
            t->k[b][li] = alloc((size_t)NBLK * Hkv * BS * D * 4);
            t->v[b][li] = alloc((size_t)NBLK * Hkv * BS * D * 4);
        }
        if (!gpt2) { /* LoRA on qkv and down: ranks 11 and 37 (8-wide blocks and the rest) */
            const int64_t nqkv = (Hq + 2 * Hkv) * D;
            t->loras[li * 4 + 0] = lora(H, nqkv, 11);
            t->loras[li * 4 + 3] = lora(I, H, 37);
        }
    }
    if (!gpt2) {
        t->rope = alloc((size_t)NBLK * BS * D * 4);
        for (int p = 0; p < NBLK * BS; p++)
            for (int i = 0; i < D / 2; i++) {
                const double a = p * pow(10000., -2. * i / D);
                t->rope[(p * D / 2 + i) * 2] = (float)cos(a);
                t->rope[(p * D / 2 + i) * 2 + 1] = (float)sin(a);
            }
        t->m.rope = t->rope;
    }
}

static void check_forward(int gpt2) {
    tiny t;
    make_tiny(&t, gpt2);
    const int32_t tables[2 * MAXB] = {3, 0, 7, 1, 9, 5, 2, 8, 4, 6}; /* two sequences, paged */
    /* Calls: a prefill of both sequences (7 and 3 rows), a decode step of both, then a
     * chunk of 5 rows of the second. */
    static const int64_t rows[3] = {10, 2, 5};
    int64_t pos[3][10] = {{0, 1, 2, 3, 4, 5, 6, 0, 1, 2}, {7, 3}, {4, 5, 6, 7, 8}};
    int32_t seq[3][10] = {{0, 0, 0, 0, 0, 0, 0, 1, 1, 1}, {0, 1}, {1, 1, 1, 1, 1}};
    int32_t lora[3][10] = {{-1, -1, 0, -1, -1, -1, 0, 0, -1, 0}, {0, -1}, {-1, 0, 0, -1, 0}};
    char what[64];
    for (int call = 0; call < 3; call++) {
        const int64_t R = rows[call], n = R * t.m.hidden;
        float *x = floats(n, 1.f), *ref = alloc((size_t)n * 4);
        memcpy(ref, x, (size_t)n * 4);
        cf_model m = t.m;
        m.k_cache = t.k[0], m.v_cache = t.v[0];
        const int32_t *rl = gpt2 ? NULL : lora[call];
        const cf_lora *ls = gpt2 ? NULL : t.loras;
        if (cf_forward(&m, x, R, pos[call], seq[call], tables, MAXB, 2, rl, ls)) fail("forward");
        m.k_cache = t.k[1], m.v_cache = t.v[1];
        if (plain_cf_forward(&m, ref, R, pos[call], seq[call], tables, MAXB, 1, rl, ls))
            fail("forward");
        snprintf(what, sizeof what, "%s forward, call %d", gpt2 ? "gpt2" : "llama", call);
        close_to(x, ref, n, 1e-4, what);
        free(x), free(ref);
    }
}

int main(void) {
    if (strcmp(plain_cf_isa(), "generic")) fail("the reference build is not plain C");
    printf("isa %s\n", cf_isa());
    check_quantised();
    check_fp32_and_norms();
    check_forward(0);
    check_forward(1);
    printf("exact %016llx %ld\n", (unsigned long long)digest, exact_values);
    printf("close %.3g\n", worst);
    printf("ok\n");
    return 0;
}
