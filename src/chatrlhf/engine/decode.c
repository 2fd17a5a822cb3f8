/* One KV-cached decode step of a llama-style decoder for a batch of rows, in one call (hybrid.py's native path).

   Why C: at decode sizes a step is bandwidth-bound (every weight is read once for `rows` tokens), and in eager
   torch each of the ~25 small ops per layer costs 15-30 us on a CPU because the weight stream has just evicted
   the dispatcher from cache; here they are a few loops inside one OpenMP region. The GEMMs read weights packed
   in 32-column panels ([N/32][K][32]: one sequential stream, no horizontal sums) with software prefetch well
   ahead, which streams at 18-20 GB/s on the bench CPU where MKL's packed small-M GEMM reaches 14-15.

   Maths (the same as HybridDecoder._layer with folded norms): h = x / hypot(|x|, floor) (RMSNorm; its
   sqrt(H)*weight scale is already folded into the next weight matrix), fused q|k|v projection, RoPE with
   rotate_half's sign folded into `sin`, K/V written to the cache at position p, softmax attention over positions
   0..p with an additive mask, o-projection added to x, SwiGLU MLP (fused gate|up) added to x; then the final
   norm and the lm head. Written with GCC vector extensions, so it builds for AVX2, AVX-512 or NEON. */
#include <math.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

#define PANEL 32
#define PREFETCH 4096 /* floats ahead of the panel read (16 KiB): measured best on the bench CPU */

typedef struct {
    int rows, hidden, n_heads, n_kv, head_dim, inter, vocab, layers, max_len;
    float scale;                          /* attention scale */
    const float *embed;                   /* [vocab, hidden] */
    const float *const *wqkv, *const *wo, *const *wup, *const *wdown; /* per layer, packed panels */
    const float *floor1, *floor2;         /* per layer: sqrt(hidden * eps) of the two norms */
    float floor_final;
    float *const *kc, *const *vc;         /* per layer: [rows, n_kv, max_len, head_dim] */
    const float *whead;                   /* packed panels, vocab columns */
    float *x, *h, *qkv, *att, *gu, *act, *logits, *scores; /* scratch; h/att/act have rows rounded up to 8 */
} Net;

/* y[m, n] = (y +) sum_k x[m, k] W[n, k] for m < M, n < N; W packed [ceil(N/32)][K][32]; x has ceil(M/8)*8 rows
   (the extra rows are zeros), y row stride ldy. Work-shared over panels: call inside a parallel region. */
static void gemm(const float *x, int M, int K, const float *W, int N, float *y, int ldy, int accumulate) {
    int np = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
    for (int p = 0; p < np; p++) {
        const float *w = W + (size_t)p * K * PANEL;
        int n0 = p * PANEL, nn = N - n0 < PANEL ? N - n0 : PANEL;
        for (int m0 = 0; m0 < M; m0 += 8) { /* a second block of rows re-reads the panel from L2 */
            v16 a0[8], a1[8];
            for (int i = 0; i < 8; i++) a0[i] = a1[i] = (v16){0};
            const float *xm = x + (size_t)m0 * K;
            for (int k = 0; k < K; k++) {
                const float *wk = w + (size_t)k * PANEL;
                __builtin_prefetch(wk + PREFETCH);
                v16 w0 = *(const v16 *)wk, w1 = *(const v16 *)(wk + 16);
                for (int i = 0; i < 8; i++) {
                    float xv = xm[(size_t)i * K + k];
                    a0[i] += xv * w0;
                    a1[i] += xv * w1;
                }
            }
            int mc = M - m0 < 8 ? M - m0 : 8;
            for (int i = 0; i < mc; i++) {
                float t[PANEL], *yr = y + (size_t)(m0 + i) * ldy + n0;
                memcpy(t, &a0[i], sizeof(v16));
                memcpy(t + 16, &a1[i], sizeof(v16));
                if (accumulate)
                    for (int j = 0; j < nn; j++) yr[j] += t[j];
                else
                    memcpy(yr, t, nn * sizeof(float));
            }
        }
    }
}

/* h = x / hypot(|x|, floor) for each row (the folded RMSNorm). */
static void norm_rows(const float *x, float *h, int rows, int H, float floor) {
#pragma omp for schedule(static)
    for (int b = 0; b < rows; b++) {
        const float *xr = x + (size_t)b * H;
        float ss = 0.f;
        for (int j = 0; j < H; j++) ss += xr[j] * xr[j];
        float inv = 1.f / hypotf(sqrtf(ss), floor);
        for (int j = 0; j < H; j++) h[(size_t)b * H + j] = xr[j] * inv;
    }
}

/* ids [rows]: the tokens at position p; cos/sin [rows, max_len, head_dim]; mask [rows, max_len] additive. */
void chatrlhf_decode_step(const Net *n, const long long *ids, int p, const float *cos, const float *sin,
                          const float *mask) {
    const int B = n->rows, H = n->hidden, nh = n->n_heads, nkv = n->n_kv, hd = n->head_dim, I = n->inter;
    const int S = n->max_len, nqkv = (nh + 2 * nkv) * hd, group = nh / nkv, half = hd / 2;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) memcpy(n->x + (size_t)b * H, n->embed + (size_t)ids[b] * H, H * sizeof(float));
        for (int l = 0; l < n->layers; l++) {
            float *kc = n->kc[l], *vc = n->vc[l];
            norm_rows(n->x, n->h, B, H, n->floor1[l]);
            gemm(n->h, B, H, n->wqkv[l], nqkv, n->qkv, nqkv, 0);
            /* RoPE on the q and k heads (in place), then k and v into the cache at position p */
#pragma omp for schedule(static)
            for (int bj = 0; bj < B * (nh + 2 * nkv); bj++) {
                int b = bj / (nh + 2 * nkv), j = bj % (nh + 2 * nkv);
                float *v = n->qkv + (size_t)b * nqkv + (size_t)j * hd;
                if (j < nh + nkv) {
                    const float *c = cos + ((size_t)b * S + p) * hd, *s = sin + ((size_t)b * S + p) * hd;
                    float r[512];
                    for (int d = 0; d < hd; d++) r[d] = v[d] * c[d] + v[(d + half) % hd] * s[d];
                    memcpy(v, r, hd * sizeof(float));
                }
                if (j >= nh) {
                    int g = j < nh + nkv ? j - nh : j - nh - nkv;
                    float *dst = (j < nh + nkv ? kc : vc) + (((size_t)b * nkv + g) * S + p) * hd;
                    memcpy(dst, v, hd * sizeof(float));
                }
            }
            /* attention of each (row, head) over positions 0..p */
#pragma omp for schedule(static)
            for (int bi = 0; bi < B * nh; bi++) {
                int b = bi / nh, i = bi % nh, g = i / group;
                const float *q = n->qkv + (size_t)b * nqkv + (size_t)i * hd, *mk = mask + (size_t)b * S;
                const float *K = kc + ((size_t)b * nkv + g) * S * hd, *V = vc + ((size_t)b * nkv + g) * S * hd;
                float *sc = n->scores + (size_t)bi * S, mx = -INFINITY, sum = 0.f;
                for (int t = 0; t <= p; t++) {
                    float d = 0.f;
                    for (int e = 0; e < hd; e++) d += q[e] * K[(size_t)t * hd + e];
                    sc[t] = d * n->scale + mk[t];
                    mx = sc[t] > mx ? sc[t] : mx;
                }
                for (int t = 0; t <= p; t++) sum += (sc[t] = expf(sc[t] - mx));
                float *o = n->att + (size_t)b * nh * hd + (size_t)i * hd, inv = 1.f / sum;
                for (int e = 0; e < hd; e++) o[e] = 0.f;
                for (int t = 0; t <= p; t++) {
                    float w = sc[t] * inv;
                    for (int e = 0; e < hd; e++) o[e] += w * V[(size_t)t * hd + e];
                }
            }
            gemm(n->att, B, nh * hd, n->wo[l], H, n->x, H, 1);
            norm_rows(n->x, n->h, B, H, n->floor2[l]);
            gemm(n->h, B, H, n->wup[l], 2 * I, n->gu, 2 * I, 0);
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++)
                for (int j = 0; j < I; j++) {
                    float g = n->gu[(size_t)b * 2 * I + j], u = n->gu[(size_t)b * 2 * I + I + j];
                    n->act[(size_t)b * I + j] = g / (1.f + expf(-g)) * u;
                }
            gemm(n->act, B, I, n->wdown[l], H, n->x, H, 1);
        }
        norm_rows(n->x, n->h, B, H, n->floor_final);
        gemm(n->h, B, H, n->whead, n->vocab, n->logits, n->vocab, 0);
    }
}

/* Panels for gemm: W [N, K] row-major -> [ceil(N/32)][K][32], columns past N zero. */
void chatrlhf_pack(const float *W, int N, int K, float *out) {
    int np = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < np; p++)
        for (int k = 0; k < K; k++) {
            float *o = out + ((size_t)p * K + k) * PANEL;
            for (int j = 0; j < PANEL; j++) {
                int nrow = p * PANEL + j;
                o[j] = nrow < N ? W[(size_t)nrow * K + k] : 0.f;
            }
        }
}
