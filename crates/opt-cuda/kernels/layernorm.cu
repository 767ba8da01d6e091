// LayerNorm over the last dimension (PyTorch semantics: biased variance, eps inside the root).
// One block of 256 threads per row. The statistics are two-pass (mean, then mean squared
// deviation) accumulated in f64 like the CPU reference, so rows with a large common offset keep
// their digits. The parameter gradients are column sums done by reduce.cu's deterministic
// two-stage kernels, not here.

#define LN_THREADS 256

// out = (x - mean) * rstd * w + b (w, b optional: null pointers, stored as dtype `wdt`: the
// parameters of a bf16 model are read as they are); saves mean[row], rstd[row].
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const void* w,
                                             const void* b, u32 dim, float eps, int wdt) {
    __shared__ double buf[LN_THREADS];
    u64 row = blockIdx.x;
    const float* x = inp + row * dim;
    float* o = out + row * dim;
    double s = 0.0;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) s += (double)x[c];
    double mu = block_sum_f64(s, buf) / (double)dim;
    double q = 0.0;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        double d = (double)x[c] - mu;
        q += d * d;
    }
    double var = block_sum_f64(q, buf) / (double)dim;
    float rs = (float)(1.0 / sqrt(var + (double)eps));
    float mu32 = (float)mu;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float y = (x[c] - mu32) * rs;
        if (w != 0) y *= load_any(w, c, wdt);
        if (b != 0) y += load_any(b, c, wdt);
        o[c] = y;
    }
    if (threadIdx.x == 0) {
        mean[row] = mu32;
        rstd[row] = rs;
    }
}

// dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w, xhat = (x - mean) * rstd.
extern "C" __global__ void layernorm_backward_dx(float* dinp, const float* dout, const float* inp, const float* w,
                                                 const float* mean, const float* rstd, u32 dim) {
    __shared__ double buf[LN_THREADS];
    u64 row = blockIdx.x;
    const float* x = inp + row * dim;
    const float* dy = dout + row * dim;
    float* d = dinp + row * dim;
    float mu = mean[row], rs = rstd[row];
    double sg = 0.0, sgx = 0.0;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = w != 0 ? dy[c] * w[c] : dy[c];
        float xh = (x[c] - mu) * rs;
        sg += (double)g;
        sgx += (double)(g * xh);
    }
    float inv_dim = 1.0f / (float)dim;
    float mean_g = (float)block_sum_f64(sg, buf) * inv_dim;
    float mean_gx = (float)block_sum_f64(sgx, buf) * inv_dim;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = w != 0 ? dy[c] * w[c] : dy[c];
        float xh = (x[c] - mu) * rs;
        d[c] += rs * (g - mean_g - xh * mean_gx);
    }
}
