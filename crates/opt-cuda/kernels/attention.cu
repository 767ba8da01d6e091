// Causal multi-head attention with a key padding mask, attention dropout and a KV-cache layout
// (see opt-tensor's AttnDims). Semantics follow the CPU reference exactly:
//   scores = scale * q.k over keys j <= q_offset + i with key_mask[b, j] != 0;
//   a query whose causal keys are all masked gets uniform weights over *all* tk keys (HF's
//   additive finfo.min mask makes every score equal there);
//   dropout multiplies the probabilities by the mask of uniform(seed, offset + flat index into
//   [B, NH, Tq, Tk]) after the softmax; saved probabilities are the pre-dropout ones.
//
// attention_forward is flash-attention style: one pass over key tiles with an online softmax
// (running max m, running sum l, rescaled accumulator), so no Tq x Tk matrix is materialised
// unless the caller asks for the probabilities, which a second pass then writes from the final
// (m, l). This first version runs on the CUDA cores in f32 (no tensor cores): correct for any
// head_dim <= 128 and any mask, and the reference the tensor-core version will be checked against.
//
// Block: 4 warps; each warp owns ATT_ROWS query rows, so a block covers ATT_BQ queries. Keys
// come in tiles of 32, one per lane: lane j scores key j of the tile against the row, then the
// warp broadcasts each probability and every lane accumulates its slice of head dims
// (d = lane + 32 t). Grid: x = B * NH, y = ceil(Tq / ATT_BQ).

#define ATT_WARPS 4
#define ATT_ROWS 4
#define ATT_BQ (ATT_WARPS * ATT_ROWS)
#define ATT_BK 32
#define ATT_MAXD 4 // head_dim <= 32 * ATT_MAXD

// q . k for one (query row in shared memory, key row in shared memory) pair.
__device__ __forceinline__ float att_dot(const float* qrow, const float* krow, u32 hs) {
    float s = 0.0f;
    for (u32 d = 0; d < hs; d++) s += qrow[d] * krow[d];
    return s;
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_forward(float* out, float* probs, const float* q, const float* k, const float* v, const u8* mask,
                      u32 tq, u32 tk, u32 heads, u32 hs, u32 q_offset, u64 kv_stride, float scale, int has_drop,
                      u64 seed, u64 doff, float p, float dscale) {
    extern __shared__ float smem[];
    float* qs = smem;                      // [ATT_BQ][hs]
    float* ks = qs + ATT_BQ * hs;          // [ATT_BK][hs + 1] (padded: lanes read different rows)
    float* vs = ks + ATT_BK * (hs + 1);    // [ATT_BK][hs]
    const u32 bh = blockIdx.x, b = bh / heads, h = bh % heads;
    const u32 q0 = blockIdx.y * ATT_BQ;
    const u64 c = (u64)heads * hs;
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* kb = k + (u64)b * kv_stride + (u64)h * hs;
    const float* vb = v + (u64)b * kv_stride + (u64)h * hs;
    const u8* mb = mask != 0 ? mask + (u64)b * tk : 0;

    for (u32 idx = threadIdx.x; idx < ATT_BQ * hs; idx += blockDim.x) {
        u32 r = idx / hs, d = idx % hs, i = q0 + r;
        qs[idx] = i < tq ? q[((u64)b * tq + i) * c + (u64)h * hs + d] : 0.0f;
    }

    float m_i[ATT_ROWS], l_i[ATT_ROWS], acc[ATT_ROWS][ATT_MAXD];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        m_i[r] = NEG_INF;
        l_i[r] = 0.0f;
#pragma unroll
        for (int t = 0; t < ATT_MAXD; t++) acc[r][t] = 0.0f;
    }

    // Keys past the block's last causal key carry no weight (except for fully masked rows,
    // handled below), so the main loop stops there: this skips the upper triangle.
    const u32 last = (q0 + ATT_BQ < tq ? q0 + ATT_BQ : tq) - 1;
    const u32 kend = q_offset + last + 1 < tk ? q_offset + last + 1 : tk;

    for (u32 k0 = 0; k0 < kend; k0 += ATT_BK) {
        __syncthreads(); // the previous tile is consumed (and, the first time, Q is loaded)
        for (u32 idx = threadIdx.x; idx < ATT_BK * hs; idx += blockDim.x) {
            u32 j = idx / hs, d = idx % hs, key = k0 + j;
            ks[j * (hs + 1) + d] = key < tk ? kb[(u64)key * c + d] : 0.0f;
            vs[j * hs + d] = key < tk ? vb[(u64)key * c + d] : 0.0f;
        }
        __syncthreads();
        const u32 key = k0 + lane;
        const bool kvalid = key < tk && (mb == 0 || mb[key] != 0);
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++) {
            const u32 qr = warp * ATT_ROWS + r, i = q0 + qr;
            if (i >= tq) continue; // uniform across the warp
            const bool valid = kvalid && key <= q_offset + i;
            const float s = valid ? att_dot(qs + qr * hs, ks + lane * (hs + 1), hs) * scale : NEG_INF;
            const float m_new = fmaxf(m_i[r], warp_max(s));
            if (m_new == NEG_INF) continue; // no valid key yet for this row (uniform across the warp)
            const float corr = expf(m_i[r] - m_new); // 0 on the first valid tile (m = -inf)
            const float e = valid ? expf(s - m_new) : 0.0f;
            l_i[r] = l_i[r] * corr + warp_sum(e);
            const float pe = has_drop && valid ? e * drop_factor(seed, doff, p, dscale, ((u64)bh * tq + i) * tk + key) : e;
#pragma unroll
            for (int t = 0; t < ATT_MAXD; t++) acc[r][t] *= corr;
            for (int j = 0; j < ATT_BK; j++) {
                const float pj = __shfl_sync(0xffffffffu, pe, j);
                if (pj == 0.0f) continue; // masked or dropped key (uniform across the warp)
#pragma unroll
                for (int t = 0; t < ATT_MAXD; t++) {
                    const u32 d = lane + 32 * t;
                    if (d < hs) acc[r][t] += pj * vs[j * hs + d];
                }
            }
            m_i[r] = m_new;
        }
    }

    // Rows whose causal keys were all masked: uniform weights 1/tk over all tk keys (with the
    // dropout mask applied), as the CPU reference and HF's eager path do.
    int need_uniform = 0;
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) need_uniform |= (q0 + warp * ATT_ROWS + r < tq) && m_i[r] == NEG_INF;
    const float inv_tk = 1.0f / (float)tk;
    if (__syncthreads_or(need_uniform)) {
        for (u32 k0 = 0; k0 < tk; k0 += ATT_BK) {
            __syncthreads();
            for (u32 idx = threadIdx.x; idx < ATT_BK * hs; idx += blockDim.x) {
                u32 j = idx / hs, d = idx % hs, key = k0 + j;
                vs[j * hs + d] = key < tk ? vb[(u64)key * c + d] : 0.0f;
            }
            __syncthreads();
            const u32 key = k0 + lane;
#pragma unroll
            for (int r = 0; r < ATT_ROWS; r++) {
                const u32 i = q0 + warp * ATT_ROWS + r;
                if (i >= tq || m_i[r] != NEG_INF) continue;
                float pe = key < tk ? inv_tk : 0.0f;
                if (has_drop && key < tk) pe *= drop_factor(seed, doff, p, dscale, ((u64)bh * tq + i) * tk + key);
                for (int j = 0; j < ATT_BK; j++) {
                    const float pj = __shfl_sync(0xffffffffu, pe, j);
#pragma unroll
                    for (int t = 0; t < ATT_MAXD; t++) {
                        const u32 d = lane + 32 * t;
                        if (d < hs) acc[r][t] += pj * vs[j * hs + d];
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        const u32 i = q0 + warp * ATT_ROWS + r;
        if (i >= tq) continue;
        const float norm = m_i[r] == NEG_INF ? 1.0f : 1.0f / l_i[r];
#pragma unroll
        for (int t = 0; t < ATT_MAXD; t++) {
            const u32 d = lane + 32 * t;
            if (d < hs) out[((u64)b * tq + i) * c + (u64)h * hs + d] = acc[r][t] * norm;
        }
    }

    if (probs == 0) return;
    // Second pass: write every probability of the block's rows (zeros for masked and future
    // keys), recomputing the scores with the same code as the first pass.
    for (u32 k0 = 0; k0 < tk; k0 += ATT_BK) {
        __syncthreads();
        if (k0 < kend) {
            for (u32 idx = threadIdx.x; idx < ATT_BK * hs; idx += blockDim.x) {
                u32 j = idx / hs, d = idx % hs, key = k0 + j;
                ks[j * (hs + 1) + d] = key < tk ? kb[(u64)key * c + d] : 0.0f;
            }
        }
        __syncthreads();
        const u32 key = k0 + lane;
        if (key >= tk) continue; // no barrier follows inside this iteration's remaining code
        const bool kvalid = mb == 0 || mb[key] != 0;
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++) {
            const u32 qr = warp * ATT_ROWS + r, i = q0 + qr;
            if (i >= tq) continue;
            float pr;
            if (m_i[r] == NEG_INF) {
                pr = inv_tk;
            } else if (kvalid && key <= q_offset + i) {
                const float s = att_dot(qs + qr * hs, ks + lane * (hs + 1), hs) * scale;
                pr = expf(s - m_i[r]) * (1.0f / l_i[r]);
            } else {
                pr = 0.0f;
            }
            probs[((u64)bh * tq + i) * tk + key] = pr;
        }
    }
}

// Backward, step 1 (with dropout only): pd[i] = probs[i] * factor(base + i) over one batch
// element's [NH, Tq, Tk] block (base = its flat offset into [B, NH, Tq, Tk]).
extern "C" __global__ void attention_dropout_probs(float* pd, const float* pr, u64 n, u64 base, u64 seed, u64 doff,
                                                   float p, float dscale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        pd[i] = pr[i] * drop_factor(seed, doff, p, dscale, base + i);
}

// Backward, softmax step, one block of 256 threads per row of tk: on entry ds holds
// dP' = dO . V^T; with dropout dP = dP' * factor; then ds = scale * P * (dP - sum_j P dP).
// `base_row` is the row's flat offset (in rows) into [B, NH, Tq].
extern "C" __global__ void attention_softmax_backward(float* ds, const float* pr, u32 tk, float scale, int has_drop,
                                                      u64 base_row, u64 seed, u64 doff, float p, float dscale,
                                                      u16* ds16) {
    __shared__ double buf[256];
    const u64 row = blockIdx.x;
    float* d = ds + row * tk;
    const float* pp = pr + row * tk;
    const u64 flat = (base_row + row) * tk;
    double s = 0.0;
    for (u32 j = threadIdx.x; j < tk; j += blockDim.x) {
        float dp = d[j];
        if (has_drop) {
            dp *= drop_factor(seed, doff, p, dscale, flat + j);
            d[j] = dp;
        }
        s += (double)(pp[j] * dp);
    }
    const float dot = (float)block_sum_f64(s, buf);
    if (ds16 != 0) {
        // Mixed precision: dS as bf16, the operand of the dQ and dK products.
        u16* d16 = ds16 + row * tk;
        for (u32 j = threadIdx.x; j < tk; j += blockDim.x) d16[j] = f32_to_bf16(pp[j] * (d[j] - dot) * scale);
    } else {
        for (u32 j = threadIdx.x; j < tk; j += blockDim.x) d[j] = pp[j] * (d[j] - dot) * scale;
    }
}

// ---- mixed precision (bf16 products on tensor cores through cuBLAS) ---------------------------
// The forward pass computes S = scale * Q.K^T per batch element with one strided-batched bf16
// product over heads (f32 out), then this softmax, then O = P'.V with a second product. The
// T x T scores of one batch element are materialised (the saved probabilities need them anyway).

// Softmax of one row of S, one block of 256 threads per row of one batch element's [NH, Tq, Tk]
// block: `s` (scaled scores) is overwritten with the probabilities (pre-dropout, as saved for
// the backward pass); `pd` receives them times the dropout factor, as bf16. `mask` is this batch
// element's key mask row (0 = none). Masking and fully masked rows follow attention_forward.
extern "C" __global__ void attention_softmax_mixed(float* s, u16* pd, const u8* mask, u32 tq, u32 tk, u32 q_offset,
                                                   int has_drop, u64 base_row, u64 seed, u64 doff, float p,
                                                   float dscale) {
    __shared__ float buf[256];
    const u64 row = blockIdx.x;
    const u32 i = (u32)(row % tq);
    float* x = s + row * tk;
    u16* y = pd + row * tk;
    const u32 lim = q_offset + i; // the last causal key of this query
    const u32 jend = lim + 1 < tk ? lim + 1 : tk;
    float m = NEG_INF;
    for (u32 j = threadIdx.x; j < jend; j += blockDim.x)
        if (mask == 0 || mask[j] != 0) m = fmaxf(m, x[j]);
    m = block_max_f32(m, buf);
    float l = 0.0f;
    if (m != NEG_INF)
        for (u32 j = threadIdx.x; j < jend; j += blockDim.x)
            if (mask == 0 || mask[j] != 0) l += expf(x[j] - m);
    l = block_sum_f32(l, buf);
    const u64 flat = (base_row + row) * tk;
    const float inv = m == NEG_INF ? 0.0f : 1.0f / l;
    const float inv_tk = 1.0f / (float)tk;
    for (u32 j = threadIdx.x; j < tk; j += blockDim.x) {
        float pr;
        if (m == NEG_INF) pr = inv_tk; // every causal key masked: uniform over all tk keys
        else if (j < jend && (mask == 0 || mask[j] != 0)) pr = expf(x[j] - m) * inv;
        else pr = 0.0f;
        x[j] = pr;
        y[j] = f32_to_bf16(has_drop ? pr * drop_factor(seed, doff, p, dscale, flat + j) : pr);
    }
}

// Backward: P' = P * dropout factor as bf16 (the operand of dV = P'^T dO), over one batch
// element's [NH, Tq, Tk] block (base = its flat offset into [B, NH, Tq, Tk]).
extern "C" __global__ void attention_probs_bf16(u16* out, const float* pr, u64 n, u64 base, int has_drop, u64 seed,
                                                u64 doff, float p, float dscale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(has_drop ? pr[i] * drop_factor(seed, doff, p, dscale, base + i) : pr[i]);
}
