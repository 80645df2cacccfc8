/* Shared declarations of chatforge's CPU kernels (qlinear.c, decode.c), and what
 * tests/native_check/kernel_check.c calls. */
#ifndef CHATFORGE_KERNELS_H
#define CHATFORGE_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* fp16 bits as fp32 (exact on every path). */
static inline float cf_h2f(uint16_t h) {
#if !defined(CF_PLAIN) && defined(__F16C__)
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

#if !defined(CF_PLAIN) && defined(__AVX2__) && defined(__F16C__)
/* 8 fp16 values as fp32 (exact, as cf_h2f). */
static inline __m256 cf_h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#endif

#if !defined(CF_PLAIN) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
/* 4 fp16 values as fp32 (exact, as cf_h2f). */
static inline float32x4_t cf_h4(const uint16_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
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
int cf_qlinear(int kind, const float *x, int64_t M, int64_t K, const void *w, const void *scales,
               const float *bias, int64_t N, float *y, int threads);
void cf_dequantize(int kind, const void *w, const void *scales, int64_t N, int64_t K, float *out,
                   int threads);
int cf_has_avx2(void);
const char *cf_isa(void);

/* decode.c: a model's layers, the model, a LoRA adapter's delta on one linear. */
typedef struct {
    const float *norm1, *norm2;     /* norm weights (hidden,) */
    const float *norm1_b, *norm2_b; /* LayerNorm biases (gpt2), NULL for RMSNorm */
    cf_lin qkv, out, up, down;      /* llama up: gate rows then up rows */
} cf_layer;

/* Mirrored by ctypes in native.py. */
typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter;
    float eps;
    int32_t arch;       /* 0: llama (RMSNorm, RoPE, gated SiLU); 1: gpt2 (LayerNorm, GELU) */
    int64_t block;      /* cache positions per block */
    const cf_layer *layers;
    float *const *k_cache; /* per layer (n_blocks, kv_heads, block, head_dim) */
    float *const *v_cache;
    const float *rope; /* (max_positions, head_dim / 2, 2): cos, sin; NULL for gpt2 */
} cf_model;

/* One LoRA adapter's delta on one linear, stored for the per-row update
 * y += (x A^T) B^T * scale as two "axpy" passes (no float reductions to reorder,
 * so a row's result is the same whatever else is in the call), in fp16 (a decode
 * step is bound by reading the adapter: half the bytes of fp32, as llama.cpp's f16
 * LoRA files), each rank's column of A^T and row of B^T scaled by a power of two
 * that puts its largest value near fp16's top (no overflow, no subnormals):
 *   a_t (k, r) fp16: A^T / 2^ea;  scales (r,) fp32: 2^(ea + eb) per rank;
 *   spans (r, 3) = (lo, hi, start): row i of (B * scale)^T / 2^eb is zero outside
 *   columns [lo, hi) (a fused linear's B is block-diagonal over its parts), and its
 *   columns lo..hi are b_t[start ...] (fp16), the rows packed back to back (one
 *   stream to read).
 * a_t NULL: this adapter does not touch this linear. Mirrored by ctypes. */
typedef struct {
    const uint16_t *a_t, *b_t;
    int64_t r;
    const int64_t *spans;
    const float *scales;
} cf_lora;

void cf_norm(const float *x, const float *w, const float *b, float eps, int64_t R, int64_t H,
             float *y);
int cf_forward(const cf_model *m, float *x, int64_t R, const int64_t *pos, const int32_t *seq,
               const int32_t *tables, int64_t max_blocks, int threads, const int32_t *row_lora,
               const cf_lora *loras);

#endif
