// Fused AdamW (torch.optim.AdamW semantics), one element per thread, the same f32 operations in
// the same order as the CPU reference. The scalar coefficients are computed on the host in f64
// exactly as the CPU does, then passed in as f32.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, u64 n, float decay, float w1, float b2,
                                 float c2, float neg_step, float bc2_sqrt, float eps, float gs) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float gi = g[i] * gs;
        float pi = p[i] * decay;
        float mi = m[i];
        // torch's lerp picks the formula by weight, for accuracy near both ends.
        mi = w1 < 0.5f ? mi + w1 * (gi - mi) : gi - (gi - mi) * (1.0f - w1);
        float vi = v[i] * b2 + c2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi += neg_step * mi / denom;
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}
