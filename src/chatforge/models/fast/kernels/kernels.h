/* Shared declarations of chatforge's CPU kernels (qlinear.c, decode.c). */
#ifndef CHATFORGE_KERNELS_H
#define CHATFORGE_KERNELS_H
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* Sum of the 8 lanes of an fp32 vector. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#define QK 32        /* inputs per quantisation block */
#define NB_MAX 1024  /* blocks per row: K up to 32768 (checked by the caller) */

/* One linear layer y = x W^T (+ bias), W (n, k) stored as (G = ceil(n / 16) groups
 * of 16 interleaved rows; the byte order is described in qlinear.c):
 *   kind 32: fp32 (n, k);
 *   kind 9:  uint8 q + 128 (G, k/32, 8, 16, 4), scales fp32 (n,)       w = q * s
 *   kind 8:  uint8 q + 128 (G, k/32, 8, 16, 4), scales fp16 (G, k/32, 16) w = q * d
 *   kind 5:  uint8 (G, k/32, 4, 16, 4), scales fp16 (G, k/32, 2, 16)   w = q * d + m
 * Layout mirrored by ctypes in native.py: keep the two in step. */
typedef struct {
    int32_t kind;
    int32_t pad;
    const void *w;
    const void *scales;
    const float *bias; /* (n,) or NULL */
    int64_t n, k;
} cf_lin;

int cf_linear(const cf_lin *l, const float *x, int64_t M, float *y, int threads);

#endif
