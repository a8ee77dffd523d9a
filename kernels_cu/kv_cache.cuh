// eartalk paged KV cache kernels: bodies shared by the CUDA build and the host build.
//
// Layout contract (shared/design.md, "Paged KV cache"):
//   pool        [num_pages, L, 2, H, P, D]  HND; index 0 of the "2" axis is K, 1 is V
//   page table  CSR: kv_indptr int32 [B+1], kv_indices int32 [nnz] (page ids),
//               page_lag int32 [nnz] (frames since the page was written, -1 = sink),
//               page_valid int32 [nnz] (tokens of the page that hold data, 0..P)
//   fp8 scales  kv_scale float [num_pages, L, 2] (dequantised value = e4m3 * scale)
//
// Every body below is a plain function of (block index, thread index, grid size, block size), so
// the same text compiles with nvcc (called from thin __global__ wrappers in kv_cache.cu) and with
// g++ (called from loops that walk the grid in kv_cache_host.cpp). Nothing here touches a CUDA
// header: half/bf16/e4m3 are decoded with integer bit manipulation, which is exact and therefore
// gives identical results on both sides. __syncthreads() lives only in the wrappers; the bodies of
// paged attention are split into phases at the points where a block must synchronise.
//
// Index arithmetic: page ids, lags and counts are int32 (the CSR contract); every offset into the
// pool or an output tensor is computed in int64, so a pool larger than 2^31 elements is addressed
// correctly. Launchers additionally check that the grid fits the hardware limits.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC (runtime/cuda_kernels.py compiles these sources at first use, so a pip install needs no
// nvcc) ships no C library headers: declare the few names used here ourselves.
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#define INFINITY __int_as_float(0x7f800000)
#else
#include <stdint.h>
#include <math.h>
#include <assert.h>
#endif

#if defined(__CUDACC__)
#define ET_HD __host__ __device__ __forceinline__
#define ET_PRAGMA(x) _Pragma(#x)
#define ET_UNROLL ET_PRAGMA(unroll)
#define ET_UNROLL_N(n) ET_PRAGMA(unroll n)
#else
// g++ decides unrolling itself; the pragmas only matter for keeping acc[] in device registers.
#define ET_HD inline
#define ET_UNROLL
#define ET_UNROLL_N(n)
#endif

// Preconditions: assert() is live in debug builds on both sides (device asserts need no extra
// flags) and compiled out when NDEBUG is defined, as CMake's Release configuration does. Under
// NVRTC (no <assert.h>) ET_DEBUG turns them into a trap.
#if defined(__CUDACC_RTC__)
#if defined(ET_DEBUG)
#define ET_ASSERT(cond) do { if (!(cond)) __trap(); } while (0)
#else
#define ET_ASSERT(cond) ((void)0)
#endif
#else
#define ET_ASSERT(cond) assert(cond)
#endif

namespace et {

// dtype codes shared with the Python driver (runtime/cuda_kernels.py: DTYPE_CODES).
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, FP8_E4M3 = 3 };

ET_HD int dtype_bytes(int dtype) {
    return dtype == F32 ? 4 : (dtype == FP8_E4M3 ? 1 : 2);
}

// ---------------------------------------------------------------------------------------------
// Scalar decoders. Bit-exact on host and device; fp8 is decoded the same way on every arch (the
// fp8 kernels themselves are only compiled for sm_89+, see kv_cache.cu).

ET_HD float bits_to_float(uint32_t u) {
    // memcpy-free type pun that both g++ and nvcc accept without aliasing warnings.
    union { uint32_t u; float f; } x;
    x.u = u;
    return x.f;
}

ET_HD float f16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return bits_to_float(sign);                                     // +-0
    // subnormal half: value = man * 2^-24, exactly representable as a normal float.
    int e = 113;  // biased float exponent of 2^-14
    while ((man & 0x400u) == 0) { man <<= 1; --e; }
    return bits_to_float(sign | ((uint32_t)e << 23) | ((man & 0x3ffu) << 13));
}

ET_HD float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

// OCP e4m3 ("fn"): bias 7, no infinities, S.1111.111 is NaN, max 448.
ET_HD float e4m3_to_float(uint8_t v) {
    const uint32_t sign = (uint32_t)(v & 0x80u) << 24;
    const uint32_t exp = (v >> 3) & 0xfu;
    uint32_t man = v & 0x7u;
    if (exp == 0xfu && man == 0x7u) return bits_to_float(sign | 0x7fc00000u);
    if (exp != 0) return bits_to_float(sign | ((exp + 120u) << 23) | (man << 20));
    if (man == 0) return bits_to_float(sign);
    int e = 121;  // biased float exponent of 2^-6
    while ((man & 0x8u) == 0) { man <<= 1; --e; }
    return bits_to_float(sign | ((uint32_t)e << 23) | ((man & 0x7u) << 20));
}

template <int DT> struct Storage;
template <> struct Storage<F32> { typedef uint32_t T; };
template <> struct Storage<F16> { typedef uint16_t T; };
template <> struct Storage<BF16> { typedef uint16_t T; };
template <> struct Storage<FP8_E4M3> { typedef uint8_t T; };

template <int DT> ET_HD float load_as_float(typename Storage<DT>::T v);
template <> ET_HD float load_as_float<F32>(uint32_t v) { return bits_to_float(v); }
template <> ET_HD float load_as_float<F16>(uint16_t v) { return f16_to_float(v); }
template <> ET_HD float load_as_float<BF16>(uint16_t v) { return bf16_to_float(v); }
template <> ET_HD float load_as_float<FP8_E4M3>(uint8_t v) { return e4m3_to_float(v); }

ET_HD float et_exp(float x) {
    // expf rather than __expf on the device: __expf's error grows with |x| and the host build is
    // held to 1e-5 against the reference; keeping one function keeps both builds comparable.
    return expf(x);
}

// Offset of element (page, layer, kv, head, token, ch) of the pool, in elements, as int64.
ET_HD int64_t pool_offset(int page, int layer, int kv, int head, int tok, int ch,
                          int L, int H, int P, int D) {
    return ((((((int64_t)page * L + layer) * 2 + kv) * H + head) * P + tok) * D) + ch;
}

// ---------------------------------------------------------------------------------------------
// append: pool[pages[b], l, 0] = new_k[l, b]; pool[pages[b], l, 1] = new_v[l, b].
// One logical thread per element of new_k (grid-stride), copying raw storage words: bit-exact for
// every dtype, including NaN payloads and signed zeros.

struct AppendArgs {
    void* pool; int num_pages, L, H, P, D;
    const int32_t* pages; int B;
    const void* new_k; const void* new_v;
};

template <typename T>
ET_HD void append_thread(const AppendArgs& a, int64_t block, int64_t thread, int64_t nblocks,
                         int64_t nthreads) {
    ET_ASSERT(a.pool && a.pages && a.new_k && a.new_v);
    ET_ASSERT(a.L > 0 && a.H > 0 && a.P > 0 && a.D > 0 && a.B >= 0);
    const int64_t row = (int64_t)a.H * a.P * a.D;           // one (layer, session) slab
    const int64_t total = (int64_t)a.L * a.B * row;
    T* pool = (T*)a.pool;
    const T* nk = (const T*)a.new_k;
    const T* nv = (const T*)a.new_v;
    for (int64_t i = block * nthreads + thread; i < total; i += nblocks * nthreads) {
        const int64_t inner = i % row;                       // h*P*D + t*D + c
        const int64_t lb = i / row;
        const int b = (int)(lb % a.B);
        const int l = (int)(lb / a.B);
        const int page = a.pages[b];
        ET_ASSERT(page >= 0 && page < a.num_pages);
        const int64_t dst = pool_offset(page, l, 0, 0, 0, 0, a.L, a.H, a.P, a.D) + inner;
        pool[dst] = nk[i];
        pool[dst + row] = nv[i];                             // kv = 1 is one (H,P,D) slab later
    }
}

// ---------------------------------------------------------------------------------------------
// gather: the CSR rows into the engine's fixed-capacity past_k/past_v [L, B, H, S, D] and
// past_lag [B, S], S = n_slots * P. Page j of row b fills slots [j*P, (j+1)*P). Tokens at or past
// page_valid, and slots past the end of the row, are zero (all-zero bits) with lag -2.

struct GatherArgs {
    const void* pool; int num_pages, L, H, P, D;
    const int32_t* kv_indptr; const int32_t* kv_indices;
    const int32_t* page_lag; const int32_t* page_valid;
    int B, n_slots;
    void* past_k; void* past_v; int32_t* past_lag;
};

template <typename T>
ET_HD void gather_thread(const GatherArgs& a, int64_t block, int64_t thread, int64_t nblocks,
                         int64_t nthreads) {
    ET_ASSERT(a.pool && a.kv_indptr && a.kv_indices && a.page_lag && a.page_valid);
    ET_ASSERT(a.past_k && a.past_v && a.past_lag);
    ET_ASSERT(a.L > 0 && a.H > 0 && a.P > 0 && a.D > 0 && a.B >= 0 && a.n_slots >= 0);
    const int64_t S = (int64_t)a.n_slots * a.P;
    const int64_t total = (int64_t)a.L * a.B * a.H * S * a.D;
    const int64_t n_lag = (int64_t)a.B * S;
    const int64_t end = total > n_lag ? total : n_lag;
    const T* pool = (const T*)a.pool;
    T* pk = (T*)a.past_k;
    T* pv = (T*)a.past_v;
    for (int64_t i = block * nthreads + thread; i < end; i += nblocks * nthreads) {
        if (i < n_lag) {
            // past_lag[b, s]: the lag of the page holding slot s, -2 if the slot is empty.
            const int b = (int)(i / S);
            const int s = (int)(i % S);
            const int j = s / a.P, t = s % a.P;
            const int r0 = a.kv_indptr[b], r1 = a.kv_indptr[b + 1];
            ET_ASSERT(r0 <= r1);
            int32_t lag = -2;
            if (j < r1 - r0 && t < a.page_valid[r0 + j]) lag = a.page_lag[r0 + j];
            a.past_lag[i] = lag;
        }
        if (i < total) {
            const int c = (int)(i % a.D);
            int64_t rest = i / a.D;
            const int s = (int)(rest % S); rest /= S;
            const int h = (int)(rest % a.H); rest /= a.H;
            const int b = (int)(rest % a.B);
            const int l = (int)(rest / a.B);
            const int j = s / a.P, t = s % a.P;
            const int r0 = a.kv_indptr[b], r1 = a.kv_indptr[b + 1];
            T k = 0, v = 0;
            if (j < r1 - r0 && t < a.page_valid[r0 + j]) {
                const int page = a.kv_indices[r0 + j];
                ET_ASSERT(page >= 0 && page < a.num_pages);
                const int64_t src = pool_offset(page, l, 0, h, t, c, a.L, a.H, a.P, a.D);
                k = pool[src];
                v = pool[src + (int64_t)a.H * a.P * a.D];
            }
            pk[i] = k;
            pv[i] = v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// paged attention: out[b,h,q] = softmax_j(scale * q.k_j + bias(lag_j)) . v_j over the valid
// cached tokens of session b (sink + window pages), plus lse = log sum_j exp(score_j).
//
// Work split: one block per (query block, head, session); each thread owns ONE query and keeps its
// running max m, running sum l and output accumulator acc[DMAX] in registers (online softmax, as
// flash attention / vLLM do). K and V are staged a tile of TILE tokens at a time in shared memory,
// converted to fp32 once per tile; every thread of a warp reads the same K/V element (a shared
// memory broadcast), and the queries are held pre-scaled in shared memory with a row stride of
// DMAX+1 so that the per-thread row reads hit 32 different banks. Tiles never straddle pages, so a
// tile has one lag and therefore one bias value.

struct AttnArgs {
    const float* q;                       // [B, H, Q, D] fp32
    const void* pool; int num_pages, L, H, P, D; int layer;
    const int32_t* kv_indptr; const int32_t* kv_indices;
    const int32_t* page_lag; const int32_t* page_valid;
    const float* lag_bias; int W;         // [H, W+2]: col l = lag l (0..W), col W+1 = sink
    const float* kv_scale;                // [num_pages, L, 2] for fp8 pools, else unused
    float scale; int B, Q;
    float* out;                           // [B, H, Q, D] fp32
    float* lse;                           // [B, H, Q] fp32
};

template <int DMAX> struct AttnShape;
// QBLK queries (= threads) per block, TILE tokens per shared-memory tile. Sized so that the static
// shared memory stays under 48 KiB and acc[DMAX] + the TILE scores stay in registers.
template <> struct AttnShape<64> { enum { QBLK = 64, TILE = 32 }; };
template <> struct AttnShape<128> { enum { QBLK = 32, TILE = 16 }; };

template <int DMAX> struct AttnShared {
    float q[AttnShape<DMAX>::QBLK][DMAX + 1];
    float k[AttnShape<DMAX>::TILE][DMAX];
    float v[AttnShape<DMAX>::TILE][DMAX];
    float p[AttnShape<DMAX>::QBLK][AttnShape<DMAX>::TILE + 1];  // per-thread scores; +1: banks
};

template <int DMAX> struct AttnThreadState {
    float m, l;
    float acc[DMAX];
};

// Tile cursor over a session's CSR row; every thread of a block walks it identically, so the loop
// around the synchronisation points is uniform.
struct TileCursor {
    int j, j_end;   // current / one-past-last CSR entry
    int t0;         // first token of the current tile inside the page
};

ET_HD TileCursor attn_cursor_begin(const AttnArgs& a, int b) {
    ET_ASSERT(b >= 0 && b < a.B);
    TileCursor c;
    c.j = a.kv_indptr[b];
    c.j_end = a.kv_indptr[b + 1];
    c.t0 = 0;
    ET_ASSERT(c.j <= c.j_end);
    return c;
}

// Advances to the next non-empty tile. Returns false when the row is exhausted; otherwise sets
// page, the tile's first token t0, its token count n (1..TILE) and its bias.
template <int TILE>
ET_HD bool attn_next_tile(const AttnArgs& a, int h, TileCursor& c, int& page, int& t0, int& n,
                          float& bias) {
    while (c.j < c.j_end) {
        const int valid = a.page_valid[c.j];
        ET_ASSERT(valid >= 0 && valid <= a.P);
        if (c.t0 < valid) {
            page = a.kv_indices[c.j];
            ET_ASSERT(page >= 0 && page < a.num_pages);
            const int lag = a.page_lag[c.j];
            ET_ASSERT(lag >= -1 && lag <= a.W);
            bias = a.lag_bias[(int64_t)h * (a.W + 2) + (lag < 0 ? a.W + 1 : lag)];
            t0 = c.t0;
            n = valid - c.t0 < TILE ? valid - c.t0 : TILE;
            c.t0 += TILE;
            return true;
        }
        ++c.j;
        c.t0 = 0;
    }
    return false;
}

// Phase 0 (all threads): queries of this block into shared memory, pre-multiplied by scale and
// zero-padded to DMAX so the dot products below need no channel guard.
template <int DMAX>
ET_HD void attn_load_q(const AttnArgs& a, AttnShared<DMAX>& sh, int qblock, int h, int b,
                       int tid, int nthreads) {
    const int QBLK = AttnShape<DMAX>::QBLK;
    ET_ASSERT(a.D > 0 && a.D <= DMAX);
    for (int i = tid; i < QBLK * DMAX; i += nthreads) {
        const int r = i / DMAX, c = i % DMAX;
        const int qi = qblock * QBLK + r;
        float v = 0.0f;
        if (qi < a.Q && c < a.D)
            v = a.q[(((int64_t)b * a.H + h) * a.Q + qi) * a.D + c] * a.scale;
        sh.q[r][c] = v;
    }
}

template <int DMAX>
ET_HD void attn_init(AttnThreadState<DMAX>& st) {
    st.m = -INFINITY;
    st.l = 0.0f;
ET_UNROLL
    for (int c = 0; c < DMAX; ++c) st.acc[c] = 0.0f;
}

// Phase 1 (all threads): tokens [t0, t0+n) of `page` (this layer and head) into shared memory as
// fp32, dequantised with the page's K/V scale for fp8; rows past n are zero.
template <int DT, int DMAX>
ET_HD void attn_load_tile(const AttnArgs& a, AttnShared<DMAX>& sh, int h, int page, int t0, int n,
                          int tid, int nthreads) {
    typedef typename Storage<DT>::T T;
    const int TILE = AttnShape<DMAX>::TILE;
    ET_ASSERT(n > 0 && n <= TILE && t0 >= 0 && t0 + n <= a.P);
    const T* pool = (const T*)a.pool;
    float ks = 1.0f, vs = 1.0f;
    if (DT == FP8_E4M3) {
        ET_ASSERT(a.kv_scale != 0);
        const int64_t si = ((int64_t)page * a.L + a.layer) * 2;
        ks = a.kv_scale[si];
        vs = a.kv_scale[si + 1];
    }
    const int64_t kbase = pool_offset(page, a.layer, 0, h, t0, 0, a.L, a.H, a.P, a.D);
    const int64_t vbase = kbase + (int64_t)a.H * a.P * a.D;
    for (int i = tid; i < TILE * DMAX; i += nthreads) {
        const int t = i / DMAX, c = i % DMAX;
        float kf = 0.0f, vf = 0.0f;
        if (t < n && c < a.D) {
            const int64_t off = (int64_t)t * a.D + c;
            kf = load_as_float<DT>(pool[kbase + off]) * ks;
            vf = load_as_float<DT>(pool[vbase + off]) * vs;
        }
        sh.k[t][c] = kf;
        sh.v[t][c] = vf;
    }
}

// Phase 2 (each thread, its own query): fold the tile into the running softmax state. The tile's
// scores are computed first (into the thread's own row of sh.p), then m/l/acc are rescaled once per
// tile, not once per token. Scores live in shared memory rather than a register array so that the
// token loops need not be unrolled (only the channel loop over acc[] is, to keep acc in registers):
// full TILE x DMAX unrolling made nvcc take minutes per arch.
template <int DMAX>
ET_HD void attn_consume_tile(const AttnArgs& a, AttnShared<DMAX>& sh, AttnThreadState<DMAX>& st,
                             int qblock, int tid, int n, float bias) {
    const int qi = qblock * AttnShape<DMAX>::QBLK + tid;
    if (qi >= a.Q) return;
    ET_ASSERT(n > 0 && n <= AttnShape<DMAX>::TILE);
    float* p = sh.p[tid];
    float tmax = -INFINITY;
ET_UNROLL_N(1)
    for (int t = 0; t < n; ++t) {
        float dot = 0.0f;
ET_UNROLL_N(16)
        for (int c = 0; c < DMAX; ++c) dot += sh.q[tid][c] * sh.k[t][c];
        const float s = dot + bias;
        p[t] = s;
        tmax = fmaxf(tmax, s);
    }
    const float m_new = fmaxf(st.m, tmax);
    if (m_new == -INFINITY) return;  // everything so far masked (a -inf bias): nothing to add
    const float corr = st.m == -INFINITY ? 0.0f : et_exp(st.m - m_new);
    st.l *= corr;
ET_UNROLL
    for (int c = 0; c < DMAX; ++c) st.acc[c] *= corr;
ET_UNROLL_N(1)
    for (int t = 0; t < n; ++t) {
        const float e = et_exp(p[t] - m_new);
        st.l += e;
ET_UNROLL
        for (int c = 0; c < DMAX; ++c) st.acc[c] += e * sh.v[t][c];
    }
    st.m = m_new;
}

// Phase 3 (each thread): normalise and store. No valid token -> out 0, lse -inf.
template <int DMAX>
ET_HD void attn_finish(const AttnArgs& a, const AttnThreadState<DMAX>& st, int qblock, int h,
                       int b, int tid) {
    const int qi = qblock * AttnShape<DMAX>::QBLK + tid;
    if (qi >= a.Q) return;
    const int64_t row = ((int64_t)b * a.H + h) * a.Q + qi;
    const bool any = st.l > 0.0f;
    const float inv = any ? 1.0f / st.l : 0.0f;
ET_UNROLL
    for (int c = 0; c < DMAX; ++c)
        if (c < a.D) a.out[row * a.D + c] = st.acc[c] * inv;
    a.lse[row] = any ? st.m + logf(st.l) : -INFINITY;
}

}  // namespace et
