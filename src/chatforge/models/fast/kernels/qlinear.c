/* Weight-only quantised linear layers for decoding on a CPU: y = x W^T (+ b).
 *
 * Why our own: decoding reads every weight once per step, so the speed limit is
 * memory bandwidth (~29 GB/s on our 2-core machines). torch's CPU kernels
 * (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) reach ~9 GB/s and ~5 GB/s
 * there at batch 1; these stream the weights at the bandwidth, expanding each
 * to fp32 in registers and multiplying fp32 activations (AVX2 FMA).
 *
 * Why fp32 activations (not llama.cpp's int8-quantised ones): quantising the
 * activations of a 135M model per block of 32 flipped its greedy answers
 * ("capital of France" -> "L'Etoile ..."); with fp32 activations the only
 * error is the weights' (int8 +0.01 % perplexity). And every output is
 * reduced in one fixed order per row, so a row's result never depends on
 * the other rows (batch-invariant greedy decoding; see decode.c).
 *
 * Weight layouts (row-major, one row per output feature, K % 32 == 0):
 *   int8: q (N, K) int8 and one fp32 scale per row:        w = q * s[n]
 *   int4: q (N, K/2) uint8, two 4-bit values per byte; in each block of 32
 *         inputs byte j holds q[j] (low nibble) and q[j+16] (high nibble);
 *         per row, K/32 fp16 scales d then K/32 fp16 offsets m:  w = q * d + m
 * Rows of N are split over OpenMP threads (the same libgomp torch uses, so
 * one thread pool). Without AVX2 a plain C loop computes the same sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CF_AVX2 1
#endif
/* AVX-512 where the compiler targets it: 16 lanes, 32 registers (the weights'
 * expansion to fp32 is what bounds the speed at batch 1 with AVX2). */
#if defined(CF_AVX2) && defined(__AVX512F__)
#define CF_AVX512 1
#endif

#include "kernels.h"


int cf_has_avx2(void) {
#ifdef CF_AVX2
    return 1;
#else
    return 0;
#endif
}

static float fp16_to_fp32(uint16_t h) {
#ifdef CF_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) { /* zero or subnormal */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef CF_AVX2
/* The weight rows are read once, in short runs (a tile is a few KiB), too
 * short for the hardware prefetcher to ramp up: ask for the bytes two tiles
 * ahead while this tile computes (tile_bytes per tile, step bytes per block).
 * Prefetching past the end of the weight is harmless. */
static inline void prefetch_ahead(const void *p, int64_t tile_bytes, int step) {
    const char *a = (const char *)p + 2 * tile_bytes;
    for (int off = 0; off < step; off += 64) _mm_prefetch(a + off, _MM_HINT_T0);
}

/* 8 int8 weights -> 8 floats. */
static inline __m256 load_w8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 8 bytes of 0..15 values (the low 8 bytes of v) -> 8 floats. */
static inline __m256 u8_to_ps(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}
#endif

/* A tile of RN weight rows against RM activation rows. RN and RM are literals
 * at every call (see cf_linear), so after inlining the RN * RM accumulators
 * live in registers. Activations stay fp32 and each weight is expanded to fp32
 * in registers (w = q * s, or q * d + m), so the result is the dequantised
 * weight's product, up to fp32 rounding. Every output is reduced in one fixed
 * order (lane k % 8 in k order, then the lanes), whatever RN, RM, the number
 * of rows or threads: a row's result does not depend on the other rows.
 * Results go to out[r * RM + m]. */
#define INLINE static inline __attribute__((always_inline))

INLINE void tile_w8(const int8_t *w, const float *s, int64_t K, const float *x, int RN, int RM,
                    float *out) {
#if defined(CF_AVX512)
    __m512 acc[4][8];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        prefetch_ahead(w + b * RN * QK, RN * K, RN * QK);
        for (int64_t k = b * QK; k < (b + 1) * QK; k += 16) {
            __m512 xv[8];
            for (int m = 0; m < RM; m++) xv[m] = _mm512_loadu_ps(x + m * K + k);
            for (int r = 0; r < RN; r++) {
                const __m512 wv = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * K + k))));
                for (int m = 0; m < RM; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
            }
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = _mm512_reduce_add_ps(acc[r][m]) * s[r];
#elif defined(CF_AVX2)
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QK; b++) {
        prefetch_ahead(w + b * RN * QK, RN * K, RN * QK);
        for (int64_t k = b * QK; k < (b + 1) * QK; k += 8) {
            __m256 xv[4];
            for (int m = 0; m < RM; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < RN; r++) {
                const __m256 wv = load_w8(w + r * K + k);
                for (int m = 0; m < RM; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
            }
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = hsum(acc[r][m]) * s[r];
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += (float)w[r * K + k] * x[m * K + k];
            out[r * RM + m] = acc * s[r];
        }
#endif
}

/* dm: per weight row, nb fp16 scales d then nb fp16 offsets m. */
INLINE void tile_w4(const uint8_t *w, const uint16_t *dm, int64_t K, const float *x, int RN,
                    int RM, float *out) {
    const int64_t nb = K / QK;
#if defined(CF_AVX512)
    __m512 acc[4][8];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm512_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * RN * QK / 2, RN * K / 2, RN * QK / 2);
        __m512 xv[8][2];
        for (int m = 0; m < RM; m++)
            for (int j = 0; j < 2; j++) xv[m][j] = _mm512_loadu_ps(x + m * K + b * QK + 16 * j);
        for (int r = 0; r < RN; r++) {
            const uint16_t *p = dm + r * nb * 2;
            const __m512 d = _mm512_set1_ps(fp16_to_fp32(p[b])), mn = _mm512_set1_ps(fp16_to_fp32(p[nb + b]));
            const __m128i q = _mm_loadu_si128((const __m128i *)(w + r * K / 2 + b * QK / 2));
            const __m128i qa = _mm_and_si128(q, low), qb = _mm_and_si128(_mm_srli_epi16(q, 4), low);
            const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qa)), d, mn);
            const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qb)), d, mn);
            for (int m = 0; m < RM; m++) {
                acc[r][m] = _mm512_fmadd_ps(w0, xv[m][0], acc[r][m]);
                acc[r][m] = _mm512_fmadd_ps(w1, xv[m][1], acc[r][m]);
            }
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(CF_AVX2)
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * RN * QK / 2, RN * K / 2, RN * QK / 2);
        __m256 xv[4][4];
        for (int m = 0; m < RM; m++)
            for (int j = 0; j < 4; j++) xv[m][j] = _mm256_loadu_ps(x + m * K + b * QK + 8 * j);
        for (int r = 0; r < RN; r++) {
            const uint16_t *p = dm + r * nb * 2;
            const __m256 d = _mm256_set1_ps(fp16_to_fp32(p[b])), mn = _mm256_set1_ps(fp16_to_fp32(p[nb + b]));
            const __m128i q = _mm_loadu_si128((const __m128i *)(w + r * K / 2 + b * QK / 2));
            const __m128i qa = _mm_and_si128(q, low), qb = _mm_and_si128(_mm_srli_epi16(q, 4), low);
            __m256 wv[4];
            wv[0] = _mm256_fmadd_ps(u8_to_ps(qa), d, mn);
            wv[1] = _mm256_fmadd_ps(u8_to_ps(_mm_srli_si128(qa, 8)), d, mn);
            wv[2] = _mm256_fmadd_ps(u8_to_ps(qb), d, mn);
            wv[3] = _mm256_fmadd_ps(u8_to_ps(_mm_srli_si128(qb, 8)), d, mn);
            for (int j = 0; j < 4; j++)
                for (int m = 0; m < RM; m++) acc[r][m] = _mm256_fmadd_ps(wv[j], xv[m][j], acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = hsum(acc[r][m]);
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            const uint16_t *p = dm + r * nb * 2;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = w + r * K / 2 + b * QK / 2;
                const float d = fp16_to_fp32(p[b]), mn = fp16_to_fp32(p[nb + b]);
                for (int j = 0; j < QK / 2; j++) {
                    acc += ((float)(q[j] & 0x0f) * d + mn) * x[m * K + b * QK + j];
                    acc += ((float)(q[j] >> 4) * d + mn) * x[m * K + b * QK + j + QK / 2];
                }
            }
            out[r * RM + m] = acc;
        }
#endif
}

/* Dense fp32 weights (kind 32): the decode step of an unquantised model. */
INLINE void tile_f32(const float *w, int64_t K, const float *x, int RN, int RM, float *out) {
#if defined(CF_AVX512)
    __m512 acc[4][8];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 xv[8];
        for (int m = 0; m < RM; m++) xv[m] = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < RN; r++) {
            const __m512 wv = _mm512_loadu_ps(w + r * K + k);
            for (int m = 0; m < RM; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(CF_AVX2)
    __m256 acc[4][8]; /* RM goes up to 8 (the 5-8 row tiles), as in the AVX-512 path */
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[8];
        for (int m = 0; m < RM; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < RN; r++) {
            const __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int m = 0; m < RM; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = hsum(acc[r][m]);
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += w[r * K + k] * x[m * K + k];
            out[r * RM + m] = acc;
        }
#endif
}

/* Rows n..n+RN of y for activation rows m0..m0+RM. */
INLINE void tile(int kind, const void *w, const void *scales, const float *bias, int64_t K,
                 int64_t N, const float *x, int64_t n, int64_t m0, int RN, int RM, float *y) {
    const int64_t nb = K / QK;
    float out[32];
    if (kind == 32)
        tile_f32((const float *)w + n * K, K, x + m0 * K, RN, RM, out);
    else if (kind == 8)
        tile_w8((const int8_t *)w + n * K, (const float *)scales + n, K, x + m0 * K, RN, RM, out);
    else
        tile_w4((const uint8_t *)w + n * K / 2, (const uint16_t *)scales + n * nb * 2, K,
                x + m0 * K, RN, RM, out);
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++)
            y[(m0 + m) * N + n + r] = out[r * RM + m] + (bias ? bias[n + r] : 0.f);
}

#define TILES(RN)                                                           \
    for (int64_t m0 = 0; m0 < M; m0 += 4) {                                 \
        switch (M - m0 < 4 ? M - m0 : 4) {                                  \
        case 1: tile(kind, w, scales, bias, K, N, x, n, m0, RN, 1, y); break; \
        case 2: tile(kind, w, scales, bias, K, N, x, n, m0, RN, 2, y); break; \
        case 3: tile(kind, w, scales, bias, K, N, x, n, m0, RN, 3, y); break; \
        default: tile(kind, w, scales, bias, K, N, x, n, m0, RN, 4, y); break; \
        }                                                                   \
    }

/* 5 to 8 activation rows in one tile of 2 weight rows (AVX-512: 16 accumulators),
 * so each weight is expanded once for all of them. */
#define TILES8(RN)                                                          \
    switch (M) {                                                            \
    case 5: tile(kind, w, scales, bias, K, N, x, n, 0, RN, 5, y); break;    \
    case 6: tile(kind, w, scales, bias, K, N, x, n, 0, RN, 6, y); break;    \
    case 7: tile(kind, w, scales, bias, K, N, x, n, 0, RN, 7, y); break;    \
    default: tile(kind, w, scales, bias, K, N, x, n, 0, RN, 8, y); break;   \
    }

/* Row n of a quantised weight as the floats tile_w8 / tile_w4 expand it to
 * (int8: q itself, the scale is applied after the sum; int4: fma(q, d, m)), so
 * that tile_f32 over this row computes bit for bit what they compute. */
static void expand_row(int kind, const void *w, const void *scales, int64_t K, int64_t n,
                       float *out) {
    if (kind == 8) {
        const int8_t *q = (const int8_t *)w + n * K;
        for (int64_t k = 0; k < K; k++) out[k] = (float)q[k];
        return;
    }
    const int64_t nb = K / QK;
    const uint8_t *q = (const uint8_t *)w + n * K / 2;
    const uint16_t *dm = (const uint16_t *)scales + n * nb * 2;
    for (int64_t b = 0; b < nb; b++) {
        const float d = fp16_to_fp32(dm[b]), mn = fp16_to_fp32(dm[nb + b]);
        for (int j = 0; j < QK / 2; j++) {
            out[b * QK + j] = fmaf((float)(q[b * QK / 2 + j] & 0x0f), d, mn);
            out[b * QK + j + QK / 2] = fmaf((float)(q[b * QK / 2 + j] >> 4), d, mn);
        }
    }
}

/* Rows n..n+RN of y for activation rows m0..m0+RM from expanded weights. */
INLINE void tile_expanded(int kind, const float *wf, const void *scales, const float *bias,
                          int64_t K, int64_t N, const float *x, int64_t n, int64_t m0, int RN,
                          int RM, float *y) {
    float out[32];
    tile_f32(wf, K, x + m0 * K, RN, RM, out);
    for (int r = 0; r < RN; r++) {
        const float s = kind == 8 ? ((const float *)scales)[n + r] : 1.f;
        for (int m = 0; m < RM; m++)
            y[(m0 + m) * N + n + r] = (kind == 8 ? out[r * RM + m] * s : out[r * RM + m]) +
                                      (bias ? bias[n + r] : 0.f);
    }
}

/* With AVX-512's 32 registers, 6 activation rows a tile: 24 accumulators. */
#ifdef CF_AVX512
#define XRM 6
#else
#define XRM 4
#endif
#define XTILES(RN)                                                                    \
    for (int64_t m0 = 0; m0 < M; m0 += XRM) {                                         \
        switch (M - m0 < XRM ? M - m0 : XRM) {                                        \
        case 1: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, 1, y); break; \
        case 2: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, 2, y); break; \
        case 3: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, 3, y); break; \
        case 4: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, 4, y); break; \
        case 5: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, 5, y); break; \
        default: tile_expanded(kind, wf, scales, bias, K, N, x, n, m0, RN, XRM, y); break; \
        }                                                                             \
    }

/* Many rows (a batch, a prompt): expand each group of weight rows to fp32 once,
 * in a per-thread scratch, and run the dense tiles over all activation rows.
 * The same numbers as the direct tiles (see expand_row). */
static int linear_expanded(const cf_lin *l, const float *x, int64_t M, float *y, int threads,
                           int64_t rn) {
    const int kind = l->kind;
    const void *w = l->w, *scales = l->scales;
    const float *bias = l->bias;
    const int64_t N = l->n, K = l->k, groups = N / rn;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *wf = malloc((size_t)(rn * K) * sizeof(float));
        if (!wf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            if (!wf) continue;
            const int64_t n = g * rn;
            for (int64_t r = 0; r < rn; r++) expand_row(kind, w, scales, K, n + r, wf + r * K);
            if (rn == 4) {
                XTILES(4)
            } else {
                XTILES(2)
            }
        }
        free(wf);
    }
    if (failed) return -1;
    float *wf = malloc((size_t)K * sizeof(float));
    if (!wf) return -1;
    for (int64_t n = groups * rn; n < N; n++) {
        expand_row(kind, w, scales, K, n, wf);
        XTILES(1)
    }
    free(wf);
    return 0;
}

/* y (M, N) = x (M, K) W^T (+ bias); see cf_lin. Returns 0, or -1 when out of memory. */
int cf_linear(const cf_lin *l, const float *x, int64_t M, float *y, int threads) {
    const int kind = l->kind;
    const void *w = l->w, *scales = l->scales;
    const float *bias = l->bias;
    const int64_t N = l->n, K = l->k;
    /* Groups of 4 weight rows (with AVX2, 2 when 4 activation rows: 8
     * accumulators plus the loaded vectors fit its 16 registers; AVX-512 has
     * 32); a leftover row alone. */
#ifdef CF_AVX512
    const int64_t rn = 4, groups = N / rn;
#else
    const int64_t rn = M >= 4 ? 2 : 4, groups = N / rn;
#endif
#ifdef CF_AVX512
    if (kind != 32 && M > 4 && M <= 8) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t g = 0; g < N / 2; g++) {
            const int64_t n = g * 2;
            TILES8(2)
        }
        for (int64_t n = N / 2 * 2; n < N; n++) {
            TILES8(1)
        }
        return 0;
    }
#endif
    if (kind != 32 && M > 4) return linear_expanded(l, x, M, y, threads, rn);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n = g * rn;
        if (rn == 4) {
            TILES(4)
        } else {
            TILES(2)
        }
    }
    for (int64_t n = groups * rn; n < N; n++) {
        TILES(1)
    }
    return 0;
}

/* cf_linear with loose arguments (for ctypes callers). */
int cf_qlinear(int kind, const float *x, int64_t M, int64_t K, const void *w, const void *scales,
               const float *bias, int64_t N, float *y, int threads) {
    const cf_lin l = {kind, 0, w, scales, bias, N, K};
    return cf_linear(&l, x, M, y, threads);
}

/* The fp32 weight (N, K) back from either layout (for large-batch prefill,
 * where a dense matmul of many rows beats the integer path). */
void cf_dequantize(int kind, const void *w, const void *scales, int64_t N, int64_t K, float *out,
                   int threads) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * K;
        if (kind == 8) {
            const int8_t *q = (const int8_t *)w + n * K;
            const float s = ((const float *)scales)[n];
            for (int64_t k = 0; k < K; k++) o[k] = (float)q[k] * s;
        } else {
            const uint8_t *q = (const uint8_t *)w + n * K / 2;
            const uint16_t *dm = (const uint16_t *)scales + n * nb * 2;
            for (int64_t b = 0; b < nb; b++) {
                const float d = fp16_to_fp32(dm[b]), mn = fp16_to_fp32(dm[nb + b]);
                for (int j = 0; j < QK / 2; j++) {
                    o[b * QK + j] = (float)(q[b * QK / 2 + j] & 0x0f) * d + mn;
                    o[b * QK + j + QK / 2] = (float)(q[b * QK / 2 + j] >> 4) * d + mn;
                }
            }
        }
    }
}
