/* Weight-only quantised linear layers for decoding on a CPU: y = x W^T (+ b).
 *
 * Why our own: decoding reads every weight once per step, so the speed limit is
 * memory bandwidth (~29 GB/s on our 2-core machines). torch's CPU kernels
 * (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) reach ~9 GB/s and ~5 GB/s
 * there at batch 1; these reach the bandwidth. The method is llama.cpp's: the
 * activations are quantised to int8 in blocks of 32 (one fp32 scale per
 * block), and each block's dot product is done in integers with AVX2
 * (vpmaddubsw + vpmaddwd: 32 multiply-adds in two instructions), then scaled
 * and accumulated in fp32.
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

/* x (M, K) fp32 -> xq (M, K) int8, xd (M, K/32) scales, xs (M, K/32) = d * sum(q). */
static void quantize_rows(const float *x, int64_t blocks, int8_t *xq, float *xd, float *xs) {
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * QK;
        int8_t *q = xq + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int r = (int)nearbyintf(v[j] * id);
            q[j] = (int8_t)r;
            sum += r;
        }
        xd[b] = d;
        xs[b] = d * (float)sum;
    }
}

#ifdef CF_AVX2

/* Sum of 32 products of signed bytes, as 8 int32 lanes converted to fp32. */
static inline __m256 dot_s8(__m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    /* vpmaddubsw needs one unsigned operand: |w| times x with w's sign. */
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

/* Same for unsigned 4-bit weights (0..15) already unpacked to bytes. */
static inline __m256 dot_u4(__m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
}

/* The weight rows are read once, in short runs (a tile is a few KiB), too
 * short for the hardware prefetcher to ramp up: ask for the bytes two tiles
 * ahead while this tile computes (tile_bytes per tile, step bytes per block).
 * Prefetching past the end of the weight is harmless. */
static inline void prefetch_ahead(const void *p, int64_t tile_bytes, int step) {
    const char *a = (const char *)p + 2 * tile_bytes;
    for (int off = 0; off < step; off += 64) _mm_prefetch(a + off, _MM_HINT_T0);
}

static inline __m256i unpack_u4(const uint8_t *p) {
    const __m128i lo = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
#endif

/* A tile of RN weight rows against RM activation rows. RN and RM are literals
 * at every call (see cf_qlinear), so after inlining the RN * RM accumulators
 * live in registers and the blocks of one row do not wait on each other's
 * fused multiply-adds. Results go to out[r * RM + m]. */
#define INLINE static inline __attribute__((always_inline))

INLINE void tile_w8(const int8_t *w, const float *s, int64_t K, const int8_t *xq, const float *xd,
                    int RN, int RM, float *out) {
    const int64_t nb = K / QK;
#ifdef CF_AVX2
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * RN * QK, RN * K, RN * QK);
        __m256i xv[4];
        __m256 dx[4];
        for (int m = 0; m < RM; m++) {
            xv[m] = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * QK));
            dx[m] = _mm256_set1_ps(xd[m * nb + b]);
        }
        for (int r = 0; r < RN; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * K + b * QK));
            for (int m = 0; m < RM; m++) acc[r][m] = _mm256_fmadd_ps(dot_s8(wv, xv[m]), dx[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = hsum(acc[r][m]) * s[r];
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                int sum = 0;
                for (int j = 0; j < QK; j++)
                    sum += (int)w[r * K + b * QK + j] * (int)xq[m * K + b * QK + j];
                acc += (float)sum * xd[m * nb + b];
            }
            out[r * RM + m] = acc * s[r];
        }
#endif
}

/* dm: per weight row, nb fp16 scales d then nb fp16 offsets m. */
INLINE void tile_w4(const uint8_t *w, const uint16_t *dm, int64_t K, const int8_t *xq,
                    const float *xd, const float *xs, int RN, int RM, float *out) {
    const int64_t nb = K / QK;
#ifdef CF_AVX2
    /* Scales to fp32 once per row (8 at a time), and the offsets' share,
     * sum_b m_b * xs_b, as a separate dot product: the block loop then does
     * only the integer dot and one fused multiply-add. */
    float d[4][NB_MAX], mins[4][4];
    for (int r = 0; r < RN; r++) {
        const uint16_t *p = dm + r * nb * 2;
        __m256 macc[4];
        for (int m = 0; m < RM; m++) macc[m] = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) {
            _mm256_storeu_ps(d[r] + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + b))));
            const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + nb + b)));
            for (int m = 0; m < RM; m++)
                macc[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs + m * nb + b), macc[m]);
        }
        for (int m = 0; m < RM; m++) mins[r][m] = hsum(macc[m]);
        for (; b < nb; b++) {
            d[r][b] = fp16_to_fp32(p[b]);
            for (int m = 0; m < RM; m++) mins[r][m] += fp16_to_fp32(p[nb + b]) * xs[m * nb + b];
        }
    }
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * RN * QK / 2, RN * K / 2, RN * QK / 2);
        __m256i xv[4];
        for (int m = 0; m < RM; m++) xv[m] = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * QK));
        for (int r = 0; r < RN; r++) {
            const __m256i wv = unpack_u4(w + r * K / 2 + b * QK / 2);
            for (int m = 0; m < RM; m++)
                acc[r][m] = _mm256_fmadd_ps(dot_u4(wv, xv[m]), _mm256_set1_ps(d[r][b] * xd[m * nb + b]),
                                            acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = hsum(acc[r][m]) + mins[r][m];
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            const uint16_t *p = dm + r * nb * 2;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = w + r * K / 2 + b * QK / 2;
                int sum = 0;
                for (int j = 0; j < QK / 2; j++) {
                    sum += (q[j] & 0x0f) * (int)xq[m * K + b * QK + j];
                    sum += (q[j] >> 4) * (int)xq[m * K + b * QK + j + QK / 2];
                }
                acc += fp16_to_fp32(p[b]) * xd[m * nb + b] * (float)sum +
                       fp16_to_fp32(p[nb + b]) * xs[m * nb + b];
            }
            out[r * RM + m] = acc;
        }
#endif
}

/* Dense fp32 weights (kind 32): the decode step of an unquantised model. */
INLINE void tile_f32(const float *w, int64_t K, const float *x, int RN, int RM, float *out) {
#ifdef CF_AVX2
    __m256 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[4];
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
                 int64_t N, const int8_t *xq, const float *xd, const float *xs, const float *x,
                 int64_t n, int64_t m0, int RN, int RM, float *y) {
    const int64_t nb = K / QK;
    float out[16];
    if (kind == 32)
        tile_f32((const float *)w + n * K, K, x + m0 * K, RN, RM, out);
    else if (kind == 8)
        tile_w8((const int8_t *)w + n * K, (const float *)scales + n, K, xq + m0 * K, xd + m0 * nb,
                RN, RM, out);
    else
        tile_w4((const uint8_t *)w + n * K / 2, (const uint16_t *)scales + n * nb * 2, K,
                xq + m0 * K, xd + m0 * nb, xs + m0 * nb, RN, RM, out);
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++)
            y[(m0 + m) * N + n + r] = out[r * RM + m] + (bias ? bias[n + r] : 0.f);
}

#define TILES(RN)                                                                  \
    for (int64_t m0 = 0; m0 < M; m0 += 4) {                                        \
        switch (M - m0 < 4 ? M - m0 : 4) {                                         \
        case 1: tile(kind, w, scales, bias, K, N, xq, xd, xs, x, n, m0, RN, 1, y); break; \
        case 2: tile(kind, w, scales, bias, K, N, xq, xd, xs, x, n, m0, RN, 2, y); break; \
        case 3: tile(kind, w, scales, bias, K, N, xq, xd, xs, x, n, m0, RN, 3, y); break; \
        default: tile(kind, w, scales, bias, K, N, xq, xd, xs, x, n, m0, RN, 4, y); break; \
        }                                                                          \
    }

/* y (M, N) = x (M, K) W^T (+ bias); see cf_lin. Returns 0, or -1 when out of
 * memory. */
int cf_linear(const cf_lin *l, const float *x, int64_t M, float *y, int threads) {
    const int kind = l->kind;
    const void *w = l->w, *scales = l->scales;
    const float *bias = l->bias;
    const int64_t N = l->n, K = l->k, nb = K / QK;
    int8_t *xq = NULL;
    float *xd = NULL, *xs = NULL;
    if (kind != 32) { /* quantise the activations once for all weight rows */
        xq = malloc((size_t)(M * K));
        xd = malloc((size_t)(M * nb) * sizeof(float) * 2);
        if (!xq || !xd) {
            free(xq);
            free(xd);
            return -1;
        }
        xs = xd + M * nb;
        quantize_rows(x, M * nb, xq, xd, xs);
    }
    /* Groups of 4 weight rows (2 when 4 activation rows: 8 accumulators plus
     * the loaded vectors fit AVX2's 16 registers); a leftover row alone. */
    const int64_t rn = M >= 4 ? 2 : 4, groups = N / rn;
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
    free(xq);
    free(xd);
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
