// Kernels for decoding steps, where a handful of rows go through the model and launch count and
// latency, not arithmetic, set the time: a linear layer for few rows that streams the bf16/f16
// weights once with the bias fused, and single-query attention over a KV cache.

#define LS_MAXM 8

// Exact GELU x·Φ(x), as elementwise.cu's (the CPU reference's formula).
__device__ __forceinline__ float ls_gelu(float xf) {
    double x = (double)xf;
    return (float)(x * 0.5 * erfc(-x * 0.70710678118654752440));
}

// out[i, col] = sum_k x[i, k] * w[col, k] (+ bias[col]) for i < m <= LS_MAXM: x f32 [m, k], w
// bf16/f16 [n, k] (`wdt`), bias in dtype `bdt` (or null), out f32 [m, n]. One warp per output
// column; lane l reads 8 weights (16 bytes) at k = 8 l + 256 j, so each weight row streams
// coalesced, once, whatever m is. The host guarantees k % 8 == 0 and 16-byte aligned x and w.
// Epilogues: `pre` (or null) receives the value before the activation; `act` (-1 none, 0 ReLU,
// 1 GELU) is applied; `res` (or null) is added. blockIdx.y picks one of up to three
// (out, w, bias) triples that share x and the shape (attention's q, k, v in one launch).
extern "C" __global__ void __launch_bounds__(256)
    linear_small(float* out0, const float* x, const u16* w0, const void* bias0, u32 m, u32 n, u32 k, int wdt,
                 int bdt, const float* res, float* pre, int act, float* out1, const u16* w1, const void* bias1,
                 float* out2, const u16* w2, const void* bias2) {
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 col = blockIdx.x * 8 + warp;
    if (col >= n) return; // the whole warp: col is per warp
    float* out = blockIdx.y == 0 ? out0 : (blockIdx.y == 1 ? out1 : out2);
    const u16* w = blockIdx.y == 0 ? w0 : (blockIdx.y == 1 ? w1 : w2);
    const void* bias = blockIdx.y == 0 ? bias0 : (blockIdx.y == 1 ? bias1 : bias2);
    float acc[LS_MAXM];
#pragma unroll
    for (int i = 0; i < LS_MAXM; i++) acc[i] = 0.0f;
    const u16* wr = w + (u64)col * k;
    for (u32 kk = lane * 8; kk < k; kk += 256) {
        const uint4 raw = *(const uint4*)(wr + kk);
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
        float wf[8];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u16 lo = (u16)(words[e] & 0xffffu), hi = (u16)(words[e] >> 16);
            wf[2 * e] = wdt == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            wf[2 * e + 1] = wdt == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
#pragma unroll
        for (int i = 0; i < LS_MAXM; i++) {
            if ((u32)i < m) {
                const float4 a = *(const float4*)(x + (u64)i * k + kk);
                const float4 b = *(const float4*)(x + (u64)i * k + kk + 4);
                acc[i] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
                          b.z * wf[6] + b.w * wf[7];
            }
        }
    }
    const float bv = bias != 0 ? load_any(bias, col, bdt) : 0.0f;
#pragma unroll
    for (int i = 0; i < LS_MAXM; i++) {
        if ((u32)i < m) { // m is uniform across the warp, so every lane reaches the shuffles
            const float s = warp_sum(acc[i]);
            if (lane == 0) {
                const u64 o = (u64)i * n + col;
                float v = s + bv;
                if (pre != 0) pre[o] = v;
                if (act == 0) v = v < 0.0f ? 0.0f : v;
                else if (act == 1) v = ls_gelu(v);
                if (res != 0) v = res[o] + v;
                out[o] = v;
            }
        }
    }
}

// Decoding attention: one query per (batch row b, head h) over tk cached keys (tq = 1), no
// dropout, no saved probabilities. One block of 256 threads per (b, h): thread t scores keys
// t, t + 256, ... (a whole dot product over hs each), the block takes max and sum, then four
// groups of 64 threads accumulate p_j v[j, d] over interleaved keys and the groups combine.
// Masking as attention_forward: keys <= q_offset with key_mask != 0; a query whose keys are all
// masked gets uniform weights over all tk keys. Shared memory: tk + 256 + 128 + 4 hs floats.
extern "C" __global__ void __launch_bounds__(256)
    attention_decode(float* out, const float* q, const float* k, const float* v, const u8* mask, u32 tk, u32 heads,
                     u32 hs, u32 q_offset, u64 kv_stride, float scale) {
    extern __shared__ float sm[];
    float* pr = sm;        // [tk] scores, then exp weights
    float* red = pr + tk;  // [256] reductions
    float* qs = red + 256; // [128] the query
    float* part = qs + 128; // [4][hs] partial outputs
    const u32 bh = blockIdx.x, b = bh / heads, h = bh % heads;
    const u64 c = (u64)heads * hs;
    const float* qb = q + (u64)b * c + (u64)h * hs;
    const float* kb = k + (u64)b * kv_stride + (u64)h * hs;
    const float* vb = v + (u64)b * kv_stride + (u64)h * hs;
    const u8* mb = mask != 0 ? mask + (u64)b * tk : 0;
    for (u32 d = threadIdx.x; d < hs; d += blockDim.x) qs[d] = qb[d];
    __syncthreads();
    float m = NEG_INF;
    for (u32 j = threadIdx.x; j < tk; j += blockDim.x) {
        float s = NEG_INF;
        if (j <= q_offset && (mb == 0 || mb[j] != 0)) {
            const float* kr = kb + (u64)j * c;
            float acc = 0.0f;
#pragma unroll 16
            for (u32 d = 0; d < hs; d++) acc += qs[d] * kr[d];
            s = acc * scale;
        }
        pr[j] = s;
        m = fmaxf(m, s);
    }
    m = block_max_f32(m, red);
    float l = 0.0f;
    for (u32 j = threadIdx.x; j < tk; j += blockDim.x) {
        // all keys masked (m = -inf): weight 1 for every key, i.e. uniform after the division
        const float e = m == NEG_INF ? 1.0f : (pr[j] == NEG_INF ? 0.0f : expf(pr[j] - m));
        pr[j] = e;
        l += e;
    }
    l = block_sum_f32(l, red); // ends with a barrier: every weight is visible
    const float inv = 1.0f / l;
    const u32 g = threadIdx.x / 64, d0 = threadIdx.x % 64;
    for (u32 d = d0; d < hs; d += 64) {
        // Four independent sums keep several loads of V in flight.
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        u32 j = g;
        for (; j + 12 < tk; j += 16) {
            a0 += pr[j] * vb[(u64)j * c + d];
            a1 += pr[j + 4] * vb[(u64)(j + 4) * c + d];
            a2 += pr[j + 8] * vb[(u64)(j + 8) * c + d];
            a3 += pr[j + 12] * vb[(u64)(j + 12) * c + d];
        }
        for (; j < tk; j += 4) a0 += pr[j] * vb[(u64)j * c + d];
        const float acc = (a0 + a1) + (a2 + a3);
        part[g * hs + d] = acc;
    }
    __syncthreads();
    for (u32 d = threadIdx.x; d < hs; d += blockDim.x)
        out[(u64)b * c + (u64)h * hs + d] = (part[d] + part[hs + d] + part[2 * hs + d] + part[3 * hs + d]) * inv;
}
