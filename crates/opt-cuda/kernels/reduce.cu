// Deterministic reductions: column sums (bias and LayerNorm parameter gradients) and the sum of
// squares (gradient norms). No atomics: every partial has a fixed owner and partials are combined
// in a fixed order, so the result is the same bits on every run (training resume is checked bit
// for bit).

#define COL_TILE 32
#define ROW_LANES 8

// Stage 1 of a column sum over `x [rows, dim]`, for the chunk of `chunk_rows` rows selected by
// blockIdx.y and 32 columns selected by blockIdx.x (block = 32 x 8 threads):
//   part[chunk, c] = sum over the chunk's rows r of  x[r, c]                         (xin == 0)
//                                                or  x[r, c] * (xin[r, c] - mean[r]) * rstd[r]
// The second form is LayerNorm's dweight (x = dout, xhat recomputed from the saved statistics).
// Thread (tx, ty) sums rows ty, ty + 8, ... of the chunk in order; the 8 lane sums are then
// added in lane order.
extern "C" __global__ void colsum_partials(const float* x, const float* xin, const float* mean, const float* rstd,
                                           u64 rows, u32 dim, u32 chunk_rows, float* part) {
    __shared__ float acc[ROW_LANES][COL_TILE];
    u32 tx = threadIdx.x, ty = threadIdx.y;
    u64 c = (u64)blockIdx.x * COL_TILE + tx;
    u64 r0 = (u64)blockIdx.y * chunk_rows;
    u64 r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
    float s = 0.0f;
    if (c < dim) {
        for (u64 r = r0 + ty; r < r1; r += ROW_LANES) {
            float v = x[r * dim + c];
            if (xin != 0) v *= (xin[r * dim + c] - mean[r]) * rstd[r];
            s += v;
        }
    }
    acc[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < dim) {
        float t = acc[0][tx];
        for (int l = 1; l < ROW_LANES; l++) t += acc[l][tx];
        part[(u64)blockIdx.y * dim + c] = t;
    }
}

// Stage 2: out[c] += sum over chunks k (in order) of part[k, c].
extern "C" __global__ void colsum_finish(const float* part, u32 chunks, u32 dim, float* out) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float t = part[c];
    for (u32 k = 1; k < chunks; k++) t += part[(u64)k * dim + c];
    out[c] += t;
}

// Stage 1 of sum_i x[i]^2 in f64: block b owns elements [b*chunk, (b+1)*chunk); thread t sums
// elements t, t + blockDim, ... of it, then a fixed tree combines the block. blockDim.x = 256.
extern "C" __global__ void sumsq_partials(const float* x, u64 n, u64 chunk, double* part) {
    __shared__ double buf[256];
    u64 lo = (u64)blockIdx.x * chunk;
    u64 hi = lo + chunk < n ? lo + chunk : n;
    double s = 0.0;
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        double v = (double)x[i];
        s += v * v;
    }
    double t = block_sum_f64(s, buf);
    if (threadIdx.x == 0) part[blockIdx.x] = t;
}

// Stage 2: one block of 256 threads sums the partials (thread t takes t, t + 256, ... in order,
// then the fixed tree), writing out[0].
extern "C" __global__ void sumsq_finish(const double* part, u32 count, double* out) {
    __shared__ double buf[256];
    double s = 0.0;
    for (u32 i = threadIdx.x; i < count; i += blockDim.x) s += part[i];
    double t = block_sum_f64(s, buf);
    if (threadIdx.x == 0) out[0] = t;
}
