// Embedding gather (forward) and scatter-add (backward).

// out[r, :] (+)= table[ids[r], :] for r < n, any table dtype. Grid: x over columns, y over rows
// (grid-stride).
extern "C" __global__ void embedding_forward(float* out, const void* table, int table_dt, const u32* ids, u64 n,
                                             u32 dim, int accumulate) {
    for (u64 r = blockIdx.y; r < n; r += gridDim.y) {
        u64 row = (u64)ids[r] * dim;
        for (u32 c = blockIdx.x * blockDim.x + threadIdx.x; c < dim; c += gridDim.x * blockDim.x) {
            float v = load_any(table, row + c, table_dt);
            if (accumulate) {
                out[r * dim + c] += v;
            } else {
                out[r * dim + c] = v;
            }
        }
    }
}

// dtable[id, :] += dout[r, :] for every row r with ids[r] == id, without atomics: the host sorts
// the rows by id (stable), so segment s = order[seg_start[s] .. seg_start[s+1]] holds the rows of
// id seg_id[s] in their original order. Block (s, column tile) adds them one by one, in the same
// order as the CPU reference, so the result is deterministic and matches it bit for bit.
extern "C" __global__ void embedding_backward(float* dtable, const float* dout, const u32* order, const u32* seg_start,
                                              const u32* seg_id, u32 dim) {
    u32 s = blockIdx.x;
    u32 c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    u64 dst = (u64)seg_id[s] * dim + c;
    float acc = dtable[dst];
    for (u32 k = seg_start[s]; k < seg_start[s + 1]; k++) acc += dout[(u64)order[k] * dim + c];
    dtable[dst] = acc;
}
