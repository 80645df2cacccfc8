/* Weight-only quantised linear layers for decoding on a CPU: y = x W^T (+ b).
 *
 * Why our own: decoding reads every weight once per step, so the speed limit is
 * memory bandwidth (~29 GB/s on our 2-core machines). torch's CPU kernels
 * (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) reach ~9 GB/s and ~5 GB/s
 * there at batch 1.
 *
 * Quantised kinds (5, 9) use integer dot products: the activations are quantised
 * per row and block of 32 inputs to two int8 digits, x ~ xs * (128 * x1 + x2)
 * (x1 = round(x / d), d = amax / 127, then x2 the residual in steps of d / 128,
 * |x2| <= 64; xs = d / 128), and a block's dot product with the weights' integers
 * is exact in int32 (AVX-512 VNNI vpdpbusd: unsigned weights times signed
 * activations, 4 products per 32-bit lane; AVX-512BW / AVX2: vpmaddubsw +
 * vpmaddwd, but AVX2's kinds 8 and 9: vpmaddwd of the weights as int16 and
 * 128 * x1 + x2; ARM NEON with armv8.2's dot product: sdot, signed times signed, 4 a
 * lane; plain NEON: smull + sadalp; plain C: integer loops). Only then is it
 * scaled to float, per block:
 *     kind 5 (Q4_1):  y += (d * xs) * sum(q * xq) + m * (xs * sum(xq))
 *     kind 9 (int8):  y += xs * sum(q * xq), and at the end y *= s (the row's scale)
 *     kind 8 (Q8_0):  y += (d * xs) * sum(q * xq)
 * with xq = 128 * x1 + x2. Expanding each weight to fp32 (the previous kernels) made
 * int4 compute-bound at batch 1 and prefill several times slower than integers.
 * Why two digits: one int8 digit per activation (llama.cpp's Q8 blocks, ~0.5 %
 * error a product) flips SmolLM2-135M's greedy answer to "What is the capital of
 * France?" (llama.cpp answers "L'Etoile, ..." too); the second makes the rounding
 * amax / 32512, ~2^-15 of the block's largest value, and the answer is Paris again
 * (tests/test_smollm2.py), for twice the integer products (not the bottleneck at
 * batch 1, where reading the weights is).
 *
 * Batch invariance: a row's activations are quantised alone, its integer sums are
 * exact, and its float sum runs over the blocks in order whatever the number of
 * rows, tile or thread, so a row's output never depends on the other rows (greedy
 * decoding is batch-invariant; see decode.c). Every variant does the same float
 * operations in the same order, so they agree bit for bit.
 *
 * Weight layouts (W (N, K), K % 32 == 0; quantised kinds pad N with zero rows to a
 * multiple of 16 and interleave groups of 16 rows, so that one 512-bit load feeds
 * 16 output rows, each 32-bit lane one row's sum: no horizontal sums, and a group
 * is one contiguous stream):
 *   kind 32: fp32 (N, K), row-major.
 *   kind 5:  Q4_1 blocks. q uint8 (N/16, K/32, 4, 16, 4): per group and block, 4
 *            chunks of 64 bytes, 4 bytes a row; byte i of row r in chunk c holds
 *            q[4c + i] (low nibble) and q[16 + 4c + i] (high nibble): GGUF's byte
 *            4c + i of that row, moved. scales fp16 (N/16, K/32, 2, 16): the 16
 *            rows' d, then their m.                                 w = q * d + m
 *   kind 9:  int8, one fp32 scale per row. q uint8 (N/16, K/32, 8, 16, 4): byte i
 *            of row r in chunk c is q[4c + i] + 128 (vpdpbusd's unsigned operand;
 *            the 128 * sum(xq) this adds is subtracted per block). scales fp32
 *            (N,).                                                    w = q * s
 *   kind 8:  Q8_0 blocks (a GGUF file's 8-bit tensors as they are). q as kind 9's;
 *            scales fp16 (N/16, K/32, 16): the 16 rows' d per block. w = q * d
 * Groups of rows are split over OpenMP threads (the same libgomp torch uses, so
 * one thread pool).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* CF_PLAIN: the plain-C paths only, whatever the compiler targets (NEON is always
 * there on aarch64, so this is how the plain-C reference is built there). */
#if !defined(CF_PLAIN) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CF_AVX2 1
#endif
/* AVX-512 where the compiler targets it: 16 lanes, 32 registers. */
#if defined(CF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define CF_AVX512 1
#endif
/* AVX2 without AVX-512: kinds 8 and 9 multiply int16 weights by the activations' two
 * digits as one int16 (xquant.q16) with vpmaddwd, see tile_q8. */
#if defined(CF_AVX2) && !defined(CF_AVX512)
#define CF_Q16 1
#endif
/* ARM: NEON (128 bits, 32 registers), and the armv8.2 dot product (sdot: 4 int8
 * products summed into each 32-bit lane, as VNNI) where the compiler targets it. */
#if !defined(CF_PLAIN) && !defined(CF_AVX2) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define CF_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define CF_DOTPROD 1
#endif
#endif

#include "kernels.h"

#define RG 16 /* weight rows per interleaved group (kinds 5, 9) */

int cf_has_avx2(void) {
#ifdef CF_AVX2
    return 1;
#else
    return 0;
#endif
}

/* The vector code this build runs: its variant's name (kernel_variants.py). */
const char *cf_isa(void) {
#if defined(CF_AVX512) && defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(CF_AVX512)
    return "avx512";
#elif defined(CF_AVX2)
    return "avx2";
#elif defined(CF_DOTPROD)
    return "neon_dotprod";
#elif defined(CF_NEON)
    return "neon";
#else
    return "generic";
#endif
}

#define INLINE static inline __attribute__((always_inline))

/* The activations of one call, quantised per row and block of 32; block i of the
 * (M, K/32) blocks covers row i / (K/32). */
typedef struct {
    int8_t *q;    /* (M, K/32, 2, 32): per block x1 then x2, x ~ s * (128 * x1 + x2) */
    float *s;     /* (M, K/32) */
    float *sm;    /* (M, K/32): s * sum(128 * x1 + x2), the factor of a Q4_1 block's m */
    int32_t *off; /* (M, K/32): 128 * sum(128 * x1 + x2), what kind 9's offset weights add */
    int16_t *q16; /* (M, K): 128 * x1 + x2 (|.| <= 16320), the AVX2 kernels' operand */
} xquant;

/* One block of 32 activations into q (2, 32): x1 = x * (1 / d) rounded to the
 * nearest (ties to even), d = amax / 127; x2 = the residual x - x1 * d (one
 * rounding) times 128 / d, rounded. The same operations in every variant. */
static void quantize_block(const float *x, int8_t *q, int16_t *q16, float *s, float *sm,
                           int32_t *off) {
    int32_t sum = 0;
#if defined(CF_AVX512)
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m512 vd = _mm512_set1_ps(d), vid = _mm512_set1_ps(id), vid2 = _mm512_set1_ps(id * 128.f);
    __m512i total = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
        const __m512 v = h ? b : a;
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v, vid));
        const __m512 r = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q1), vd, v);
        const __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(r, vid2));
        _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(q1));
        _mm_storeu_si128((__m128i *)(q + 32 + 16 * h), _mm512_cvtepi32_epi8(q2));
        total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(q1, 7), q2));
    }
    sum = _mm512_reduce_add_epi32(total);
#elif defined(CF_AVX2)
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m256 vd = _mm256_set1_ps(d), vid = _mm256_set1_ps(id), vid2 = _mm256_set1_ps(id * 128.f);
    int32_t t1[32], t2[32];
    for (int j = 0; j < 4; j++) {
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vid));
        const __m256 r = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q1), vd, v[j]);
        _mm256_storeu_si256((__m256i *)(t1 + 8 * j), q1);
        _mm256_storeu_si256((__m256i *)(t2 + 8 * j), _mm256_cvtps_epi32(_mm256_mul_ps(r, vid2)));
    }
    for (int j = 0; j < 32; j++) {
        q[j] = (int8_t)t1[j];
        q[32 + j] = (int8_t)t2[j];
        q16[j] = (int16_t)(128 * t1[j] + t2[j]);
        sum += 128 * t1[j] + t2[j];
    }
#elif defined(CF_NEON)
    /* The plain-C operations lane by lane: vmaxnm is fmaxf, vrndn nearbyintf (ties
     * to even), vfms fmaf(-v1, d, x), vcvtn the rounding int conversion. */
    float32x4_t v[8], mx = vdupq_n_f32(0.f);
    for (int j = 0; j < 8; j++) {
        v[j] = vld1q_f32(x + 4 * j);
        mx = vmaxnmq_f32(mx, vabsq_f32(v[j]));
    }
    const float amax = vmaxnmvq_f32(mx);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const float32x4_t vd = vdupq_n_f32(d), vid = vdupq_n_f32(id), vid2 = vdupq_n_f32(id * 128.f);
    int32_t t1[32], t2[32];
    for (int j = 0; j < 8; j++) {
        const float32x4_t v1 = vrndnq_f32(vmulq_f32(v[j], vid));
        vst1q_s32(t1 + 4 * j, vcvtq_s32_f32(v1)); /* exact: v1 is an integer */
        vst1q_s32(t2 + 4 * j, vcvtnq_s32_f32(vmulq_f32(vfmsq_f32(v[j], v1, vd), vid2)));
    }
    for (int j = 0; j < 32; j++) {
        q[j] = (int8_t)t1[j];
        q[32 + j] = (int8_t)t2[j];
        sum += 128 * t1[j] + t2[j];
    }
#else
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f, id2 = id * 128.f;
    for (int j = 0; j < 32; j++) {
        const float v1 = nearbyintf(x[j] * id);
        const int32_t v2 = (int32_t)nearbyintf(fmaf(-v1, d, x[j]) * id2);
        q[j] = (int8_t)v1;
        q[32 + j] = (int8_t)v2;
        sum += 128 * (int32_t)v1 + v2;
    }
#endif
#ifndef CF_Q16
    (void)q16;
#endif
    *s = d * (1.f / 128.f); /* exact */
    *sm = *s * (float)sum;
    *off = 128 * sum;
}

#ifdef CF_AVX2
/* Ask for the weight bytes a few blocks ahead (a group is one contiguous run;
 * prefetching past the end of the weight is harmless). */
#define PREFETCH_BLOCKS 8
static inline void prefetch(const uint8_t *p, int bytes) {
    for (int off = 0; off < bytes; off += 64) _mm_prefetch((const char *)p + off, _MM_HINT_T0);
}
#endif

#ifdef CF_AVX512
#define XM 8 /* activation rows per tile: 8 float accumulators + 8 weight vectors */
static inline __m512i bcast4(const int8_t *p) { /* 4 activations into every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* 128 * a + b: the two activation digits' sums into one. */
static inline __m512i digits(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_slli_epi32(a, 7), b);
}

/* The 16 rows' exact sums over one kind-5 block: nibbles wl (q[0..15]) and wh
 * (q[16..31]) as 4 chunks of 16 rows x 4 inputs, x the block's digits (2, 32). */
INLINE __m512i dot_q4(const __m512i *wl, const __m512i *wh, const int8_t *x) {
    __m512i acc[2];
    for (int h = 0; h < 2; h++) {
        const int8_t *xh = x + 32 * h;
#ifdef __AVX512VNNI__
        __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512(); /* two dependency chains */
        for (int c = 0; c < 4; c++) {
            a = _mm512_dpbusd_epi32(a, wl[c], bcast4(xh + 4 * c));
            b = _mm512_dpbusd_epi32(b, wh[c], bcast4(xh + 16 + 4 * c));
        }
        acc[h] = _mm512_add_epi32(a, b);
#else
        /* Pairs of products summed in int16: at most 8 * 2 * 15 * 127 = 30480, no saturation. */
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            s = _mm512_add_epi16(s, _mm512_maddubs_epi16(wl[c], bcast4(xh + 4 * c)));
            s = _mm512_add_epi16(s, _mm512_maddubs_epi16(wh[c], bcast4(xh + 16 + 4 * c)));
        }
        acc[h] = _mm512_madd_epi16(s, _mm512_set1_epi16(1));
#endif
    }
    return digits(acc[0], acc[1]);
}

/* The 16 rows' exact sums over one kind-9 block (8 chunks of 16 rows x 4 inputs at
 * w, each weight + 128), x the block's digits (2, 32); off: see xquant. */
INLINE __m512i dot_q8(const uint8_t *w, const int8_t *x, int32_t off) {
#ifdef __AVX512VNNI__
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    for (int c = 0; c < 8; c++) {
        const __m512i wc = _mm512_loadu_si512(w + 64 * c);
        a = _mm512_dpbusd_epi32(a, wc, bcast4(x + 4 * c));
        b = _mm512_dpbusd_epi32(b, wc, bcast4(x + 32 + 4 * c));
    }
    return _mm512_sub_epi32(digits(a, b), _mm512_set1_epi32(off));
#else
    /* vpmaddubsw of q + 128 (up to 255) would saturate: |q| times x with q's sign
     * instead, pairs at most 2 * 128 * 127 = 32512. */
    (void)off;
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
    __m512i a = zero, b = zero;
    for (int c = 0; c < 8; c++) {
        const __m512i q = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * c), _mm512_set1_epi8(-128));
        const __m512i aq = _mm512_abs_epi8(q);
        const __mmask64 neg = _mm512_movepi8_mask(q);
        const __m512i x1 = bcast4(x + 4 * c), x2 = bcast4(x + 32 + 4 * c);
        const __m512i p1 = _mm512_maddubs_epi16(aq, _mm512_mask_sub_epi8(x1, neg, zero, x1));
        const __m512i p2 = _mm512_maddubs_epi16(aq, _mm512_mask_sub_epi8(x2, neg, zero, x2));
        a = _mm512_add_epi32(a, _mm512_madd_epi16(p1, ones));
        b = _mm512_add_epi32(b, _mm512_madd_epi16(p2, ones));
    }
    return digits(a, b);
#endif
}

#elif defined(CF_AVX2)
#ifndef XM
#define XM 4 /* 2 int32 accumulators a row + 4 float ones + the weights: 16 registers */
#endif
static inline __m256i bcast4(const int8_t *p) { /* 4 activations into every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
static inline __m256i bcast8(const int16_t *p) { /* 4 int16 activations into every 64-bit lane */
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}
/* 16 weight bytes (4 rows x 4 inputs) zero-extended to int16 */
static inline __m256i load_u16(const uint8_t *p) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
}
/* vphaddd of rows 0-3 and rows 4-7 (two 32-bit lanes a row) leaves the 8 rows' sums in
 * lanes (0, 1, 4, 5, 2, 3, 6, 7); this index list moves them (and the scales) to and
 * fro (it is its own inverse). */
#define ROW_ORDER _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)
#elif defined(CF_NEON)
#define XM 4
static inline int8x16_t bcast4(const int8_t *p) { /* 4 activations into every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

/* Integer sums of 4 weight rows w (16 bytes: 4 rows x 4 inputs) times 4 activations x
 * (the same 4 in each 32-bit lane), one row a lane, exact. With the dot product (as
 * llama.cpp's ggml_vec_dot_q8_0_q8_0): one sdot into acc. Without: vmull_s8 makes the
 * 16 products in int16 (|q x| <= 128 * 127), vpadalq_s16 adds pairs of them into
 * int32 lanes (lo: rows 0-1, hi: rows 2-3, two lanes a row), and dot_end sums those
 * pairs per row (vpaddq) once per block. */
typedef struct {
#ifdef CF_DOTPROD
    int32x4_t s;
#else
    int32x4_t lo, hi;
#endif
} dot4;

static inline dot4 dot_zero(void) {
    dot4 a;
#ifdef CF_DOTPROD
    a.s = vdupq_n_s32(0);
#else
    a.lo = a.hi = vdupq_n_s32(0);
#endif
    return a;
}

INLINE dot4 dot_add(dot4 a, int8x16_t w, int8x16_t x) {
#ifdef CF_DOTPROD
    a.s = vdotq_s32(a.s, w, x);
#else
    a.lo = vpadalq_s16(a.lo, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    a.hi = vpadalq_s16(a.hi, vmull_high_s8(w, x));
#endif
    return a;
}

static inline int32x4_t dot_end(dot4 a) {
#ifdef CF_DOTPROD
    return a.s;
#else
    return vpaddq_s32(a.lo, a.hi);
#endif
}

/* The 16 rows' exact sums over one kind-9/8 block (8 chunks of 16 rows x 4 inputs at
 * w, each weight + 128: flipping the top bit makes it the signed q), x the block's
 * digits (2, 32): acc[t] holds rows 4t..4t+3, 128 * sum(q x1) + sum(q x2). */
INLINE void dot_q8(const uint8_t *w, const int8_t *x, int32x4_t acc[4]) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    dot4 a[4], b[4];
    for (int t = 0; t < 4; t++) a[t] = b[t] = dot_zero();
    for (int c = 0; c < 8; c++) {
        const int8x16_t x1 = bcast4(x + 4 * c), x2 = bcast4(x + 32 + 4 * c);
        for (int t = 0; t < 4; t++) {
            const int8x16_t q = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w + 64 * c + 16 * t), flip));
            a[t] = dot_add(a[t], q, x1);
            b[t] = dot_add(b[t], q, x2);
        }
    }
    for (int t = 0; t < 4; t++) acc[t] = vaddq_s32(vshlq_n_s32(dot_end(a[t]), 7), dot_end(b[t]));
}

/* The same for one kind-5 block (4 chunks; each byte's low nibble is input 4c + i,
 * its high nibble input 16 + 4c + i, both 0..15). */
INLINE void dot_q4(const uint8_t *w, const int8_t *x, int32x4_t acc[4]) {
    const uint8x16_t low = vdupq_n_u8(0x0f);
    dot4 a[4], b[4];
    for (int t = 0; t < 4; t++) a[t] = b[t] = dot_zero();
    for (int c = 0; c < 4; c++) {
        const int8x16_t x1l = bcast4(x + 4 * c), x1h = bcast4(x + 16 + 4 * c);
        const int8x16_t x2l = bcast4(x + 32 + 4 * c), x2h = bcast4(x + 48 + 4 * c);
        for (int t = 0; t < 4; t++) {
            const uint8x16_t v = vld1q_u8(w + 64 * c + 16 * t);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low));
            const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            a[t] = dot_add(dot_add(a[t], lo, x1l), hi, x1h);
            b[t] = dot_add(dot_add(b[t], lo, x2l), hi, x2h);
        }
    }
    for (int t = 0; t < 4; t++) acc[t] = vaddq_s32(vshlq_n_s32(dot_end(a[t]), 7), dot_end(b[t]));
}

#else
#define XM 4
#endif

/* A group of 16 kind-5 weight rows (w, dm at the group) against activation rows
 * m0..m0+RM: out[m * 16 + r]. RM is a literal at every call, so after inlining the
 * accumulators live in registers. */
INLINE void tile_q4(const uint8_t *w, const uint16_t *dm, int64_t nb, const xquant *xq, int64_t m0,
                    int RM, float *out) {
#if defined(CF_AVX512)
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 f[XM];
    for (int m = 0; m < RM; m++) f[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 256;
        prefetch(wb + PREFETCH_BLOCKS * 256, 256);
        __m512i wl[4], wh[4];
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(wb + 64 * c);
            wl[c] = _mm512_and_si512(v, low);
            wh[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + b * 32)));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + b * 32 + 16)));
        for (int m = 0; m < RM; m++) {
            const int64_t i = (m0 + m) * nb + b;
            const __m512i acc = dot_q4(wl, wh, xq->q + i * 2 * QK);
            f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(d, _mm512_set1_ps(xq->s[i])),
                                   f[m]);
            f[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xq->sm[i]), f[m]);
        }
    }
    for (int m = 0; m < RM; m++) _mm512_storeu_ps(out + m * RG, f[m]);
#elif defined(CF_AVX2)
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) { /* rows 8h..8h+7: the 32-byte halves of the chunks */
        __m256 f[XM];
        for (int m = 0; m < RM; m++) f[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * 256 + 32 * h;
            prefetch(wb + PREFETCH_BLOCKS * 256, 256);
            __m256i wl[4], wh[4];
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 64 * c));
                wl[c] = _mm256_and_si256(v, low);
                wh[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            const __m256 d = cf_h8(dm + b * 32 + 8 * h);
            const __m256 mn = cf_h8(dm + b * 32 + 16 + 8 * h);
            for (int m = 0; m < RM; m++) {
                const int64_t i = (m0 + m) * nb + b;
                const int8_t *x = xq->q + i * 2 * QK;
                __m256i acc = _mm256_setzero_si256();
                for (int dg = 0; dg < 2; dg++) { /* the two digits; int16 pairs: see dot_q4 */
                    const int8_t *xd = x + 32 * dg;
                    __m256i s = _mm256_setzero_si256();
                    for (int c = 0; c < 4; c++) {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wl[c], bcast4(xd + 4 * c)));
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wh[c], bcast4(xd + 16 + 4 * c)));
                    }
                    acc = _mm256_add_epi32(_mm256_slli_epi32(acc, 7), _mm256_madd_epi16(s, ones));
                }
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc),
                                       _mm256_mul_ps(d, _mm256_set1_ps(xq->s[i])), f[m]);
                f[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xq->sm[i]), f[m]);
            }
        }
        for (int m = 0; m < RM; m++) _mm256_storeu_ps(out + m * RG + 8 * h, f[m]);
    }
#elif defined(CF_NEON)
    /* The plain-C float operations lane by lane: f = fma(acc, d * xs, f), then
     * f = fma(m, xs * sum, f) per block, in block order. */
    float32x4_t f[XM][4];
    for (int m = 0; m < RM; m++)
        for (int t = 0; t < 4; t++) f[m][t] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 256;
        float32x4_t d[4], mn[4];
        for (int t = 0; t < 4; t++) {
            d[t] = cf_h4(dm + b * 32 + 4 * t);
            mn[t] = cf_h4(dm + b * 32 + 16 + 4 * t);
        }
        for (int m = 0; m < RM; m++) {
            const int64_t i = (m0 + m) * nb + b;
            int32x4_t acc[4];
            dot_q4(wb, xq->q + i * 2 * QK, acc);
            const float32x4_t xs = vdupq_n_f32(xq->s[i]), sm = vdupq_n_f32(xq->sm[i]);
            for (int t = 0; t < 4; t++) {
                f[m][t] = vfmaq_f32(f[m][t], vcvtq_f32_s32(acc[t]), vmulq_f32(d[t], xs));
                f[m][t] = vfmaq_f32(f[m][t], mn[t], sm);
            }
        }
    }
    for (int m = 0; m < RM; m++)
        for (int t = 0; t < 4; t++) vst1q_f32(out + m * RG + 4 * t, f[m][t]);
#else
    for (int m = 0; m < RM; m++)
        for (int r = 0; r < RG; r++) {
            float f = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const int64_t i = (m0 + m) * nb + b;
                const int8_t *x = xq->q + i * 2 * QK;
                const uint8_t *q = w + b * 256 + r * 4;
                int32_t acc = 0;
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 4; j++) {
                        const int32_t lo = q[64 * c + j] & 0x0f, hi = q[64 * c + j] >> 4;
                        const int k = 4 * c + j;
                        acc += lo * (128 * x[k] + x[32 + k]) + hi * (128 * x[16 + k] + x[48 + k]);
                    }
                const float d = cf_h2f(dm[b * 32 + r]), mn = cf_h2f(dm[b * 32 + 16 + r]);
                f = fmaf((float)acc, d * xq->s[i], f);
                f = fmaf(mn, xq->sm[i], f);
            }
            out[m * RG + r] = f;
        }
#endif
}

/* A group of 16 kind-9 or kind-8 weight rows (w at the group) against activation
 * rows m0..m0+RM: out[m * 16 + r]. Kind 8 passes its blocks' scales ds (at the
 * group); kind 9 passes NULL and its rows' scales are applied by the caller. */
INLINE void tile_q8(const uint8_t *w, const uint16_t *ds, int64_t nb, const xquant *xq, int64_t m0,
                    int RM, float *out) {
#if defined(CF_AVX512)
    __m512 f[XM];
    for (int m = 0; m < RM; m++) f[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 512;
        prefetch(wb + PREFETCH_BLOCKS * 512, 512);
        const __m512 d =
            ds ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ds + b * 16))) : _mm512_setzero_ps();
        for (int m = 0; m < RM; m++) {
            const int64_t i = (m0 + m) * nb + b;
            const __m512i acc = dot_q8(wb, xq->q + i * 2 * QK, xq->off[i]);
            const __m512 xs = _mm512_set1_ps(xq->s[i]);
            f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), ds ? _mm512_mul_ps(d, xs) : xs, f[m]);
        }
    }
    for (int m = 0; m < RM; m++) _mm512_storeu_ps(out + m * RG, f[m]);
#elif defined(CF_AVX2)
    /* vpmaddwd of the weights + 128 (zero-extended to int16) and the activations'
     * int16 xq, then the 128 * sum(xq) the offset adds taken off per block (xquant.off):
     * |pair| <= 2 * 255 * 16320, exact in int32. (vpmaddubsw needs q's sign moved onto
     * x and a widening per product, and two digits: twice the instructions.) */
    const __m256i order = ROW_ORDER;
    const int64_t K = nb * QK;
    for (int h = 0; h < 2; h++) { /* rows 8h..8h+7 */
        __m256 f[XM];
        for (int m = 0; m < RM; m++) f[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * 512 + 32 * h;
            if (h == 0) prefetch(wb + PREFETCH_BLOCKS * 512, 512);
            __m256i lo[XM], hi[XM]; /* rows 0-3, rows 4-7 */
            for (int m = 0; m < RM; m++) lo[m] = hi[m] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i w0 = load_u16(wb + 64 * c), w1 = load_u16(wb + 64 * c + 16);
                for (int m = 0; m < RM; m++) {
                    const __m256i xv = bcast8(xq->q16 + (m0 + m) * K + b * QK + 4 * c);
                    lo[m] = _mm256_add_epi32(lo[m], _mm256_madd_epi16(w0, xv));
                    hi[m] = _mm256_add_epi32(hi[m], _mm256_madd_epi16(w1, xv));
                }
            }
            const __m256 d = ds ? _mm256_permutevar8x32_ps(cf_h8(ds + b * 16 + 8 * h), order)
                                : _mm256_setzero_ps();
            for (int m = 0; m < RM; m++) {
                const int64_t i = (m0 + m) * nb + b;
                const __m256i acc =
                    _mm256_sub_epi32(_mm256_hadd_epi32(lo[m], hi[m]), _mm256_set1_epi32(xq->off[i]));
                const __m256 xs = _mm256_set1_ps(xq->s[i]);
                f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), ds ? _mm256_mul_ps(d, xs) : xs, f[m]);
            }
        }
        for (int m = 0; m < RM; m++)
            _mm256_storeu_ps(out + m * RG + 8 * h, _mm256_permutevar8x32_ps(f[m], order));
    }
#elif defined(CF_NEON)
    float32x4_t f[XM][4];
    for (int m = 0; m < RM; m++)
        for (int t = 0; t < 4; t++) f[m][t] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 512;
        float32x4_t d[4];
        for (int t = 0; t < 4; t++) d[t] = ds ? cf_h4(ds + b * 16 + 4 * t) : vdupq_n_f32(0.f);
        for (int m = 0; m < RM; m++) {
            const int64_t i = (m0 + m) * nb + b;
            int32x4_t acc[4];
            dot_q8(wb, xq->q + i * 2 * QK, acc);
            const float32x4_t xs = vdupq_n_f32(xq->s[i]);
            for (int t = 0; t < 4; t++)
                f[m][t] = vfmaq_f32(f[m][t], vcvtq_f32_s32(acc[t]), ds ? vmulq_f32(d[t], xs) : xs);
        }
    }
    for (int m = 0; m < RM; m++)
        for (int t = 0; t < 4; t++) vst1q_f32(out + m * RG + 4 * t, f[m][t]);
#else
    for (int m = 0; m < RM; m++)
        for (int r = 0; r < RG; r++) {
            float f = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const int64_t i = (m0 + m) * nb + b;
                const int8_t *x = xq->q + i * 2 * QK;
                const uint8_t *q = w + b * 512 + r * 4;
                int32_t acc = 0;
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++)
                        acc += (q[64 * c + j] - 128) * (128 * x[4 * c + j] + x[32 + 4 * c + j]);
                const float xs = xq->s[i];
                f = fmaf((float)acc, ds ? cf_h2f(ds[b * 16 + r]) * xs : xs, f);
            }
            out[m * RG + r] = f;
        }
#endif
}

/* Group g (rows 16g..16g+15) against activation rows m0..m0+RM. */
INLINE void group_tile(const cf_lin *l, const xquant *xq, int64_t g, int64_t m0, int RM,
                       float *out) {
    const int64_t nb = l->k / QK;
    if (l->kind == 5)
        tile_q4((const uint8_t *)l->w + g * nb * 256, (const uint16_t *)l->scales + g * nb * 32, nb,
                xq, m0, RM, out);
    else
        tile_q8((const uint8_t *)l->w + g * nb * 512,
                l->kind == 8 ? (const uint16_t *)l->scales + g * nb * 16 : NULL, nb, xq, m0, RM, out);
}

#define GROUP_TILE(R) \
    case R: group_tile(l, &xq, g, m0, R, out); break;

/* Kinds 5, 8 and 9, any number of rows: quantise the activations, then the groups of
 * 16 weight rows over the threads, each against tiles of up to XM activation rows
 * (its weights, a few KiB, stay in L1 across the tiles of a prompt). */
static int linear_q(const cf_lin *l, const float *x, int64_t M, float *y, int threads) {
    const int64_t N = l->n, K = l->k, nb = K / QK, groups = (N + RG - 1) / RG;
    const float *bias = l->bias, *rs = l->kind == 9 ? (const float *)l->scales : NULL;
    /* floats first: s, sm (M * nb each), then off (M * nb int32), then q16 (M * K int16),
     * then q (M * 2K int8) */
    char *buf = malloc((size_t)(M * nb) * 12 + (size_t)(M * K) * 2 + (size_t)(M * 2 * K));
    if (!buf) return -1;
    const xquant xq = {(int8_t *)(buf + M * nb * 12 + M * K * 2), (float *)buf,
                       (float *)buf + M * nb, (int32_t *)((float *)buf + 2 * M * nb),
                       (int16_t *)(buf + M * nb * 12)};
    /* A few rows (decode steps) are quantised here, in a microsecond: splitting them
     * over the threads would cost a barrier, and a barrier waits a whole time slice
     * when another process holds the other core. */
    const int serial = M <= XM;
    if (serial)
        for (int64_t i = 0; i < M * nb; i++)
            quantize_block(x + i * QK, xq.q + i * 2 * QK, xq.q16 + i * QK, xq.s + i, xq.sm + i,
                               xq.off + i);
#pragma omp parallel num_threads(threads)
    {
        if (!serial) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * nb; i++)
                quantize_block(x + i * QK, xq.q + i * 2 * QK, xq.q16 + i * QK, xq.s + i, xq.sm + i,
                               xq.off + i);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            float out[XM * RG];
            const int64_t n0 = g * RG, nr = N - n0 < RG ? N - n0 : RG;
            for (int64_t m0 = 0; m0 < M; m0 += XM) {
                const int rm = M - m0 < XM ? (int)(M - m0) : XM;
                switch (rm) {
                    GROUP_TILE(1)
                    GROUP_TILE(2)
                    GROUP_TILE(3)
#if XM > 4
                    GROUP_TILE(4)
                    GROUP_TILE(5)
                    GROUP_TILE(6)
                    GROUP_TILE(7)
#endif
                default: group_tile(l, &xq, g, m0, XM, out); break;
                }
                for (int m = 0; m < rm; m++)
                    for (int64_t r = 0; r < nr; r++) {
                        const float v = out[m * RG + r], b = bias ? bias[n0 + r] : 0.f;
                        y[(m0 + m) * N + n0 + r] = rs ? fmaf(v, rs[n0 + r], b) : v + b;
                    }
            }
        }
    }
    free(buf);
    return 0;
}

/* Dense fp32 weights (kind 32): the decode step of an unquantised model. */
INLINE void tile_f32(const float *w, int64_t K, const float *x, int RN, int RM, float *out) {
#if defined(CF_AVX512)
    __m512 acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 xv[4];
        for (int m = 0; m < RM; m++) xv[m] = _mm512_loadu_ps(x + m * K + k);
        for (int r = 0; r < RN; r++) {
            const __m512 wv = _mm512_loadu_ps(w + r * K + k);
            for (int m = 0; m < RM; m++) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(CF_AVX2)
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
#elif defined(CF_NEON)
    /* 4 lanes; K % 32 == 0 (linear.py sends no other K to the kernels).
     * Float sums in another order than plain C's, as with AVX2: close, not identical. */
    float32x4_t acc[4][4];
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) acc[r][m] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < K; k += 4) {
        float32x4_t xv[4];
        for (int m = 0; m < RM; m++) xv[m] = vld1q_f32(x + m * K + k);
        for (int r = 0; r < RN; r++) {
            const float32x4_t wv = vld1q_f32(w + r * K + k);
            for (int m = 0; m < RM; m++) acc[r][m] = vfmaq_f32(acc[r][m], wv, xv[m]);
        }
    }
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) out[r * RM + m] = vaddvq_f32(acc[r][m]);
#else
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += w[r * K + k] * x[m * K + k];
            out[r * RM + m] = acc;
        }
#endif
}

/* Rows n..n+RN of y for activation rows m0..m0+RM (kind 32). */
INLINE void tile(const float *w, const float *bias, int64_t K, int64_t N, const float *x, int64_t n,
                 int64_t m0, int RN, int RM, float *y) {
    float out[16];
    tile_f32(w + n * K, K, x + m0 * K, RN, RM, out);
    for (int r = 0; r < RN; r++)
        for (int m = 0; m < RM; m++)
            y[(m0 + m) * N + n + r] = out[r * RM + m] + (bias ? bias[n + r] : 0.f);
}

#define TILES(RN)                                                     \
    for (int64_t m0 = 0; m0 < M; m0 += 4) {                           \
        switch (M - m0 < 4 ? M - m0 : 4) {                            \
        case 1: tile(w, bias, K, N, x, n, m0, RN, 1, y); break;       \
        case 2: tile(w, bias, K, N, x, n, m0, RN, 2, y); break;       \
        case 3: tile(w, bias, K, N, x, n, m0, RN, 3, y); break;       \
        default: tile(w, bias, K, N, x, n, m0, RN, 4, y); break;      \
        }                                                             \
    }

/* y (M, N) = x (M, K) W^T (+ bias); see cf_lin. Returns 0, or -1 when out of memory. */
int cf_linear(const cf_lin *l, const float *x, int64_t M, float *y, int threads) {
    if (l->kind != 32) return linear_q(l, x, M, y, threads);
    const float *w = l->w, *bias = l->bias;
    const int64_t N = l->n, K = l->k;
    /* Groups of 4 weight rows (with AVX2, 2 when 4 activation rows: 8
     * accumulators plus the loaded vectors fit its 16 registers; AVX-512 has
     * 32); a leftover row alone. */
#ifdef CF_AVX512
    const int64_t rn = 4, groups = N / rn;
#else
    const int64_t rn = M >= 4 ? 2 : 4, groups = N / rn;
#endif
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

/* The fp32 weight (N, K) of kind 5, 8 or 9 (the reference the tests compare with, and
 * torch's matmul of a long input when the C forward step does not run). */
void cf_dequantize(int kind, const void *w, const void *scales, int64_t N, int64_t K, float *out,
                   int threads) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * K;
        const int64_t g = n / RG, r = n % RG;
        if (kind == 9 || kind == 8) {
            const uint8_t *q = (const uint8_t *)w + g * nb * 512 + r * 4;
            const uint16_t *ds = (const uint16_t *)scales + g * nb * 16 + r;
            for (int64_t b = 0; b < nb; b++) {
                const float s = kind == 9 ? ((const float *)scales)[n] : cf_h2f(ds[b * 16]);
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++)
                        o[b * QK + 4 * c + j] = (float)(q[b * 512 + 64 * c + j] - 128) * s;
            }
        } else {
            const uint8_t *q = (const uint8_t *)w + g * nb * 256 + r * 4;
            const uint16_t *dm = (const uint16_t *)scales + g * nb * 32 + r;
            for (int64_t b = 0; b < nb; b++) {
                /* q * d is exact in fp32 (4 bits times fp16's 11): one rounding, as GGUF's */
                const float d = cf_h2f(dm[b * 32]), mn = cf_h2f(dm[b * 32 + 16]);
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t v = q[b * 256 + 64 * c + j];
                        o[b * QK + 4 * c + j] = (float)(v & 0x0f) * d + mn;
                        o[b * QK + 16 + 4 * c + j] = (float)(v >> 4) * d + mn;
                    }
            }
        }
    }
}
