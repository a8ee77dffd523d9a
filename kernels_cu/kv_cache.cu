// Thin __global__ wrappers around the bodies in kv_cache.cuh, plus extern "C" runtime-API
// launchers (only when built by nvcc; NVRTC compiles just the kernels).
//
// Kernel names are extern "C" so that the cuda-python driver (runtime/cuda_kernels.py) finds them
// with cuModuleGetFunction in a fatbin built by CMake or in PTX compiled by NVRTC, without C++
// name mangling. Copy kernels are keyed by element size (b4/b2/b1), since append and gather move
// raw storage words and are therefore the same for fp32, fp16/bf16 and fp8.
#include "kv_cache.cuh"

#define ET_COPY_THREADS 256

#define ET_APPEND_KERNEL(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(ET_COPY_THREADS) NAME(                          \
        void* pool, int num_pages, int L, int H, int P, int D, const int32_t* pages, int B,      \
        const void* new_k, const void* new_v) {                                                  \
        et::AppendArgs a = {pool, num_pages, L, H, P, D, pages, B, new_k, new_v};                \
        et::append_thread<T>(a, blockIdx.x, threadIdx.x, gridDim.x, blockDim.x);                 \
    }

ET_APPEND_KERNEL(et_append_b4, uint32_t)
ET_APPEND_KERNEL(et_append_b2, uint16_t)
ET_APPEND_KERNEL(et_append_b1, uint8_t)

#define ET_GATHER_KERNEL(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(ET_COPY_THREADS) NAME(                          \
        const void* pool, int num_pages, int L, int H, int P, int D, const int32_t* kv_indptr,   \
        const int32_t* kv_indices, const int32_t* page_lag, const int32_t* page_valid, int B,    \
        int n_slots, void* past_k, void* past_v, int32_t* past_lag) {                            \
        et::GatherArgs a = {pool, num_pages, L, H, P, D, kv_indptr, kv_indices, page_lag,        \
                            page_valid, B, n_slots, past_k, past_v, past_lag};                   \
        et::gather_thread<T>(a, blockIdx.x, threadIdx.x, gridDim.x, blockDim.x);                 \
    }

ET_GATHER_KERNEL(et_gather_b4, uint32_t)
ET_GATHER_KERNEL(et_gather_b2, uint16_t)
ET_GATHER_KERNEL(et_gather_b1, uint8_t)

namespace et {

// The block program of paged attention: the phases of kv_cache.cuh with the barriers between
// them. Grid: x = query block, y = head, z = session; blockDim.x = AttnShape<DMAX>::QBLK.
template <int DT, int DMAX>
__device__ __forceinline__ void attn_block(const AttnArgs& a) {
    __shared__ AttnShared<DMAX> sh;
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, nt = blockDim.x;
    ET_ASSERT(nt == AttnShape<DMAX>::QBLK);
    attn_load_q<DMAX>(a, sh, qb, h, b, tid, nt);
    AttnThreadState<DMAX> st;
    attn_init<DMAX>(st);
    TileCursor cur = attn_cursor_begin(a, b);
    int page = 0, t0 = 0, n = 0;
    float bias = 0.0f;
    __syncthreads();
    // The cursor depends only on (b, h), so every thread takes the same number of iterations and
    // the barriers inside the loop are reached by the whole block.
    while (attn_next_tile<AttnShape<DMAX>::TILE>(a, h, cur, page, t0, n, bias)) {
        attn_load_tile<DT, DMAX>(a, sh, h, page, t0, n, tid, nt);
        __syncthreads();
        attn_consume_tile<DMAX>(a, sh, st, qb, tid, n, bias);
        __syncthreads();
    }
    attn_finish<DMAX>(a, st, qb, h, b, tid);
}

}  // namespace et

#define ET_ATTN_PARAMS                                                                           \
    const float *q, const void *pool, int num_pages, int L, int H, int P, int D, int layer,      \
        const int32_t *kv_indptr, const int32_t *kv_indices, const int32_t *page_lag,            \
        const int32_t *page_valid, const float *lag_bias, int W, const float *kv_scale,          \
        float scale, int B, int Q, float *out, float *lse
#define ET_ATTN_ARGS                                                                             \
    {q, pool, num_pages, L, H, P, D, layer, kv_indptr, kv_indices, page_lag, page_valid,         \
     lag_bias, W, kv_scale, scale, B, Q, out, lse}

#define ET_ATTN_KERNEL(NAME, DT, DMAX)                                                           \
    extern "C" __global__ void __launch_bounds__(et::AttnShape<DMAX>::QBLK)                      \
        NAME(ET_ATTN_PARAMS) {                                                                   \
        et::AttnArgs a = ET_ATTN_ARGS;                                                           \
        et::attn_block<DT, DMAX>(a);                                                             \
    }

ET_ATTN_KERNEL(et_attn_f32_d64, et::F32, 64)
ET_ATTN_KERNEL(et_attn_f16_d64, et::F16, 64)
ET_ATTN_KERNEL(et_attn_bf16_d64, et::BF16, 64)
ET_ATTN_KERNEL(et_attn_f32_d128, et::F32, 128)
ET_ATTN_KERNEL(et_attn_f16_d128, et::F16, 128)
ET_ATTN_KERNEL(et_attn_bf16_d128, et::BF16, 128)

// fp8 (e4m3) KV exists only where the hardware has fp8 (compute capability 8.9+, design.md
// "Quantization"). On older archs the kernel is an explicit trap, never a silent fallback; the
// launchers below and the Python driver refuse fp8 on such devices before ever launching.
#define ET_ATTN_FP8_KERNEL(NAME, DMAX)                                                           \
    extern "C" __global__ void __launch_bounds__(et::AttnShape<DMAX>::QBLK)                      \
        NAME(ET_ATTN_PARAMS) {                                                                   \
        ET_FP8_BODY(DMAX)                                                                        \
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#define ET_FP8_BODY(DMAX) __trap();
#else
#define ET_FP8_BODY(DMAX)                                                                        \
    et::AttnArgs a = ET_ATTN_ARGS;                                                               \
    et::attn_block<et::FP8_E4M3, DMAX>(a);
#endif
ET_ATTN_FP8_KERNEL(et_attn_fp8_d64, 64)
ET_ATTN_FP8_KERNEL(et_attn_fp8_d128, 128)

// ---------------------------------------------------------------------------------------------
// Runtime-API launchers for C/C++ callers that link libeartalk_kernels.so. Return 0 on success,
// a cudaError_t value from the launch, or ET_EINVAL for arguments that would index out of range.
#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#include "kv_cache_api.h"

namespace {

int copy_blocks(int64_t total) {
    // Grid-stride loops: cap the grid, the bodies loop over the remainder.
    int64_t blocks = (total + ET_COPY_THREADS - 1) / ET_COPY_THREADS;
    if (blocks > 4096) blocks = 4096;
    return blocks < 1 ? 1 : (int)blocks;
}

bool shape_ok(int L, int H, int P, int D) { return L > 0 && H > 0 && P > 0 && D > 0; }

}  // namespace

extern "C" int et_cuda_append(int dtype, void* pool, int num_pages, int L, int H, int P, int D,
                              const int32_t* pages, int B, const void* new_k, const void* new_v,
                              void* stream) {
    if (!pool || !pages || !new_k || !new_v || !shape_ok(L, H, P, D) || B < 0 || num_pages <= 0)
        return ET_EINVAL;
    const int64_t total = (int64_t)L * B * H * P * D;
    const cudaStream_t s = (cudaStream_t)stream;
    const int g = copy_blocks(total);
    switch (et::dtype_bytes(dtype)) {
        case 4: et_append_b4<<<g, ET_COPY_THREADS, 0, s>>>(pool, num_pages, L, H, P, D, pages, B, new_k, new_v); break;
        case 2: et_append_b2<<<g, ET_COPY_THREADS, 0, s>>>(pool, num_pages, L, H, P, D, pages, B, new_k, new_v); break;
        default: et_append_b1<<<g, ET_COPY_THREADS, 0, s>>>(pool, num_pages, L, H, P, D, pages, B, new_k, new_v); break;
    }
    return (int)cudaGetLastError();
}

extern "C" int et_cuda_gather(int dtype, const void* pool, int num_pages, int L, int H, int P,
                              int D, const int32_t* kv_indptr, const int32_t* kv_indices,
                              const int32_t* page_lag, const int32_t* page_valid, int B,
                              int n_slots, void* past_k, void* past_v, int32_t* past_lag,
                              void* stream) {
    if (!pool || !kv_indptr || !kv_indices || !page_lag || !page_valid || !past_k || !past_v ||
        !past_lag || !shape_ok(L, H, P, D) || B < 0 || n_slots < 0 || num_pages <= 0)
        return ET_EINVAL;
    const int64_t S = (int64_t)n_slots * P;
    if (S > INT32_MAX) return ET_EINVAL;  // slot indices are int32 inside the body
    int64_t total = (int64_t)L * B * H * S * D;
    if (total < (int64_t)B * S) total = (int64_t)B * S;
    const cudaStream_t s = (cudaStream_t)stream;
    const int g = copy_blocks(total);
#define ET_G(K) K<<<g, ET_COPY_THREADS, 0, s>>>(pool, num_pages, L, H, P, D, kv_indptr, kv_indices, page_lag, page_valid, B, n_slots, past_k, past_v, past_lag)
    switch (et::dtype_bytes(dtype)) {
        case 4: ET_G(et_gather_b4); break;
        case 2: ET_G(et_gather_b2); break;
        default: ET_G(et_gather_b1); break;
    }
#undef ET_G
    return (int)cudaGetLastError();
}

extern "C" int et_cuda_paged_attention(int dtype, ET_ATTN_PARAMS, void* stream) {
    if (!q || !pool || !kv_indptr || !kv_indices || !page_lag || !page_valid || !lag_bias ||
        !out || !lse || !shape_ok(L, H, P, D) || D > 128 || B < 0 || Q < 0 || W < 0 ||
        layer < 0 || layer >= L || num_pages <= 0 || B > 65535 || H > 65535)
        return ET_EINVAL;
    if (dtype == et::FP8_E4M3) {
        if (!kv_scale) return ET_EINVAL;
        int dev = 0, major = 0, minor = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        if (major * 10 + minor < 89) return ET_ENOFP8;
    }
    if (B == 0 || Q == 0) return 0;
    const cudaStream_t s = (cudaStream_t)stream;
    const bool d64 = D <= 64;
    const int qblk = d64 ? (int)et::AttnShape<64>::QBLK : (int)et::AttnShape<128>::QBLK;
    const dim3 grid((Q + qblk - 1) / qblk, H, B);
#define ET_A(K) K<<<grid, qblk, 0, s>>>(q, pool, num_pages, L, H, P, D, layer, kv_indptr, kv_indices, page_lag, page_valid, lag_bias, W, kv_scale, scale, B, Q, out, lse)
    switch (dtype) {
        case et::F32: if (d64) ET_A(et_attn_f32_d64); else ET_A(et_attn_f32_d128); break;
        case et::F16: if (d64) ET_A(et_attn_f16_d64); else ET_A(et_attn_f16_d128); break;
        case et::BF16: if (d64) ET_A(et_attn_bf16_d64); else ET_A(et_attn_bf16_d128); break;
        case et::FP8_E4M3: if (d64) ET_A(et_attn_fp8_d64); else ET_A(et_attn_fp8_d128); break;
        default: return ET_EINVAL;
    }
#undef ET_A
    return (int)cudaGetLastError();
}
#endif  // !__CUDACC_RTC__
