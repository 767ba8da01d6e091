// Memory kernels: fill and the (strided, dtype-converting) 2-D copy behind copy/copy_2d and the
// f32 <-> bf16/f16 conversions that feed cuBLAS.

// out[i] = value for i < n. `bits` is the value already encoded in the buffer's dtype on the
// host (the `half` crate's rounding), so the fill is a plain store of 2 or 4 bytes.
extern "C" __global__ void fill(void* out, u64 n, int elem_bytes, u32 bits) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (elem_bytes == 4) {
            ((u32*)out)[i] = bits;
        } else {
            ((u16*)out)[i] = (u16)bits;
        }
    }
}

// `rows` rows of `cols` elements: row r of src at r*src_stride, of out at r*out_stride. Equal
// dtypes copy the raw bits (exact, NaN payloads too); otherwise values go through f32 with
// round-to-nearest-even narrowing, like the CPU backend. Grid: x over columns, y over rows
// (grid-stride in both).
extern "C" __global__ void copy2d(void* out, int out_dt, u64 out_stride, const void* src, int src_dt,
                                  u64 src_stride, u64 rows, u64 cols) {
    for (u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (u64)gridDim.x * blockDim.x) {
            u64 o = r * out_stride + c, s = r * src_stride + c;
            if (out_dt == src_dt) {
                if (out_dt == DT_F32) {
                    ((u32*)out)[o] = ((const u32*)src)[s];
                } else {
                    ((u16*)out)[o] = ((const u16*)src)[s];
                }
            } else {
                store_any(out, o, out_dt, load_any(src, s, src_dt));
            }
        }
    }
}
