// Host build of the kernels: the bodies of kv_cache.cuh run on the CPU by walking the same grid
// the CUDA launchers use (blockIdx / threadIdx loops), with each __syncthreads() of the device
// block program replaced by "finish this phase for every thread of the block first". This is what
// tests/test_kernels_host.py checks against the Python reference, so the index math and the
// online softmax that ships to the GPU are the ones tested on every CI run.
//
// Arguments are validated before any work (the device launchers trust their callers; the Python
// driver validates the same conditions): a bad input returns ET_EINVAL and et_host_last_error()
// names it.
#include <stdio.h>
#include <string.h>
#include <vector>

#include "kv_cache.cuh"
#include "kv_cache_api.h"

namespace {

thread_local char g_err[512] = "";

int fail(const char* fmt, long long a = 0, long long b = 0, long long c = 0) {
    snprintf(g_err, sizeof g_err, fmt, a, b, c);
    return ET_EINVAL;
}

const int kCopyThreads = 256;  // same block size and grid cap as kv_cache.cu
const int kCopyMaxBlocks = 4096;

int64_t copy_blocks(int64_t total) {
    int64_t blocks = (total + kCopyThreads - 1) / kCopyThreads;
    if (blocks > kCopyMaxBlocks) blocks = kCopyMaxBlocks;
    return blocks < 1 ? 1 : blocks;
}

int check_shape(int dtype, int num_pages, int L, int H, int P, int D) {
    if (dtype < et::F32 || dtype > et::FP8_E4M3) return fail("dtype code %lld is not 0..3", dtype);
    if (num_pages <= 0) return fail("num_pages=%lld must be > 0", num_pages);
    if (L <= 0 || H <= 0) return fail("L=%lld and H=%lld must be > 0", L, H);
    if (P <= 0 || D <= 0) return fail("P=%lld and D=%lld must be > 0", P, D);
    return 0;
}

// CSR page table checks shared by gather and attention.
int check_csr(const int32_t* indptr, const int32_t* indices, const int32_t* valid, int nnz, int B,
              int num_pages, int P) {
    if (B < 0) return fail("B=%lld must be >= 0", B);
    if (nnz < 0) return fail("nnz=%lld must be >= 0", nnz);
    if (indptr[0] != 0) return fail("kv_indptr[0]=%lld must be 0", indptr[0]);
    for (int b = 0; b < B; ++b)
        if (indptr[b + 1] < indptr[b])
            return fail("kv_indptr is not monotone at b=%lld (%lld > %lld)", b, indptr[b],
                        indptr[b + 1]);
    if (indptr[B] > nnz) return fail("kv_indptr[B]=%lld exceeds nnz=%lld", indptr[B], nnz);
    for (int j = 0; j < indptr[B]; ++j) {
        if (indices[j] < 0 || indices[j] >= num_pages)
            return fail("kv_indices[%lld]=%lld out of range [0, %lld)", j, indices[j], num_pages);
        if (valid[j] < 0 || valid[j] > P)
            return fail("page_valid[%lld]=%lld out of range [0, %lld]", j, valid[j], P);
    }
    return 0;
}

template <int DT, int DMAX>
void attn_grid(const et::AttnArgs& a) {
    const int QBLK = et::AttnShape<DMAX>::QBLK;
    const int TILE = et::AttnShape<DMAX>::TILE;
    // One block's shared memory and its threads' registers, reused block after block.
    std::vector<et::AttnShared<DMAX>> sh(1);
    std::vector<et::AttnThreadState<DMAX>> st(QBLK);
    const int qblocks = (a.Q + QBLK - 1) / QBLK;
    for (int b = 0; b < a.B; ++b)                    // blockIdx.z
        for (int h = 0; h < a.H; ++h)                // blockIdx.y
            for (int qb = 0; qb < qblocks; ++qb) {   // blockIdx.x
                for (int tid = 0; tid < QBLK; ++tid) {
                    et::attn_load_q<DMAX>(a, sh[0], qb, h, b, tid, QBLK);
                    et::attn_init<DMAX>(st[tid]);
                }
                // __syncthreads()
                et::TileCursor cur = et::attn_cursor_begin(a, b);
                int page = 0, t0 = 0, n = 0;
                float bias = 0.0f;
                while (et::attn_next_tile<TILE>(a, h, cur, page, t0, n, bias)) {
                    for (int tid = 0; tid < QBLK; ++tid)
                        et::attn_load_tile<DT, DMAX>(a, sh[0], h, page, t0, n, tid, QBLK);
                    // __syncthreads()
                    for (int tid = 0; tid < QBLK; ++tid)
                        et::attn_consume_tile<DMAX>(a, sh[0], st[tid], qb, tid, n, bias);
                    // __syncthreads()
                }
                for (int tid = 0; tid < QBLK; ++tid) et::attn_finish<DMAX>(a, st[tid], qb, h, b, tid);
            }
}

template <int DMAX>
void attn_dispatch(int dtype, const et::AttnArgs& a) {
    switch (dtype) {
        case et::F32: attn_grid<et::F32, DMAX>(a); break;
        case et::F16: attn_grid<et::F16, DMAX>(a); break;
        case et::BF16: attn_grid<et::BF16, DMAX>(a); break;
        default: attn_grid<et::FP8_E4M3, DMAX>(a); break;
    }
}

}  // namespace

extern "C" const char* et_host_last_error(void) { return g_err; }

extern "C" int et_host_decode(int dtype, const void* in, float* out, int64_t n) {
    g_err[0] = 0;
    if (!in || !out || n < 0) return fail("null pointer or negative n=%lld", n);
    if (dtype < et::F32 || dtype > et::FP8_E4M3) return fail("dtype code %lld is not 0..3", dtype);
    for (int64_t i = 0; i < n; ++i) {
        switch (dtype) {
            case et::F32: out[i] = et::load_as_float<et::F32>(((const uint32_t*)in)[i]); break;
            case et::F16: out[i] = et::load_as_float<et::F16>(((const uint16_t*)in)[i]); break;
            case et::BF16: out[i] = et::load_as_float<et::BF16>(((const uint16_t*)in)[i]); break;
            default: out[i] = et::load_as_float<et::FP8_E4M3>(((const uint8_t*)in)[i]); break;
        }
    }
    return 0;
}

extern "C" int et_host_append(int dtype, void* pool, int num_pages, int L, int H, int P, int D,
                              const int32_t* pages, int B, const void* new_k,
                              const void* new_v) {
    g_err[0] = 0;
    if (!pool || !pages || !new_k || !new_v) return fail("null pointer argument");
    if (int e = check_shape(dtype, num_pages, L, H, P, D)) return e;
    if (B < 0) return fail("B=%lld must be >= 0", B);
    for (int b = 0; b < B; ++b)
        if (pages[b] < 0 || pages[b] >= num_pages)
            return fail("pages[%lld]=%lld out of range [0, %lld)", b, pages[b], num_pages);
    // Two sessions writing one page in the same call would race on the GPU: refuse it here too.
    for (int b = 0; b < B; ++b)
        for (int c = b + 1; c < B; ++c)
            if (pages[b] == pages[c]) return fail("pages[%lld] and pages[%lld] are both page %lld", b, c, pages[b]);
    et::AppendArgs a = {pool, num_pages, L, H, P, D, pages, B, new_k, new_v};
    const int64_t nb = copy_blocks((int64_t)L * B * H * P * D);
    for (int64_t blk = 0; blk < nb; ++blk)
        for (int t = 0; t < kCopyThreads; ++t) {
            switch (et::dtype_bytes(dtype)) {
                case 4: et::append_thread<uint32_t>(a, blk, t, nb, kCopyThreads); break;
                case 2: et::append_thread<uint16_t>(a, blk, t, nb, kCopyThreads); break;
                default: et::append_thread<uint8_t>(a, blk, t, nb, kCopyThreads); break;
            }
        }
    return 0;
}

extern "C" int et_host_gather(int dtype, const void* pool, int num_pages, int L, int H, int P,
                              int D, const int32_t* kv_indptr, const int32_t* kv_indices,
                              const int32_t* page_lag, const int32_t* page_valid, int nnz, int B,
                              int n_slots, void* past_k, void* past_v, int32_t* past_lag) {
    g_err[0] = 0;
    if (!pool || !kv_indptr || !kv_indices || !page_lag || !page_valid || !past_k || !past_v ||
        !past_lag)
        return fail("null pointer argument");
    if (int e = check_shape(dtype, num_pages, L, H, P, D)) return e;
    if (n_slots < 0) return fail("n_slots=%lld must be >= 0", n_slots);
    if ((int64_t)n_slots * P > INT32_MAX) return fail("n_slots*P=%lld does not fit int32", (long long)n_slots * P);
    if (int e = check_csr(kv_indptr, kv_indices, page_valid, nnz, B, num_pages, P)) return e;
    for (int b = 0; b < B; ++b)
        if (kv_indptr[b + 1] - kv_indptr[b] > n_slots)
            return fail("row b=%lld has %lld pages, more than n_slots=%lld", b,
                        kv_indptr[b + 1] - kv_indptr[b], n_slots);
    et::GatherArgs a = {pool, num_pages, L, H, P, D, kv_indptr, kv_indices, page_lag, page_valid,
                        B, n_slots, past_k, past_v, past_lag};
    const int64_t S = (int64_t)n_slots * P;
    int64_t total = (int64_t)L * B * H * S * D;
    if (total < (int64_t)B * S) total = (int64_t)B * S;
    const int64_t nb = copy_blocks(total);
    for (int64_t blk = 0; blk < nb; ++blk)
        for (int t = 0; t < kCopyThreads; ++t) {
            switch (et::dtype_bytes(dtype)) {
                case 4: et::gather_thread<uint32_t>(a, blk, t, nb, kCopyThreads); break;
                case 2: et::gather_thread<uint16_t>(a, blk, t, nb, kCopyThreads); break;
                default: et::gather_thread<uint8_t>(a, blk, t, nb, kCopyThreads); break;
            }
        }
    return 0;
}

extern "C" int et_host_paged_attention(int dtype, const float* q, const void* pool, int num_pages,
                                       int L, int H, int P, int D, int layer,
                                       const int32_t* kv_indptr, const int32_t* kv_indices,
                                       const int32_t* page_lag, const int32_t* page_valid, int nnz,
                                       const float* lag_bias, int W, const float* kv_scale,
                                       float scale, int B, int Q, float* out, float* lse) {
    g_err[0] = 0;
    if (!q || !pool || !kv_indptr || !kv_indices || !page_lag || !page_valid || !lag_bias ||
        !out || !lse)
        return fail("null pointer argument");
    if (int e = check_shape(dtype, num_pages, L, H, P, D)) return e;
    if (D > 128) return fail("head dim D=%lld > 128 has no kernel instance", D);
    if (layer < 0 || layer >= L) return fail("layer=%lld out of range [0, %lld)", layer, L);
    if (W < 0) return fail("window W=%lld must be >= 0", W);
    if (Q < 0) return fail("Q=%lld must be >= 0", Q);
    if (dtype == et::FP8_E4M3 && !kv_scale) return fail("fp8 pool needs kv_scale");
    if (int e = check_csr(kv_indptr, kv_indices, page_valid, nnz, B, num_pages, P)) return e;
    // Only pages with valid tokens are read (and need a bias column), as in the reference.
    for (int j = 0; j < kv_indptr[B]; ++j)
        if (page_valid[j] > 0 && (page_lag[j] < -1 || page_lag[j] > W))
            return fail("page_lag[%lld]=%lld out of range [-1, W=%lld]", j, page_lag[j], W);
    et::AttnArgs a = {q, pool, num_pages, L, H, P, D, layer, kv_indptr, kv_indices, page_lag,
                      page_valid, lag_bias, W, kv_scale, scale, B, Q, out, lse};
    if (D <= 64) attn_dispatch<64>(dtype, a);
    else attn_dispatch<128>(dtype, a);
    return 0;
}
