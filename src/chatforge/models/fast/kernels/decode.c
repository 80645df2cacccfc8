/* The decode step of a Llama-family model through all its layers, in one call.
 *
 * Why in C: at batch 1 a layer is ~30 small torch ops (norms, RoPE, cache
 * writes, attention, residuals) of 5-10 us dispatch each, ~9 ms a token for
 * SmolLM2's 30 layers: as long as reading all the int4 weights. Here each is a
 * loop over a few hundred floats. The maths is FastDecoder.decode's, step for
 * step (tests compare the two with dense fp32 weights to 1e-4):
 *
 *   h = rmsnorm(x) * norm1;  q,k,v = h Wqkv^T;  rotate q,k;  cache[pos] = k,v
 *   x += attention(q, cache[0..pos]) Wo^T
 *   h = rmsnorm(x) * norm2;  g,u = h Wgu^T;  x += (silu(g) * u) Wdown^T
 *
 * x is (B, hidden) fp32, row b is cache slot b at position pos[b]. The caches
 * are fp32 (slots, kv_heads, capacity, head_dim). Q/K rows are stored with
 * each rotated pair adjacent (see convert.py), so RoPE is a complex multiply
 * by rope[pos] = (cos, sin) pairs.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
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
#endif
    for (; i < n; i++) act[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

typedef struct {
    const float *norm1, *norm2; /* RMSNorm weights (hidden,) */
    cf_lin qkv, out, up, down;  /* up: gate rows then up rows */
} cf_layer;

/* Mirrored by ctypes in native.py. */
typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter;
    float eps;
    int32_t pad;
    int64_t capacity; /* cache positions per slot */
    const cf_layer *layers;
    float *const *k_cache; /* per layer (slots, kv_heads, capacity, head_dim) */
    float *const *v_cache;
    const float *rope; /* (max_positions, head_dim / 2, 2): cos, sin */
} cf_model;

static void rmsnorm(const float *x, const float *w, float eps, int64_t B, int64_t H, float *y) {
    for (int64_t b = 0; b < B; b++) {
        const float *v = x + b * H;
        float ss = 0.f;
        for (int64_t i = 0; i < H; i++) ss += v[i] * v[i];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) y[b * H + i] = v[i] * r * w[i];
    }
}

static void rotate(float *v, const float *cs, int64_t pairs) {
    for (int64_t i = 0; i < pairs; i++) {
        const float a = v[2 * i], b = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
    }
}

/* One query head over positions 0..len-1 of its KV head; scores is scratch (len,). */
static void attend(const float *q, const float *k, const float *v, int64_t len, int64_t D,
                   float *scores, float *out) {
    const float scale = 1.f / sqrtf((float)D);
    float mx = -INFINITY, sum = 0.f;
#ifdef CF_AVX2
    if (D % 8 == 0 && D <= 256) {
        __m256 qv[32], acc[32];
        for (int64_t d = 0; d < D / 8; d++) qv[d] = _mm256_loadu_ps(q + 8 * d);
        for (int64_t t = 0; t < len; t++) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t d = 0; d < D / 8; d++)
                s = _mm256_fmadd_ps(qv[d], _mm256_loadu_ps(k + t * D + 8 * d), s);
            scores[t] = hsum(s) * scale;
            mx = fmaxf(mx, scores[t]);
        }
        int64_t t = 0;
        __m256 sv = _mm256_setzero_ps();
        for (; t + 8 <= len; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(scores + t, e);
            sv = _mm256_add_ps(sv, e);
        }
        sum = hsum(sv);
        for (; t < len; t++) {
            scores[t] = expf(scores[t] - mx);
            sum += scores[t];
        }
        for (int64_t d = 0; d < D / 8; d++) acc[d] = _mm256_setzero_ps();
        for (t = 0; t < len; t++) {
            const __m256 p = _mm256_set1_ps(scores[t]);
            for (int64_t d = 0; d < D / 8; d++)
                acc[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + t * D + 8 * d), acc[d]);
        }
        const __m256 inv = _mm256_set1_ps(1.f / sum);
        for (int64_t d = 0; d < D / 8; d++) _mm256_storeu_ps(out + 8 * d, _mm256_mul_ps(acc[d], inv));
        return;
    }
#endif
    for (int64_t t = 0; t < len; t++) {
        float s = 0.f;
        for (int64_t d = 0; d < D; d++) s += q[d] * k[t * D + d];
        scores[t] = s * scale;
        mx = fmaxf(mx, scores[t]);
    }
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (int64_t t = 0; t < len; t++) {
        const float p = scores[t] / sum;
        for (int64_t d = 0; d < D; d++) out[d] += p * v[t * D + d];
    }
}

/* x (B, hidden) in: the tokens' embeddings; out: the last layer's output (before
 * the final norm). Returns 0, or -1 when out of memory. */
int cf_decode_layers(const cf_model *m, float *x, int64_t B, const int64_t *pos, int threads) {
    const int64_t H = m->hidden, Hq = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim;
    const int64_t I = m->inter, group = Hq / Hkv, cap = m->capacity, nqkv = (Hq + 2 * Hkv) * D;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    const int64_t floats = B * (H + nqkv + Hq * D + H + 2 * I + I) + B * Hq * longest;
    float *buf = malloc((size_t)floats * sizeof(float));
    if (!buf) return -1;
    float *h = buf, *qkv = h + B * H, *att = qkv + B * nqkv, *tmp = att + B * Hq * D;
    float *gu = tmp + B * H, *act = gu + B * 2 * I, *scores = act + B * I;
    int rc = 0;
    for (int32_t li = 0; li < m->n_layers && rc == 0; li++) {
        const cf_layer *L = &m->layers[li];
        float *kc = m->k_cache[li], *vc = m->v_cache[li];
        rmsnorm(x, L->norm1, m->eps, B, H, h);
        if ((rc = cf_linear(&L->qkv, h, B, qkv, threads))) break;
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * nqkv;
            const float *cs = m->rope + pos[b] * D; /* D/2 (cos, sin) pairs */
            for (int64_t hh = 0; hh < Hq + Hkv; hh++) rotate(row + hh * D, cs, D / 2);
            for (int64_t j = 0; j < Hkv; j++) { /* k then v into slot b at pos[b] */
                const int64_t at = ((b * Hkv + j) * cap + pos[b]) * D;
                memcpy(kc + at, row + (Hq + j) * D, (size_t)D * sizeof(float));
                memcpy(vc + at, row + (Hq + Hkv + j) * D, (size_t)D * sizeof(float));
            }
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t bh = 0; bh < B * Hq; bh++) {
            const int64_t b = bh / Hq, hh = bh % Hq, j = hh / group;
            const int64_t base = (b * Hkv + j) * cap * D;
            attend(qkv + b * nqkv + hh * D, kc + base, vc + base, pos[b] + 1, D,
                   scores + bh * longest, att + (b * Hq + hh) * D);
        }
        if ((rc = cf_linear(&L->out, att, B, tmp, threads))) break;
        for (int64_t i = 0; i < B * H; i++) x[i] += tmp[i];
        rmsnorm(x, L->norm2, m->eps, B, H, h);
        if ((rc = cf_linear(&L->up, h, B, gu, threads))) break;
#pragma omp parallel for schedule(static) num_threads(threads) if (B > 1)
        for (int64_t b = 0; b < B; b++) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, I, act + b * I);
        if ((rc = cf_linear(&L->down, act, B, tmp, threads))) break;
        for (int64_t i = 0; i < B * H; i++) x[i] += tmp[i];
    }
    free(buf);
    return rc;
}
