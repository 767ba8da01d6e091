// The output layer: fused softmax cross-entropy (loss and, in place, its gradient) and
// log-softmax. One block of 512 threads per row of `vocab` logits; exponentials in f32 (expf,
// full precision), their sum in f64 like the CPU reference.

#define LOSS_THREADS 512

// losses[r] = logsumexp(x) - x[t] (0 when t < 0). With has_grad, the row is overwritten with
// s * (softmax(x) - onehot(t)) (zeros for ignored rows), so no probability buffer is kept.
extern "C" __global__ void cross_entropy(float* logits, float* losses, const int* targets, u32 vocab, int has_grad,
                                         float s) {
    __shared__ float fbuf[LOSS_THREADS];
    __shared__ double dbuf[LOSS_THREADS];
    u64 row = blockIdx.x;
    float* x = logits + row * vocab;
    int t = targets[row];
    if (t < 0) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        if (has_grad)
            for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) x[c] = 0.0f;
        return;
    }
    float m = NEG_INF;
    for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, x[c]);
    float mx = block_max_f32(m, fbuf);
    float xt = x[t];
    double se = 0.0;
    for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) se += (double)expf(x[c] - mx);
    double sum = block_sum_f64(se, dbuf);
    if (threadIdx.x == 0) losses[row] = (float)((double)mx + log(sum) - (double)xt);
    if (has_grad) {
        float f = (float)((double)s / sum);
        for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) {
            float v = expf(x[c] - mx) * f;
            x[c] = c == (u32)t ? v - s : v;
        }
    }
}

// out = x - max - log(sum exp(x - max)), row-wise.
extern "C" __global__ void log_softmax(float* out, const float* logits, u32 vocab) {
    __shared__ float fbuf[LOSS_THREADS];
    __shared__ double dbuf[LOSS_THREADS];
    u64 row = blockIdx.x;
    const float* x = logits + row * vocab;
    float* o = out + row * vocab;
    float m = NEG_INF;
    for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, x[c]);
    float mx = block_max_f32(m, fbuf);
    double se = 0.0;
    for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) se += (double)expf(x[c] - mx);
    float lse = (float)log(block_sum_f64(se, dbuf));
    for (u32 c = threadIdx.x; c < vocab; c += blockDim.x) o[c] = x[c] - mx - lse;
}

// Greedy decoding's choice: idx[row] = the first index of the row's largest logit. One block of
// LOSS_THREADS threads per row; ties resolve to the smaller index at every step, so the result
// equals a left-to-right scan.
extern "C" __global__ void argmax_rows(u32* idx, const float* logits, u32 vocab) {
    __shared__ float vbuf[LOSS_THREADS];
    __shared__ u32 ibuf[LOSS_THREADS];
    const float* x = logits + (u64)blockIdx.x * vocab;
    float bv = NEG_INF;
    u32 bi = 0xffffffffu;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = x[j];
        if (v > bv || (v == bv && j < bi)) {
            bv = v;
            bi = j;
        }
    }
    vbuf[threadIdx.x] = bv;
    ibuf[threadIdx.x] = bi;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float v = vbuf[threadIdx.x + s];
            const u32 i = ibuf[threadIdx.x + s];
            if (v > vbuf[threadIdx.x] || (v == vbuf[threadIdx.x] && i < ibuf[threadIdx.x])) {
                vbuf[threadIdx.x] = v;
                ibuf[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) idx[blockIdx.x] = ibuf[0];
}
