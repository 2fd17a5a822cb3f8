/* One KV-cached decode step of a llama-style decoder for a batch of rows, in one call (hybrid.py's native path).

   Why C: at decode sizes a step is bandwidth-bound (every weight is read once for `rows` tokens), and in eager
   torch each of the ~25 small ops per layer costs 15-30 us on a CPU because the weight stream has just evicted
   the dispatcher from cache; here they are a few loops inside one OpenMP region. The GEMMs read weights packed
   in panels of PANEL columns (one sequential stream, no horizontal sums) with software prefetch well ahead, which
   streams at 18-20 GB/s on the bench CPU where MKL's packed small-M GEMM reaches 14-15.

   Two weight formats (Net.bf16): fp32 panels [N/P][K][P], or bf16 panels [N/P][K/2][P][2] (P = PANEL; each
   column's two consecutive k side by side: one 32-bit lane holds a (k, k+1) pair, half the bytes of fp32). A bf16
   GEMM rounds its input rows to bf16 pairs (as the torch bf16 model's activations are) and accumulates in fp32: with
   AVX512-BF16 one vdpbf16ps per 16 columns and k pair; elsewhere the pair is widened in registers (a 16-bit shift
   and a mask) for two fp32 FMAs. In bf16 the KV cache is bf16 (the one the torch prefill wrote) and everything
   between the GEMMs (norms, RoPE, softmax, SwiGLU, residual stream) is fp32.

   Maths (the same as HybridDecoder._layer): h = x / hypot(|x|, floor) * g (RMSNorm with floor = sqrt(H eps) and
   g = sqrt(H) * weight; in fp32 g is folded into the next weight matrix, g = NULL), fused q|k|v projection, RoPE
   with rotate_half's sign folded into `sin`, K/V written to the cache at position p, softmax attention over
   positions 0..p with an additive mask, o-projection added to x, SwiGLU MLP (fused gate|up) added to x; then the
   final norm and the lm head. Written with GCC vector extensions, so it builds for AVX2, AVX-512 or NEON. */
#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments of static functions: no ABI crosses them */
#include <math.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(CHATRLHF_NO_BF16_DOT)
#define BF16_DOT 1 /* vdpbf16ps: -DCHATRLHF_NO_BF16_DOT builds the portable widening GEMM instead (tests, timing) */
#include <immintrin.h>
#else
#define BF16_DOT 0
#endif

typedef unsigned short bf16_t;

/* The GEMM's panel width (columns packed side by side), vector type and row block: MR rows x PANEL columns of
   accumulators (MR * NV vectors) stay in registers, so each weight loaded feeds MR rows' FMAs.
   AVX-512 (32 registers of 16 floats): 32-column panels of 64-byte vectors, MR 8 (16 accumulators).
   Elsewhere (AVX2: 16 registers of 8 floats): 8-column panels of 32-byte vectors, MR 8 (8 accumulators): every
   weight is read once for up to 8 rows, and a panel is one sequential stream. Its 32-column panels with 2-row
   blocks (8 accumulators too) made 8 rows re-read each panel 4 times from L2; on a 2-core AVX2 EPYC (Zen 3) the
   mid model's layer GEMMs for 8 rows took 15.4-17.1 ms instead of 18.2-20.6 (interleaved runs, 15-20% less).
   GCC lowers 64-byte vectors to AVX2 through the stack: the AVX-512 kernel ran SmolLM2 at 1.1 s a step (16 rows)
   on an AVX2 EPYC, 4x slower than torch. So every vector in this file is the machine's own width (vf, VL lanes):
   the attention, softmax and SwiGLU in 64-byte vectors took 5.5 ms of a SmolLM2 step (8 rows, 49 positions) on a
   2-core AVX2 EPYC, 2.7 ms in 32-byte ones. */
#if defined(__AVX512F__)
#define PANEL 32
#define VBYTES 64
#else
#define PANEL 8
#define VBYTES 32
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
typedef unsigned int vfu __attribute__((vector_size(VBYTES)));
typedef int vfi __attribute__((vector_size(VBYTES)));
typedef unsigned short vfh __attribute__((vector_size(VBYTES / 2)));
#define MR 8
#define VL ((int)(sizeof(vf) / sizeof(float)))
#define NV (PANEL / VL)
#define PF_EVERY (PANEL >= 16 ? 1 : 16 / PANEL) /* k steps per 64-byte line of a panel (one prefetch each) */
#define KV_AHEAD 32 /* cache rows prefetched ahead in the attention */
#ifndef PREFETCH
#define PREFETCH 4096 /* 4-byte elements (floats or bf16 pairs) ahead of the panel read (16 KiB): best on the bench CPU */
#endif

typedef struct {
    int rows, hidden, n_heads, n_kv, head_dim, inter, vocab, layers, max_len, bf16;
    float scale;                          /* attention scale */
    const void *embed;                    /* [vocab, hidden], fp32 or bf16 */
    const void *const *wqkv, *const *wo, *const *wup, *const *wdown; /* per layer, packed panels */
    const float *floor1, *floor2;         /* per layer: sqrt(hidden * eps) of the two norms */
    float floor_final;
    const float *const *g1, *const *g2;   /* per layer: sqrt(hidden) * norm weight; NULL: folded into the weights */
    const float *gfinal;
    void *const *kc, *const *vc;          /* per layer: [rows, n_kv, max_len, head_dim], fp32 or bf16 */
    const void *whead;                    /* packed panels, vocab columns */
    float *x, *h, *qkv, *att, *gu, *act, *logits, *scores; /* scratch; h/att/act have rows rounded up to 8 */
    unsigned *xb;                         /* bf16: the GEMM input as (k, k+1) pairs, rows rounded up to 8 */
} Net;

static inline float bf2f(bf16_t v) {
    unsigned u = (unsigned)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline unsigned f2bf(float f) { /* round to nearest even */
    unsigned u;
    memcpy(&u, &f, 4);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* exp of VL lanes (Cephes' expf: 2^n e^r with |r| <= ln2/2 and a degree-6 polynomial), within 2 ulp of expf but
   0 below exp(-87) ~ 1.6e-38: libm's scalar expf was most of SwiGLU's time. */
static inline __attribute__((always_inline)) vf vsel(vfi m, vf a, vf b) { return (vf)(((vfi)a & m) | ((vfi)b & ~m)); }

static inline __attribute__((always_inline)) vf vexp(vf x) {
    const vf magic = (vf){0} + 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vf lo = (vf){0} - 87.f, inf = (vf){0} + INFINITY;
    vfi big = x > 88.72283935546875f; /* expf overflows */
    x = vsel(x < lo, lo, x);
    vf t = x * 1.44269504088896341f + magic, nf = t - magic;
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
             + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.f;
    vfu e = ((vfu)t - 0x4B400000u + 126u) << 23; /* 2^(n-1): n in [-125, 128] after the clamp */
    vf out = y * (vf)e * 2.f;
    return vsel(big, inf, out);
}

/* Row block [m0, m0 + MR) of y's panel columns [n0, n0 + nn) from the accumulators: stored or added. */
static inline void store_block(vf acc[MR][NV], int mc, float *y, int ldy, int nn, int accumulate) {
    for (int i = 0; i < mc; i++) {
        float t[PANEL], *yr = y + (size_t)i * ldy;
        memcpy(t, acc[i], sizeof(t));
        if (accumulate)
            for (int j = 0; j < nn; j++) yr[j] += t[j];
        else
            memcpy(yr, t, nn * sizeof(float));
    }
}

/* Where a row block's k loop prefetches (4-byte elements; the loop adds k * PANEL / blocks): with one block of rows,
   PREFETCH elements ahead of its own reads; with several (more rows than MR: each block after the first re-reads
   the panel from L2, so DRAM would idle), a share of the NEXT panel (it follows this one in memory), so that the
   blocks together stream it in while they compute and the weight stream never stops. */
static inline const void *ahead(const void *panel, size_t panel_elems, int M, int m0) {
    const float *w = (const float *)panel;
    int blocks = (M + MR - 1) / MR;
    if (blocks == 1)
        return w + PREFETCH;
    return w + panel_elems + (size_t)(m0 / MR) * panel_elems / blocks;
}

/* y[m, n] = (y +) sum_k x[m, k] W[n, k] for m < M, n < N; W packed [ceil(N/PANEL)][K][PANEL]; x has ceil(M/8)*8 rows
   (the extra rows' results are dropped), y row stride ldy. Work-shared over panels: call inside a parallel region. */
static void gemm(const float *x, int M, int K, const float *W, int N, float *y, int ldy, int accumulate) {
    int np = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
    for (int p = 0; p < np; p++) {
        const float *w = W + (size_t)p * K * PANEL;
        int n0 = p * PANEL, nn = N - n0 < PANEL ? N - n0 : PANEL;
        for (int m0 = 0; m0 < M; m0 += MR) { /* a second block of rows re-reads the panel from L2 */
            vf acc[MR][NV];
            memset(acc, 0, sizeof(acc));
            const float *xm = x + (size_t)m0 * K;
            const float *pf = ahead(w, (size_t)K * PANEL, M, m0);
            for (int k = 0; k < K; k++) {
                const float *wk = w + (size_t)k * PANEL;
                if (k % PF_EVERY == 0) {
                    __builtin_prefetch(pf + (size_t)k * PANEL / ((M + MR - 1) / MR));
                    if (PANEL > 16) __builtin_prefetch(pf + (size_t)k * PANEL / ((M + MR - 1) / MR) + 16);
                }
                vf wv[NV];
                for (int j = 0; j < NV; j++) wv[j] = *(const vf *)(wk + j * VL);
                for (int i = 0; i < MR; i++) {
                    float xv = xm[(size_t)i * K + k];
                    for (int j = 0; j < NV; j++) acc[i][j] += xv * wv[j];
                }
            }
            store_block(acc, M - m0 < MR ? M - m0 : MR, y + (size_t)m0 * ldy + n0, ldy, nn, accumulate);
        }
    }
}

/* The bf16 GEMM: x as bf16 pairs [ceil(M/8)*8][K2] (K2 = ceil(K/2)), W packed [ceil(N/PANEL)][K2][PANEL] pairs. */
static void gemm_bf16(const unsigned *x, int M, int K2, const unsigned *W, int N, float *y, int ldy,
                      int accumulate) {
    int np = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
    for (int p = 0; p < np; p++) {
        const unsigned *w = W + (size_t)p * K2 * PANEL;
        int n0 = p * PANEL, nn = N - n0 < PANEL ? N - n0 : PANEL;
        for (int m0 = 0; m0 < M; m0 += MR) {
            vf acc[MR][NV];
            memset(acc, 0, sizeof(acc));
            const unsigned *xm = x + (size_t)m0 * K2;
            const unsigned *pf = (const unsigned *)ahead(w, (size_t)K2 * PANEL, M, m0);
            for (int k = 0; k < K2; k++) {
                const unsigned *wk = w + (size_t)k * PANEL;
                if (k % PF_EVERY == 0) {
                    __builtin_prefetch(pf + (size_t)k * PANEL / ((M + MR - 1) / MR));
                    if (PANEL > 16) __builtin_prefetch(pf + (size_t)k * PANEL / ((M + MR - 1) / MR) + 16);
                }
#if BF16_DOT
                __m512bh w0 = (__m512bh)_mm512_load_si512(wk), w1 = (__m512bh)_mm512_load_si512(wk + 16);
                for (int i = 0; i < MR; i++) {
                    __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xm[(size_t)i * K2 + k]);
                    acc[i][0] = (vf)_mm512_dpbf16_ps((__m512)acc[i][0], w0, xv);
                    acc[i][1] = (vf)_mm512_dpbf16_ps((__m512)acc[i][1], w1, xv);
                }
#else
                float xl[MR], xh[MR]; /* each pair's two bf16 as floats: low half k, high half k + 1 */
                for (int i = 0; i < MR; i++) {
                    unsigned xv = xm[(size_t)i * K2 + k], lo = xv << 16, hi = xv & 0xffff0000u;
                    memcpy(&xl[i], &lo, 4);
                    memcpy(&xh[i], &hi, 4);
                }
                for (int j = 0; j < NV; j++) { /* one column group at a time: few registers live on AVX2 */
                    vfu u = *(const vfu *)(wk + j * VL);
                    vf wl = (vf)(u << 16), wh = (vf)(u & 0xffff0000u);
                    for (int i = 0; i < MR; i++) acc[i][j] += xl[i] * wl + xh[i] * wh;
                }
#endif
            }
            store_block(acc, M - m0 < MR ? M - m0 : MR, y + (size_t)m0 * ldy + n0, ldy, nn, accumulate);
        }
    }
}

/* v[0..K) as bf16 (k, k+1) pairs into out[0..ceil(K/2)), the last high half zero for odd K. */
static void to_pairs(const float *v, int K, unsigned *out) {
    for (int k = 0; k + 1 < K; k += 2) out[k / 2] = f2bf(v[k]) | f2bf(v[k + 1]) << 16;
    if (K & 1) out[K / 2] = f2bf(v[K - 1]);
}

/* One GEMM of the step: input rows in n->h-like `x` (fp32) or n->xb (bf16 pairs), per the net's format. */
static void step_gemm(const Net *n, const float *x, int K, const void *W, int N, float *y, int ldy, int acc) {
    if (n->bf16)
        gemm_bf16(n->xb, n->rows, (K + 1) / 2, (const unsigned *)W, N, y, ldy, acc);
    else
        gemm(x, n->rows, K, (const float *)W, N, y, ldy, acc);
}

/* h = x / hypot(|x|, floor) (* g) for each row (the RMSNorm); into n->h, or n->xb as bf16 pairs. */
static void norm_rows(const Net *n, float floor, const float *g) {
    const int H = n->hidden;
#pragma omp for schedule(static)
    for (int b = 0; b < n->rows; b++) {
        const float *xr = n->x + (size_t)b * H;
        float ss = 0.f, *hr = n->h + (size_t)b * H;
        for (int j = 0; j < H; j++) ss += xr[j] * xr[j];
        float inv = 1.f / hypotf(sqrtf(ss), floor);
        if (g)
            for (int j = 0; j < H; j++) hr[j] = xr[j] * inv * g[j];
        else
            for (int j = 0; j < H; j++) hr[j] = xr[j] * inv;
        if (n->bf16) to_pairs(hr, H, n->xb + (size_t)b * ((H + 1) / 2));
    }
}

/* VL cache values from element `off` of an fp32 or bf16 cache, as fp32. */
static inline __attribute__((always_inline)) vf kvv(const void *C, size_t off, int bf) {
    vf f;
    if (bf) {
        vfh h;
        memcpy(&h, (const bf16_t *)C + off, sizeof h);
        return (vf)(__builtin_convertvector(h, vfu) << 16);
    }
    memcpy(&f, (const float *)C + off, sizeof f);
    return f;
}

static inline float kv1(const void *C, size_t off, int bf) {
    return bf ? bf2f(((const bf16_t *)C)[off]) : ((const float *)C)[off];
}

static inline void kv_prefetch(const void *C, size_t off, int hd, int bf) {
    const char *c = (const char *)C + off * (bf ? 2 : 4);
    for (int j = 0; j < hd * (bf ? 2 : 4); j += 64) __builtin_prefetch(c + j);
}

/* q . C[off .. off+hd): in VL-lane blocks (a scalar sum is one long dependency chain), then the tail. */
static inline float kv_dot(const float *q, const void *C, size_t off, int hd, int bf) {
    vf acc = {0};
    int e = 0;
    for (; e + VL <= hd; e += VL) {
        vf qv;
        memcpy(&qv, q + e, sizeof qv);
        acc += qv * kvv(C, off + e, bf);
    }
    float d = 0.f;
    for (int j = 0; j < VL; j++) d += acc[j];
    for (; e < hd; e++) d += q[e] * kv1(C, off + e, bf);
    return d;
}

/* o[0..hd) += w * C[off .. off+hd) */
static inline void kv_axpy(float w, const void *C, size_t off, int hd, int bf, float *o) {
    int e = 0;
    for (; e + VL <= hd; e += VL) {
        vf ov;
        memcpy(&ov, o + e, sizeof ov);
        ov += w * kvv(C, off + e, bf);
        memcpy(o + e, &ov, sizeof ov);
    }
    for (; e < hd; e++) o[e] += w * kv1(C, off + e, bf);
}

/* o[0..hd) = sum_t (w[t] * inv) * C[off + t*hd .. off + (t+1)*hd) for t < n, summed in t order: in chunks of 64
   columns whose sums stay in registers over all t (independent FMA chains; kept in memory, each axpy's load and
   store made this loop 3x slower), the rest of hd by kv_axpy. */
static inline void kv_weighted_sum(const float *w, float inv, int n, const void *C, size_t off, int hd, int bf,
                                   float *o) {
    int e = 0;
    for (; e + 64 <= hd; e += 64) {
        vf acc[64 / VL] = {{0}};
        for (int t = 0; t < n; t++) {
            float wt = w[t] * inv;
            for (int j = 0; j < 64 / VL; j++) acc[j] += wt * kvv(C, off + (size_t)t * hd + e + j * VL, bf);
        }
        memcpy(o + e, acc, sizeof acc);
    }
    if (e < hd) {
        memset(o + e, 0, (hd - e) * sizeof(float));
        for (int t = 0; t < n; t++) kv_axpy(w[t] * inv, C, off + (size_t)t * hd + e, hd - e, bf, o + e);
    }
}


/* RoPE on the q and k heads of n->qkv (in place), then k and v into layer l's cache at position p. */
static void rope_and_cache(const Net *n, int l, int p, const float *cos, const float *sin) {
    const int nh = n->n_heads, nkv = n->n_kv, hd = n->head_dim, S = n->max_len, half = hd / 2;
    const int nqkv = (nh + 2 * nkv) * hd;
#pragma omp for schedule(static)
    for (int bj = 0; bj < n->rows * (nh + 2 * nkv); bj++) {
        int b = bj / (nh + 2 * nkv), j = bj % (nh + 2 * nkv);
        float *v = n->qkv + (size_t)b * nqkv + (size_t)j * hd;
        if (j < nh + nkv) {
            const float *c = cos + ((size_t)b * S + p) * hd, *s = sin + ((size_t)b * S + p) * hd;
            float r[512];
            for (int d = 0; d < half; d++) r[d] = v[d] * c[d] + v[d + half] * s[d];
            for (int d = half; d < hd; d++) r[d] = v[d] * c[d] + v[d - half] * s[d];
            memcpy(v, r, hd * sizeof(float));
        }
        if (j >= nh) {
            int g = j < nh + nkv ? j - nh : j - nh - nkv;
            size_t off = (((size_t)b * nkv + g) * S + p) * hd;
            void *dst = j < nh + nkv ? n->kc[l] : n->vc[l];
            if (n->bf16)
                for (int d = 0; d < hd; d++) ((bf16_t *)dst)[off + d] = (bf16_t)f2bf(v[d]);
            else
                memcpy((float *)dst + off, v, hd * sizeof(float));
        }
    }
}

/* Attention of each (row, head) over positions 0..p; into n->att, or n->xb as bf16 pairs (head_dim even). Work items
   are (row, KV head): the `group` query heads that share a KV head read each cached K and V row once. */
static void attention(const Net *n, int l, int p, const float *mask) {
    const int nh = n->n_heads, nkv = n->n_kv, hd = n->head_dim, S = n->max_len, group = nh / nkv, bf = n->bf16;
    const int nqkv = (nh + 2 * nkv) * hd, items = n->rows * nkv;
#pragma omp for schedule(static)
    for (int bg = 0; bg < items; bg++) {
        int b = bg / nkv, g = bg % nkv;
        const float *q = n->qkv + (size_t)b * nqkv + (size_t)g * group * hd, *mk = mask + (size_t)b * S;
        size_t base = ((size_t)b * nkv + g) * S * hd;
        float *sc = n->scores + (size_t)(b * nh + g * group) * S, mx[group], sum[group];
        for (int i = 0; i < group; i++) mx[i] = -INFINITY, sum[i] = 0.f;
        /* the cache rows come from memory (the weight stream has evicted them): fetch the next item's first K rows
           now, this item's K rows KV_AHEAD ahead, and its V rows for the second loop */
        if (bg + 1 < items) {
            size_t base1 = base + (size_t)S * hd; /* (row, KV head) items are consecutive in the cache */
            for (int t = 0; t < KV_AHEAD && t <= p; t++) kv_prefetch(n->kc[l], base1 + (size_t)t * hd, hd, bf);
        }
        for (int t = 0; t <= p; t++) {
            if (t + KV_AHEAD <= p) kv_prefetch(n->kc[l], base + (size_t)(t + KV_AHEAD) * hd, hd, bf);
            kv_prefetch(n->vc[l], base + (size_t)t * hd, hd, bf);
            for (int i = 0; i < group; i++) {
                float s = kv_dot(q + (size_t)i * hd, n->kc[l], base + (size_t)t * hd, hd, bf) * n->scale + mk[t];
                sc[(size_t)i * S + t] = s;
                mx[i] = s > mx[i] ? s : mx[i];
            }
        }
        for (int i = 0; i < group; i++) {
            float *si = sc + (size_t)i * S;
            int t = 0;
            for (; t + VL <= p + 1; t += VL) {
                vf e;
                memcpy(&e, si + t, sizeof e);
                e = vexp(e - mx[i]);
                memcpy(si + t, &e, sizeof e);
                for (int j = 0; j < VL; j++) sum[i] += e[j];
            }
            for (; t <= p; t++) sum[i] += (si[t] = expf(si[t] - mx[i]));
            sum[i] = 1.f / sum[i];
        }
        float *o = n->att + (size_t)b * nh * hd + (size_t)g * group * hd;
        for (int i = 0; i < group; i++)
            kv_weighted_sum(sc + (size_t)i * S, sum[i], p + 1, n->vc[l], base, hd, bf, o + (size_t)i * hd);
        if (bf)
            for (int i = 0; i < group; i++)
                to_pairs(o + (size_t)i * hd, hd, n->xb + (size_t)b * (nh * hd / 2) + (size_t)(g * group + i) * hd / 2);
    }
}

/* act = silu(gate) * up for each row; bf16: also as pairs into n->xb. */
static void swiglu(const Net *n) {
    const int I = n->inter;
#pragma omp for schedule(static)
    for (int b = 0; b < n->rows; b++) {
        float *a = n->act + (size_t)b * I;
        const float *gr = n->gu + (size_t)b * 2 * I, *ur = gr + I;
        int j = 0;
        for (; j + VL <= I; j += VL) {
            vf g, u;
            memcpy(&g, gr + j, sizeof g);
            memcpy(&u, ur + j, sizeof u);
            g = g / (1.f + vexp(-g)) * u;
            memcpy(a + j, &g, sizeof g);
        }
        for (; j < I; j++) a[j] = gr[j] / (1.f + expf(-gr[j])) * ur[j];
        if (n->bf16) to_pairs(a, I, n->xb + (size_t)b * ((I + 1) / 2));
    }
}

/* ids [rows]: the tokens at position p; cos/sin [rows, max_len, head_dim] and mask [rows, max_len] (additive), fp32
   whatever the weights. */
void chatrlhf_decode_step(const Net *n, const long long *ids, int p, const float *cos, const float *sin,
                          const float *mask) {
    const int B = n->rows, H = n->hidden, nh = n->n_heads, nkv = n->n_kv, hd = n->head_dim, I = n->inter;
    const int nqkv = (nh + 2 * nkv) * hd;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            float *xr = n->x + (size_t)b * H;
            if (n->bf16)
                for (int j = 0; j < H; j++) xr[j] = bf2f(((const bf16_t *)n->embed)[(size_t)ids[b] * H + j]);
            else
                memcpy(xr, (const float *)n->embed + (size_t)ids[b] * H, H * sizeof(float));
        }
        for (int l = 0; l < n->layers; l++) {
            norm_rows(n, n->floor1[l], n->g1 ? n->g1[l] : NULL);
            step_gemm(n, n->h, H, n->wqkv[l], nqkv, n->qkv, nqkv, 0);
            rope_and_cache(n, l, p, cos, sin);
            attention(n, l, p, mask);
            step_gemm(n, n->att, nh * hd, n->wo[l], H, n->x, H, 1);
            norm_rows(n, n->floor2[l], n->g2 ? n->g2[l] : NULL);
            step_gemm(n, n->h, H, n->wup[l], 2 * I, n->gu, 2 * I, 0);
            swiglu(n);
            step_gemm(n, n->act, I, n->wdown[l], H, n->x, H, 1);
        }
        norm_rows(n, n->floor_final, n->gfinal);
        step_gemm(n, n->h, H, n->whead, n->vocab, n->logits, n->vocab, 0);
    }
}

/* Panels for gemm: W [N, K] row-major -> [ceil(N/PANEL)][K][PANEL], columns past N zero. Each source row is read in
   order (its panel, 1 KiB-128 KiB, stays in cache while its PANEL rows are scattered into it). */
void chatrlhf_pack(const float *W, int N, int K, float *out) {
    int np = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < np; p++)
        for (int j = 0; j < PANEL; j++) {
            int nrow = p * PANEL + j;
            float *o = out + (size_t)p * K * PANEL + j;
            for (int k = 0; k < K; k++) o[(size_t)k * PANEL] = nrow < N ? W[(size_t)nrow * K + k] : 0.f;
        }
}

/* Panels for gemm_bf16: W [N, K] bf16 row-major -> [ceil(N/PANEL)][ceil(K/2)][PANEL][2] (a (k, k+1) pair per 32-bit
   word), zeros past N and K. */
void chatrlhf_pack_bf16(const bf16_t *W, int N, int K, bf16_t *out) {
    int np = (N + PANEL - 1) / PANEL, K2 = (K + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < np; p++)
        for (int j = 0; j < PANEL; j++) {
            int nrow = p * PANEL + j;
            unsigned *o = (unsigned *)out + (size_t)p * K2 * PANEL + j;
            const bf16_t *w = W + (size_t)nrow * K;
            for (int k = 0; k < K2; k++) {
                unsigned pair = 0;
                if (nrow < N && 2 * k + 1 < K)
                    memcpy(&pair, w + 2 * k, 4);
                else if (nrow < N)
                    pair = w[2 * k];
                o[(size_t)k * PANEL] = pair;
            }
        }
}

/* The columns of a packed panel in this build (chatrlhf_pack's layout). */
int chatrlhf_panel(void) { return PANEL; }

/* Which bf16 GEMM this build has: 1 = AVX512-BF16 dot products, 0 = widened in registers. */
int chatrlhf_bf16_dot(void) { return BF16_DOT; }
