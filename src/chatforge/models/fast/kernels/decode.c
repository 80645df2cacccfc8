/* The forward pass of a Llama-family or GPT-2 model through all its layers, in
 * one call, for any set of rows: each row is one token of one sequence at its
 * own position. A decode step is one row per sequence; a prefill (or a chunk
 * of one) is many rows of one sequence at consecutive positions; one call may
 * mix both.
 *
 * Why in C: at batch 1 a layer is ~30 small torch ops (norms, RoPE, cache
 * writes, attention, residuals) of 5-10 us dispatch each, ~9 ms a token for
 * SmolLM2's 30 layers: as long as reading all the int4 weights.
 *
 * Why one kernel for prefill and decode: every row is computed the same way
 * whatever else is in the call. The linears (qlinear.c) reduce each output in
 * a fixed order per row; attention is per (row, head) over the cache in
 * position order; norms are per row. So a token's logits do not depend on the
 * batch, on how a prompt was split into chunks, or on whether its prefix came
 * from the prefix cache: greedy output is batch-invariant.
 *
 *   llama: h = rmsnorm(x) * n1;  q,k,v = h Wqkv^T;  rotate q,k;  cache[pos] = k,v
 *          x += attention(q, cache[0..pos]) Wo^T
 *          h = rmsnorm(x) * n2;  g,u = h Wgu^T;  x += (silu(g) * u) Wdown^T
 *   gpt2:  the same with LayerNorm (weight + bias), no rotation, and
 *          x += gelu_tanh(h Wup^T + b) Wdown^T
 *
 * x is (R, hidden) fp32. The KV cache is paged: per layer a pool of blocks
 * (n_blocks, kv_heads, block, head_dim) fp32; row r belongs to sequence
 * seq[r], whose block table is tables[seq[r] * max_blocks ...]: position p
 * lives in block table[p / block] at offset p % block. Within a layer every
 * row's K/V is written before any row attends, so rows of one sequence at
 * consecutive positions see each other causally.
 * Q/K rows are stored with each rotated pair adjacent (see convert.py), so RoPE
 * is a complex multiply by rope[pos] = (cos, sin) pairs.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#if !defined(CF_PLAIN) && defined(__AVX2__) && defined(__FMA__) /* CF_PLAIN: qlinear.c */
#include <immintrin.h>
#define CF_AVX2 1

/* exp(x) for 8 floats: Cephes' polynomial after splitting off 2^n, within a
 * couple of ulp of expf (the scalar expf is ~20 cycles; silu over 1536
 * features a layer made it a visible share of a token). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#elif !defined(CF_PLAIN) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define CF_NEON 1

/* exp8's operations on 4 floats (so the same values as AVX2's, lane for lane). */
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    const float32x4_t y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

#endif

/* act (n) = silu(g) * u */
static void silu_mul(const float *g, const float *u, int64_t n, float *act) {
    int64_t i = 0;
#ifdef CF_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
    }
#elif defined(CF_NEON)
    const float32x4_t one = vdupq_n_f32(1.f);
    for (; i + 4 <= n; i += 4) {
        const float32x4_t gv = vld1q_f32(g + i);
        const float32x4_t den = vaddq_f32(one, exp4(vnegq_f32(gv)));
        vst1q_f32(act + i, vmulq_f32(vdivq_f32(gv, den), vld1q_f32(u + i)));
    }
#endif
    for (; i < n; i++) act[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* v (n) = gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), in place;
 * tanh(y) = 1 - 2 / (exp(2y) + 1). */
static void gelu_tanh(float *v, int64_t n) {
    const float c = 0.7978845608028654f;
    int64_t i = 0;
#ifdef CF_AVX2
    const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f), half = _mm256_set1_ps(.5f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(v + i);
        const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        const __m256 y = _mm256_mul_ps(_mm256_set1_ps(c),
                                       _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
        const __m256 e = exp8(_mm256_mul_ps(two, y));
        const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
        _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t)));
    }
#elif defined(CF_NEON)
    const float32x4_t one = vdupq_n_f32(1.f), two = vdupq_n_f32(2.f), half = vdupq_n_f32(.5f);
    for (; i + 4 <= n; i += 4) {
        const float32x4_t x = vld1q_f32(v + i);
        const float32x4_t x3 = vmulq_f32(vmulq_f32(x, x), x);
        const float32x4_t y = vmulq_f32(vdupq_n_f32(c), vfmaq_f32(x, vdupq_n_f32(0.044715f), x3));
        const float32x4_t e = exp4(vmulq_f32(two, y));
        const float32x4_t t = vsubq_f32(one, vdivq_f32(two, vaddq_f32(e, one)));
        vst1q_f32(v + i, vmulq_f32(vmulq_f32(half, x), vaddq_f32(one, t)));
    }
#endif
    for (; i < n; i++) {
        const float x = v[i];
        v[i] = 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
}

#define CF_LORA_MAX_R 1024 /* summed rank of a fused linear (checked in lora.py) */
#define LORA_KC 128 /* inputs per partial sum of x A^T: fixed, so no sum depends on R or threads */
#define LORA_RT 8   /* rows per work item */

/* p[0..8*NB) = sum over kk in [k0, k1) of x[kk] * a[kk * rank + 0..8*NB) (fp16): NB
 * sums of 8 ranks, each kept in a register across kk; the even and odd kk summed
 * apart and then added (two chains: an FMA's latency is 4 cycles). */
static inline void xa_block(const float *x, const uint16_t *a, int64_t rank, int64_t k0,
                            int64_t k1, float *p, const int NB) {
#if defined(CF_AVX2)
    __m256 e[4], o[4];
    for (int b = 0; b < NB; b++) e[b] = o[b] = _mm256_setzero_ps();
    int64_t kk = k0;
    for (; kk + 2 <= k1; kk += 2) {
        const __m256 xe = _mm256_set1_ps(x[kk]), xo = _mm256_set1_ps(x[kk + 1]);
        const uint16_t *ae = a + kk * rank, *ao = ae + rank;
        for (int b = 0; b < NB; b++) {
            e[b] = _mm256_fmadd_ps(xe, cf_h8(ae + 8 * b), e[b]);
            o[b] = _mm256_fmadd_ps(xo, cf_h8(ao + 8 * b), o[b]);
        }
    }
    if (kk < k1) {
        const __m256 xe = _mm256_set1_ps(x[kk]);
        for (int b = 0; b < NB; b++) e[b] = _mm256_fmadd_ps(xe, cf_h8(a + kk * rank + 8 * b), e[b]);
    }
    for (int b = 0; b < NB; b++) _mm256_storeu_ps(p + 8 * b, _mm256_add_ps(e[b], o[b]));
#elif defined(CF_NEON)
    float32x4_t e[8], o[8]; /* 4 ranks each */
    for (int b = 0; b < 2 * NB; b++) e[b] = o[b] = vdupq_n_f32(0.f);
    int64_t kk = k0;
    for (; kk + 2 <= k1; kk += 2) {
        const float xe = x[kk], xo = x[kk + 1];
        const uint16_t *ae = a + kk * rank, *ao = ae + rank;
        for (int b = 0; b < 2 * NB; b++) {
            e[b] = vfmaq_n_f32(e[b], cf_h4(ae + 4 * b), xe);
            o[b] = vfmaq_n_f32(o[b], cf_h4(ao + 4 * b), xo);
        }
    }
    if (kk < k1)
        for (int b = 0; b < 2 * NB; b++)
            e[b] = vfmaq_n_f32(e[b], cf_h4(a + kk * rank + 4 * b), x[kk]);
    for (int b = 0; b < 2 * NB; b++) vst1q_f32(p + 4 * b, vaddq_f32(e[b], o[b]));
#else
    float e[32], o[32];
    for (int i = 0; i < 8 * NB; i++) e[i] = o[i] = 0.f;
    int64_t kk = k0;
    for (; kk + 2 <= k1; kk += 2)
        for (int i = 0; i < 8 * NB; i++) {
            e[i] += x[kk] * cf_h2f(a[kk * rank + i]);
            o[i] += x[kk + 1] * cf_h2f(a[(kk + 1) * rank + i]);
        }
    if (kk < k1)
        for (int i = 0; i < 8 * NB; i++) e[i] += x[kk] * cf_h2f(a[kk * rank + i]);
    for (int i = 0; i < 8 * NB; i++) p[i] = e[i] + o[i];
#endif
}

/* y[0..n) += tv * b[0..n) (fp16). */
static inline void axpy_h(float *y, float tv, const uint16_t *b, int64_t n) {
    int64_t j = 0;
#if defined(CF_AVX2)
    const __m256 t = _mm256_set1_ps(tv);
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(t, cf_h8(b + j), _mm256_loadu_ps(y + j)));
    for (; j < n; j++) y[j] = fmaf(tv, cf_h2f(b[j]), y[j]);
#elif defined(CF_NEON)
    for (; j + 4 <= n; j += 4) vst1q_f32(y + j, vfmaq_n_f32(vld1q_f32(y + j), cf_h4(b + j), tv));
    for (; j < n; j++) y[j] = fmaf(tv, cf_h2f(b[j]), y[j]);
#else
    for (; j < n; j++) y[j] += tv * cf_h2f(b[j]);
#endif
}

/* One adapter's delta of one linear added to the m rows `rows` of y (., n); x (., k)
 * is the linear's input. Two passes, each reading the adapter once for up to LORA_RT
 * rows (decode is bound by the adapter's bytes: at batch 1 they are its cost):
 *   1. part (nkc, m, r): x A^T summed over each chunk of LORA_KC inputs in order;
 *   2. per slice of the output columns: t = the chunks' sums added in chunk order,
 *      times the rank's scale, then y += t B^T rank by rank, over the columns where
 *      that rank's row of B^T is not zero (spans), reading B^T's packed rows in order.
 * Each output's sums run in one order whatever R, the rows beside it or the thread
 * count (the column slices only split the work): the result is batch-invariant.
 * A few rows (a decode step) run on one thread: a barrier waits a whole time slice
 * when another process holds the other core, and split slices cut B^T's one stream
 * into short runs the prefetcher does not follow (both measured slower). */
static int lora_rows(const cf_lora *l, const int32_t *rows, int64_t m, const float *x,
                     int64_t k, float *y, int64_t n, int nthreads) {
    const int64_t rank = l->r, nkc = (k + LORA_KC - 1) / LORA_KC;
    const int64_t nrt = (m + LORA_RT - 1) / LORA_RT;
    float *part = malloc((size_t)(nkc * m * rank) * sizeof(float));
    if (!part) return -1;
    const int team = m > LORA_RT ? nthreads : 1;
    const int64_t nc = ((n + team - 1) / team + 15) / 16 * 16; /* columns per slice */
    const int64_t nnc = (n + nc - 1) / nc;
#pragma omp parallel num_threads(team) if (team > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < nrt * nkc; w++) {
            const int64_t q0 = (w / nkc) * LORA_RT, c = w % nkc, k0 = c * LORA_KC;
            const int64_t q1 = q0 + LORA_RT < m ? q0 + LORA_RT : m;
            const int64_t k1 = k0 + LORA_KC < k ? k0 + LORA_KC : k;
            for (int64_t q = q0; q < q1; q++) {
                const float *xr = x + (int64_t)rows[q] * k;
                float *p = part + (c * m + q) * rank;
                int64_t i0 = 0;
                for (; i0 + 32 <= rank; i0 += 32)
                    xa_block(xr, l->a_t + i0, rank, k0, k1, p + i0, 4);
                switch ((rank - i0) / 8) { /* ranks 8, 16, 24 (per part) */
                case 3: xa_block(xr, l->a_t + i0, rank, k0, k1, p + i0, 3), i0 += 24; break;
                case 2: xa_block(xr, l->a_t + i0, rank, k0, k1, p + i0, 2), i0 += 16; break;
                case 1: xa_block(xr, l->a_t + i0, rank, k0, k1, p + i0, 1), i0 += 8; break;
                default: break;
                }
                for (; i0 < rank; i0++) { /* a rank that is not a multiple of 8 */
                    float acc = 0.f;
                    for (int64_t kk = k0; kk < k1; kk++)
                        acc += xr[kk] * cf_h2f(l->a_t[kk * rank + i0]);
                    p[i0] = acc;
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t w = 0; w < nrt * nnc; w++) {
            const int64_t q0 = (w / nnc) * LORA_RT, j0 = (w % nnc) * nc;
            const int64_t q1 = q0 + LORA_RT < m ? q0 + LORA_RT : m;
            const int64_t j1 = j0 + nc < n ? j0 + nc : n;
            for (int64_t q = q0; q < q1; q++) {
                float t[CF_LORA_MAX_R];
                for (int64_t i = 0; i < rank; i++) t[i] = part[q * rank + i];
                for (int64_t c = 1; c < nkc; c++)
                    for (int64_t i = 0; i < rank; i++) t[i] += part[(c * m + q) * rank + i];
                float *yr = y + (int64_t)rows[q] * n;
                for (int64_t i = 0; i < rank; i++) {
                    const int64_t *sp = l->spans + 3 * i;
                    const int64_t lo = sp[0] > j0 ? sp[0] : j0, hi = sp[1] < j1 ? sp[1] : j1;
                    if (lo < hi)
                        axpy_h(yr + lo, t[i] * l->scales[i], l->b_t + sp[2] + lo - sp[0], hi - lo);
                }
            }
        }
    }
    free(part);
    return 0;
}

/* Rows whose row_lora[r] >= 0 get that adapter's delta of linear `which` (0 qkv,
 * 1 out, 2 up, 3 down) of layer li added to y (R, n); x (R, k) is the linear's
 * input. loras: (n_adapters, n_layers, 4). The rows of each adapter go together,
 * so the adapter is read once per call, not once per row. Returns 0, or -1 when out
 * of memory. */
static int lora_add(const cf_lora *loras, const int32_t *row_lora, int64_t n_layers,
                    int64_t li, int which, const float *x, int64_t k, float *y, int64_t n,
                    int64_t R, int nthreads) {
    if (!loras || !row_lora) return 0;
    int32_t slots = 0;
    for (int64_t r = 0; r < R; r++) slots = row_lora[r] + 1 > slots ? row_lora[r] + 1 : slots;
    if (slots == 0) return 0;
    int32_t *rows = malloc((size_t)R * sizeof *rows);
    if (!rows) return -1;
    int rc = 0;
    for (int32_t s = 0; s < slots && rc == 0; s++) {
        const cf_lora *l = &loras[((int64_t)s * n_layers + li) * 4 + which];
        if (!l->a_t) continue;
        int64_t m = 0;
        for (int64_t r = 0; r < R; r++)
            if (row_lora[r] == s) rows[m++] = (int32_t)r;
        if (m > 0) rc = lora_rows(l, rows, m, x, k, y, n, nthreads);
    }
    free(rows);
    return rc;
}

/* y (R, H) = norm(x) * w (+ b): RMSNorm when b is NULL, else LayerNorm. */
void cf_norm(const float *x, const float *w, const float *b, float eps, int64_t R, int64_t H,
             float *y) {
    for (int64_t r = 0; r < R; r++) {
        const float *v = x + r * H;
        float *o = y + r * H;
        if (b == NULL) {
            float ss = 0.f;
            for (int64_t i = 0; i < H; i++) ss += v[i] * v[i];
            const float s = 1.f / sqrtf(ss / (float)H + eps);
            for (int64_t i = 0; i < H; i++) o[i] = v[i] * s * w[i];
        } else {
            float mean = 0.f, var = 0.f;
            for (int64_t i = 0; i < H; i++) mean += v[i];
            mean /= (float)H;
            for (int64_t i = 0; i < H; i++) var += (v[i] - mean) * (v[i] - mean);
            const float s = 1.f / sqrtf(var / (float)H + eps);
            for (int64_t i = 0; i < H; i++) o[i] = (v[i] - mean) * s * w[i] + b[i];
        }
    }
}

static void rotate(float *v, const float *cs, int64_t pairs) {
    for (int64_t i = 0; i < pairs; i++) {
        const float a = v[2 * i], b = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
    }
}

#ifdef CF_AVX2
/* scores[t] = exp(scores[t] - mx) for t < len, in place; returns their sum (8 lanes
 * summed by hsum, then the tail in order: one order for every AVX2 attention path). */
static inline float exp_scores(float *scores, int64_t len, float mx) {
    int64_t t = 0;
    __m256 sv = _mm256_setzero_ps();
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(scores + t, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; t < len; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    return sum;
}

/* attend() for head_dim = 8 * DV, DV a literal (q, the output and the sums stay in
 * registers): the same float operations as its general AVX2 path, in the same order
 * (so the same results), with 4 keys' dot products interleaved: each key's sum is one
 * chain of DV dependent FMAs, and a key at a time left the FMA units waiting on it
 * (a prompt's attention took ~40 % of the time of its linears). The 4 sums are
 * reduced as hsum() reduces one, pair for pair: (x0 + x4) + (x2 + x6) + ... */
static inline __attribute__((always_inline)) void attend_dv(
    const float *q, const float *kc, const float *vc, const int32_t *table, int64_t Hkv,
    int64_t j, int64_t BS, int64_t len, const int DV, float *scores, float *out) {
    const int64_t D = 8 * DV, nblk = (len + BS - 1) / BS;
    const float scale = 1.f / sqrtf((float)D);
    const __m128 vscale = _mm_set1_ps(scale);
    __m256 qv[DV], acc[DV];
    for (int d = 0; d < DV; d++) qv[d] = _mm256_loadu_ps(q + 8 * d);
    float mx = -INFINITY, sum = 0.f;
    __m128 vmx = _mm_set1_ps(-INFINITY);
    for (int64_t bi = 0; bi < nblk; bi++) {
        const float *k = kc + ((int64_t)table[bi] * Hkv + j) * BS * D;
        const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) {
            __m256 s[4];
            for (int u = 0; u < 4; u++) s[u] = _mm256_setzero_ps();
            for (int d = 0; d < DV; d++)
                for (int u = 0; u < 4; u++)
                    s[u] = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(k + (t + u) * D + 8 * d), s[u]);
            __m128 a[4];
            for (int u = 0; u < 4; u++)
                a[u] = _mm_add_ps(_mm256_castps256_ps128(s[u]), _mm256_extractf128_ps(s[u], 1));
            _MM_TRANSPOSE4_PS(a[0], a[1], a[2], a[3]); /* a[i]: lane i of the 4 keys */
            const __m128 sc =
                _mm_mul_ps(_mm_add_ps(_mm_add_ps(a[0], a[2]), _mm_add_ps(a[1], a[3])), vscale);
            _mm_storeu_ps(scores + bi * BS + t, sc);
            vmx = _mm_max_ps(vmx, sc);
        }
        for (; t < n; t++) {
            __m256 s = _mm256_setzero_ps();
            for (int d = 0; d < DV; d++) s = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(k + t * D + 8 * d), s);
            const float sc = hsum(s) * scale;
            scores[bi * BS + t] = sc;
            mx = sc > mx ? sc : mx;
        }
    }
    vmx = _mm_max_ps(vmx, _mm_movehl_ps(vmx, vmx));
    vmx = _mm_max_ss(vmx, _mm_movehdup_ps(vmx));
    mx = _mm_cvtss_f32(vmx) > mx ? _mm_cvtss_f32(vmx) : mx;
    sum = exp_scores(scores, len, mx);
    for (int d = 0; d < DV; d++) acc[d] = _mm256_setzero_ps();
    for (int64_t bi = 0; bi < nblk; bi++) {
        const float *v = vc + ((int64_t)table[bi] * Hkv + j) * BS * D;
        const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
        for (int64_t tt = 0; tt < n; tt++) {
            const __m256 p = _mm256_set1_ps(scores[bi * BS + tt]);
            for (int d = 0; d < DV; d++)
                acc[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + tt * D + 8 * d), acc[d]);
        }
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int d = 0; d < DV; d++) _mm256_storeu_ps(out + 8 * d, _mm256_mul_ps(acc[d], inv));
}
#endif

/* One query head q (D,) over positions 0..len-1 of its KV head j, whose block
 * t / BS of the sequence is table[t / BS]; scores is scratch (len,). */
static void attend(const float *q, const float *kc, const float *vc, const int32_t *table,
                   int64_t Hkv, int64_t j, int64_t BS, int64_t len, int64_t D, float *scores,
                   float *out) {
    const float scale = 1.f / sqrtf((float)D);
    float mx = -INFINITY, sum = 0.f;
#if defined(CF_AVX2) || defined(CF_NEON)
    const int64_t nblk = (len + BS - 1) / BS;
#endif
#ifdef CF_AVX2
    if (D == 64) { /* SmolLM2-135M; Llama 3.2, Qwen 2.5: 128 */
        attend_dv(q, kc, vc, table, Hkv, j, BS, len, 8, scores, out);
        return;
    }
    if (D == 128) {
        attend_dv(q, kc, vc, table, Hkv, j, BS, len, 16, scores, out);
        return;
    }
    if (D % 8 == 0 && D <= 256) {
        __m256 qv[32], acc[32];
        for (int64_t d = 0; d < D / 8; d++) qv[d] = _mm256_loadu_ps(q + 8 * d);
        for (int64_t bi = 0; bi < nblk; bi++) {
            const float *k = kc + ((int64_t)table[bi] * Hkv + j) * BS * D;
            const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
            for (int64_t t = 0; t < n; t++) {
                __m256 s = _mm256_setzero_ps();
                for (int64_t d = 0; d < D / 8; d++)
                    s = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(k + t * D + 8 * d), s);
                const float sc = hsum(s) * scale;
                scores[bi * BS + t] = sc;
                mx = fmaxf(mx, sc);
            }
        }
        sum = exp_scores(scores, len, mx);
        for (int64_t d = 0; d < D / 8; d++) acc[d] = _mm256_setzero_ps();
        for (int64_t bi = 0; bi < nblk; bi++) {
            const float *v = vc + ((int64_t)table[bi] * Hkv + j) * BS * D;
            const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
            for (int64_t tt = 0; tt < n; tt++) {
                const __m256 p = _mm256_set1_ps(scores[bi * BS + tt]);
                for (int64_t d = 0; d < D / 8; d++)
                    acc[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + tt * D + 8 * d), acc[d]);
            }
        }
        const __m256 inv = _mm256_set1_ps(1.f / sum);
        for (int64_t d = 0; d < D / 8; d++) _mm256_storeu_ps(out + 8 * d, _mm256_mul_ps(acc[d], inv));
        return;
    }
#elif defined(CF_NEON)
    if (D % 4 == 0 && D <= 256) { /* the AVX2 path on 4 lanes (q and out stay in L1) */
        float32x4_t qv[64], acc[64];
        for (int64_t d = 0; d < D / 4; d++) qv[d] = vld1q_f32(q + 4 * d);
        for (int64_t bi = 0; bi < nblk; bi++) {
            const float *k = kc + ((int64_t)table[bi] * Hkv + j) * BS * D;
            const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
            for (int64_t t = 0; t < n; t++) {
                float32x4_t s = vdupq_n_f32(0.f);
                for (int64_t d = 0; d < D / 4; d++)
                    s = vfmaq_f32(s, qv[d], vld1q_f32(k + t * D + 4 * d));
                const float sc = vaddvq_f32(s) * scale;
                scores[bi * BS + t] = sc;
                mx = fmaxf(mx, sc);
            }
        }
        int64_t t = 0;
        float32x4_t sv = vdupq_n_f32(0.f);
        for (; t + 4 <= len; t += 4) {
            const float32x4_t e = exp4(vsubq_f32(vld1q_f32(scores + t), vdupq_n_f32(mx)));
            vst1q_f32(scores + t, e);
            sv = vaddq_f32(sv, e);
        }
        sum = vaddvq_f32(sv);
        for (; t < len; t++) {
            scores[t] = expf(scores[t] - mx);
            sum += scores[t];
        }
        for (int64_t d = 0; d < D / 4; d++) acc[d] = vdupq_n_f32(0.f);
        for (int64_t bi = 0; bi < nblk; bi++) {
            const float *v = vc + ((int64_t)table[bi] * Hkv + j) * BS * D;
            const int64_t n = len - bi * BS < BS ? len - bi * BS : BS;
            for (int64_t tt = 0; tt < n; tt++) {
                const float32x4_t p = vdupq_n_f32(scores[bi * BS + tt]);
                for (int64_t d = 0; d < D / 4; d++)
                    acc[d] = vfmaq_f32(acc[d], p, vld1q_f32(v + tt * D + 4 * d));
            }
        }
        const float32x4_t inv = vdupq_n_f32(1.f / sum);
        for (int64_t d = 0; d < D / 4; d++) vst1q_f32(out + 4 * d, vmulq_f32(acc[d], inv));
        return;
    }
#endif
    for (int64_t t = 0; t < len; t++) {
        const float *k = kc + (((int64_t)table[t / BS] * Hkv + j) * BS + t % BS) * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; d++) s += q[d] * k[d];
        scores[t] = s * scale;
        mx = fmaxf(mx, scores[t]);
    }
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (int64_t t = 0; t < len; t++) {
        const float *v = vc + (((int64_t)table[t / BS] * Hkv + j) * BS + t % BS) * D;
        const float p = scores[t] / sum;
        for (int64_t d = 0; d < D; d++) out[d] += p * v[d];
    }
}

/* Rows from which cf_forward splits its per-row work (norms, RoPE and cache writes)
 * over the threads: a prompt's 500 rows left one core idle ~5 % of its time; a
 * decode batch's few rows are not worth the barrier. */
#define PARALLEL_ROWS 64

/* cf_norm of each row (the same operations, row by row), over the threads. */
static void norm_rows(const float *x, const float *w, const float *b, float eps, int64_t R,
                      int64_t H, float *y, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (R >= PARALLEL_ROWS)
    for (int64_t r = 0; r < R; r++) cf_norm(x + r * H, w, b, eps, 1, H, y + r * H);
}

/* x (R, hidden) in: the tokens' embeddings; out: the last layer's output (before
 * the final norm). Row r is position pos[r] of sequence seq[r]; see the top of
 * this file. row_lora (R,): the LoRA adapter of each row (-1: none) in loras
 * (see cf_lora); both NULL when no row has one. Returns 0, or -1 when out of
 * memory. */
int cf_forward(const cf_model *m, float *x, int64_t R, const int64_t *pos, const int32_t *seq,
               const int32_t *tables, int64_t max_blocks, int threads, const int32_t *row_lora,
               const cf_lora *loras) {
    const int64_t H = m->hidden, Hq = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim;
    const int64_t I = m->inter, group = Hq / Hkv, BS = m->block, nqkv = (Hq + 2 * Hkv) * D;
    const int gpt2 = m->arch == 1;
    const int64_t up_n = gpt2 ? I : 2 * I;
    int64_t longest = 0;
    for (int64_t r = 0; r < R; r++) longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
    int nthreads = threads > 0 ? threads : 1;
    const int64_t floats = R * (H + nqkv + Hq * D + H + up_n + I) + (int64_t)nthreads * longest;
    float *buf = malloc((size_t)floats * sizeof(float));
    if (!buf) return -1;
    float *h = buf, *qkv = h + R * H, *att = qkv + R * nqkv, *tmp = att + R * Hq * D;
    float *gu = tmp + R * H, *act = gu + R * up_n, *scores = act + R * I;
    int rc = 0;
    for (int32_t li = 0; li < m->n_layers && rc == 0; li++) {
        const cf_layer *L = &m->layers[li];
        float *kc = m->k_cache[li], *vc = m->v_cache[li];
        norm_rows(x, L->norm1, L->norm1_b, m->eps, R, H, h, nthreads);
        if ((rc = cf_linear(&L->qkv, h, R, qkv, threads))) break;
        rc = lora_add(loras, row_lora, m->n_layers, li, 0, h, H, qkv, nqkv, R, nthreads);
        if (rc) break;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (R >= PARALLEL_ROWS)
        for (int64_t r = 0; r < R; r++) { /* rows write distinct cache positions */
            float *row = qkv + r * nqkv;
            if (m->rope) {
                const float *cs = m->rope + pos[r] * D; /* D/2 (cos, sin) pairs */
                for (int64_t hh = 0; hh < Hq + Hkv; hh++) rotate(row + hh * D, cs, D / 2);
            }
            const int32_t *table = tables + (int64_t)seq[r] * max_blocks;
            const int64_t blk = table[pos[r] / BS], off = pos[r] % BS;
            for (int64_t j = 0; j < Hkv; j++) { /* k then v at the row's position */
                const int64_t at = ((blk * Hkv + j) * BS + off) * D;
                memcpy(kc + at, row + (Hq + j) * D, (size_t)D * sizeof(float));
                memcpy(vc + at, row + (Hq + Hkv + j) * D, (size_t)D * sizeof(float));
            }
        }
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
        for (int64_t rh = 0; rh < R * Hq; rh++) {
            const int64_t r = rh / Hq, hh = rh % Hq;
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            attend(qkv + r * nqkv + hh * D, kc, vc, tables + (int64_t)seq[r] * max_blocks, Hkv,
                   hh / group, BS, pos[r] + 1, D, scores + (int64_t)tid * longest,
                   att + (r * Hq + hh) * D);
        }
        if ((rc = cf_linear(&L->out, att, R, tmp, threads))) break;
        rc = lora_add(loras, row_lora, m->n_layers, li, 1, att, Hq * D, tmp, H, R, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < R * H; i++) x[i] += tmp[i];
        norm_rows(x, L->norm2, L->norm2_b, m->eps, R, H, h, nthreads);
        if ((rc = cf_linear(&L->up, h, R, gu, threads))) break;
        rc = lora_add(loras, row_lora, m->n_layers, li, 2, h, H, gu, up_n, R, nthreads);
        if (rc) break;
        if (gpt2) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (R > 1)
            for (int64_t r = 0; r < R; r++) gelu_tanh(gu + r * I, I);
            if ((rc = cf_linear(&L->down, gu, R, tmp, threads))) break;
            rc = lora_add(loras, row_lora, m->n_layers, li, 3, gu, I, tmp, H, R, nthreads);
            if (rc) break;
        } else {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (R > 1)
            for (int64_t r = 0; r < R; r++) silu_mul(gu + r * 2 * I, gu + r * 2 * I + I, I, act + r * I);
            if ((rc = cf_linear(&L->down, act, R, tmp, threads))) break;
            rc = lora_add(loras, row_lora, m->n_layers, li, 3, act, I, tmp, H, R, nthreads);
            if (rc) break;
        }
        for (int64_t i = 0; i < R * H; i++) x[i] += tmp[i];
    }
    free(buf);
    return rc;
}
