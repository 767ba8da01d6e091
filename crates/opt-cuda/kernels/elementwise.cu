// Elementwise kernels: bias, add, scale, activations (ReLU, exact GELU) and dropout. All f32;
// the Rust side widens low-precision inputs first. Grid-stride loops, so any grid size is valid.

#define GRID_STRIDE_LOOP(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// out[r, c] += bias[c] for out [rows, dim] (n = rows * dim).
// The bias is read in its stored dtype `dt` (a bf16 model's biases as they are).
extern "C" __global__ void bias_add(float* out, const void* bias, u64 n, u32 dim, int dt) {
    GRID_STRIDE_LOOP(i, n) { out[i] += load_any(bias, i % dim, dt); }
}

extern "C" __global__ void add(float* out, const float* a, const float* b, u64 n) {
    GRID_STRIDE_LOOP(i, n) { out[i] = a[i] + b[i]; }
}

extern "C" __global__ void add_assign(float* out, const float* a, u64 n) {
    GRID_STRIDE_LOOP(i, n) { out[i] += a[i]; }
}

extern "C" __global__ void scale(float* out, float s, u64 n) {
    GRID_STRIDE_LOOP(i, n) { out[i] *= s; }
}

// Exact GELU x·Φ(x) in double, written with erfc so the negative tail keeps its relative
// precision (the CPU reference does the same in f64, so results agree to the last f32 bit in
// almost every case).
__device__ __forceinline__ float gelu(float xf) {
    double x = (double)xf;
    return (float)(x * 0.5 * erfc(-x * 0.70710678118654752440));
}

// d/dx x·Φ(x) = Φ(x) + x·φ(x).
__device__ __forceinline__ float gelu_grad(float xf) {
    double x = (double)xf;
    double cdf = 0.5 * erfc(-x * 0.70710678118654752440);
    double pdf = exp(-0.5 * x * x) * 0.39894228040143267794;
    return (float)(cdf + x * pdf);
}

// act: 0 = ReLU, 1 = GELU.
extern "C" __global__ void activation_forward(int act, float* out, const float* inp, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float x = inp[i];
        // `x < 0 ? 0 : x` keeps NaN, like torch.relu and the CPU backend.
        out[i] = act == 0 ? (x < 0.0f ? 0.0f : x) : gelu(x);
    }
}

extern "C" __global__ void activation_backward(int act, float* dinp, const float* inp, const float* dout, u64 n) {
    GRID_STRIDE_LOOP(i, n) {
        float x = inp[i];
        // ReLU: torch's threshold_backward passes the gradient where x > 0.
        dinp[i] = act == 0 ? (x > 0.0f ? dout[i] : 0.0f) : gelu_grad(x) * dout[i];
    }
}

// In place: x[i] = uniform(seed, offset + i) < p ? 0 : x[i] * scale. (p <= 0 and p >= 1 are
// handled on the host, as on the CPU.)
extern "C" __global__ void dropout(float* x, u64 n, u64 seed, u64 offset, float p, float scale) {
    GRID_STRIDE_LOOP(i, n) { x[i] = rng_uniform(seed, offset + i) < p ? 0.0f : x[i] * scale; }
}
