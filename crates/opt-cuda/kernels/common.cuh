// Shared by every kernel file: integer types, dtype codes, bf16/f16 conversions, the
// counter-based RNG (a port of opt-tensor's rng.rs) and deterministic block reductions.
//
// The Rust side prepends this text to each .cu file before handing it to NVRTC, so the files
// need no include path (NVRTC has no CUDA headers unless told where they are).
//
// Shape legend (as in opt-tensor's backend.rs): N = rows (B*T), C = channels, V = vocab,
// B = batch, T = time, NH = heads, HS = head size.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Dtype codes, matching the Rust side's `dtype_code`.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

#define NEG_INF (__int_as_float(0xff800000))

// bf16 is the top half of an f32: widening is a shift.
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, NaN kept quiet: the same rule as the `half` crate (and torch), so a
// value converted on the GPU has the bits the CPU backend would give it.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

// f16 through the PTX conversion instructions (cuda_fp16.h is not available to NVRTC here).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float load_any(const void* p, u64 i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    u16 h = ((const u16*)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ void store_any(void* p, u64 i, int dt, float v) {
    if (dt == DT_F32) {
        ((float*)p)[i] = v;
    } else {
        ((u16*)p)[i] = dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

// ---- counter-based RNG: opt_tensor::rng::{bits, uniform}, bit for bit --------------------------
#define RNG_GOLDEN 0x9E3779B97F4A7C15ULL

__device__ __forceinline__ u64 rng_mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 rng_bits(u64 seed, u64 index) {
    return rng_mix(rng_mix(seed ^ (index * RNG_GOLDEN)) + RNG_GOLDEN);
}

// 24 random bits times 2^-24: exact in f32, so CPU and GPU compare the same number with p.
__device__ __forceinline__ float rng_uniform(u64 seed, u64 index) {
    return (float)(rng_bits(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// The dropout factor of element `index` of a draw: 0 when dropped, `scale` = 1/(1-p) (computed
// on the host, as the CPU does, so the bits agree) when kept.
__device__ __forceinline__ float drop_factor(u64 seed, u64 offset, float p, float scale, u64 index) {
    return rng_uniform(seed, offset + index) < p ? 0.0f : scale;
}

// ---- deterministic block reductions -----------------------------------------------------------
// A fixed tree over shared memory: the same inputs give the same bits on every run, whatever the
// scheduling. `buf` holds blockDim.x entries; blockDim.x must be a power of two. Every thread of
// the block must call these (they synchronise).

__device__ __forceinline__ float block_sum_f32(float v, float* buf) {
    u32 t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ double block_sum_f64(double v, double* buf) {
    u32 t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    double r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_max_f32(float v, float* buf) {
    u32 t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] = fmaxf(buf[t], buf[t + s]);
        __syncthreads();
    }
    float r = buf[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
