/* C API of libeartalk_kernels.so (CUDA, runtime API) and libeartalk_kernels_host.so (the same
 * kernel bodies run on the CPU by walking the grid). Layouts: see kv_cache.cuh.
 *
 * dtype: 0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3 (attention only needs kv_scale [num_pages, L, 2]).
 * Return: 0 ok; ET_EINVAL for an argument that would index out of range (the host library also
 * says which in et_host_last_error()); ET_ENOFP8 when fp8 is asked of a device below sm_89;
 * any other value is a cudaError_t from the launch. */
#ifndef EARTALK_KV_CACHE_API_H
#define EARTALK_KV_CACHE_API_H

#include <stdint.h>

#define ET_EINVAL 1001
#define ET_ENOFP8 1002

#ifdef __cplusplus
extern "C" {
#endif

/* ---- CUDA (libeartalk_kernels.so); stream is a cudaStream_t, NULL for the default stream. */
int et_cuda_append(int dtype, void* pool, int num_pages, int L, int H, int P, int D,
                   const int32_t* pages, int B, const void* new_k, const void* new_v,
                   void* stream);
int et_cuda_gather(int dtype, const void* pool, int num_pages, int L, int H, int P, int D,
                   const int32_t* kv_indptr, const int32_t* kv_indices, const int32_t* page_lag,
                   const int32_t* page_valid, int B, int n_slots, void* past_k, void* past_v,
                   int32_t* past_lag, void* stream);
int et_cuda_paged_attention(int dtype, const float* q, const void* pool, int num_pages, int L,
                            int H, int P, int D, int layer, const int32_t* kv_indptr,
                            const int32_t* kv_indices, const int32_t* page_lag,
                            const int32_t* page_valid, const float* lag_bias, int W,
                            const float* kv_scale, float scale, int B, int Q, float* out,
                            float* lse, void* stream);

/* ---- host (libeartalk_kernels_host.so): same arguments, host pointers, no stream. */
int et_host_append(int dtype, void* pool, int num_pages, int L, int H, int P, int D,
                   const int32_t* pages, int B, const void* new_k, const void* new_v);
int et_host_gather(int dtype, const void* pool, int num_pages, int L, int H, int P, int D,
                   const int32_t* kv_indptr, const int32_t* kv_indices, const int32_t* page_lag,
                   const int32_t* page_valid, int nnz, int B, int n_slots, void* past_k,
                   void* past_v, int32_t* past_lag);
int et_host_paged_attention(int dtype, const float* q, const void* pool, int num_pages, int L,
                            int H, int P, int D, int layer, const int32_t* kv_indptr,
                            const int32_t* kv_indices, const int32_t* page_lag,
                            const int32_t* page_valid, int nnz, const float* lag_bias, int W,
                            const float* kv_scale, float scale, int B, int Q, float* out,
                            float* lse);
/* The element decoders of the kernels (storage -> fp32), exposed so tests can check them
 * exhaustively against numpy/torch. */
int et_host_decode(int dtype, const void* in, float* out, int64_t n);
/* Message for the last ET_EINVAL returned on this thread ("" if none). */
const char* et_host_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
