"""runtime/cuda_kernels.py: argument validation (runs everywhere, no GPU) and real GPU execution
against the numpy reference (skipped, with is_available()'s reason, where there is no driver).

The device path (torch CUDA tensors, DeviceArray raw pointers, Mirrored page tables, pycuda-style
context/stream objects) is checked against the host path of the same kernels, bit for bit; its
CPU-testable half (validation, dispatch) is in tests/test_kv_cache_kernels.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eartalk.runtime import cuda_kernels as ck
from eartalk.runtime import kv_reference as ref

from test_kernels_host import (DTYPES, _bits, as_reference_pool_for_copy,  # noqa: E402
                               as_reference_pool_for_math, make_case, random_new_kv)

_OK, _WHY = ck.is_available()
gpu = pytest.mark.skipif(not _OK, reason=f"no CUDA GPU: {_WHY}")
# the device path with torch tensors also needs a CUDA build of torch
_TORCH_WHY = (f"no CUDA GPU: {_WHY}" if not _OK else
              "" if torch.cuda.is_available() else "torch has no CUDA (a CPU-only build)")
gpu_torch = pytest.mark.skipif(bool(_TORCH_WHY), reason=_TORCH_WHY)


def _table():
    pool = np.zeros((6, 2, 2, 2, 3, 8), np.float32)
    return dict(pool=pool, kv_indptr=np.array([0, 2, 3], np.int32),
                kv_indices=np.array([5, 1, 2], np.int32), page_lag=np.array([-1, 1, 1], np.int32),
                page_valid=np.array([3, 2, 3], np.int32))


# ------------------------------------------------------------------ availability

def test_is_available_gives_a_reason():
    ok, why = ck.is_available()
    assert isinstance(ok, bool)
    if not ok:
        assert why and ("driver" in why or "cuda" in why.lower())
        with pytest.raises(RuntimeError, match="unavailable"):
            ck.CudaKernels()


# ------------------------------------------------------------------ validation (CPU)

def test_validate_append_names_bad_arguments():
    t = _table()
    nk = np.zeros((2, 2, 2, 3, 8), np.float32)
    d = ck.validate_append(t["pool"], np.array([0, 3], np.int32), nk, nk)
    assert (d.num_pages, d.L, d.H, d.P, d.D, d.B) == (6, 2, 2, 3, 8, 2)
    with pytest.raises(ValueError, match=r"pages\[1\]=6 is not a page id"):
        ck.validate_append(t["pool"], np.array([0, 6], np.int32), nk, nk)
    with pytest.raises(ValueError, match="pages must be distinct"):
        ck.validate_append(t["pool"], np.array([4, 4], np.int32), nk, nk)
    with pytest.raises(ValueError, match="pages must be int32"):
        ck.validate_append(t["pool"], np.array([0, 1], np.int64), nk, nk)
    with pytest.raises(ValueError, match="new_v dtype float16 does not match pool dtype float32"):
        ck.validate_append(t["pool"], np.array([0, 1], np.int32), nk, nk.astype(np.float16))
    with pytest.raises(ValueError, match=r"new_k must have shape \[L, B, H, P, D\]"):
        ck.validate_append(t["pool"], np.array([0, 1], np.int32), np.ascontiguousarray(nk[:, :1]), nk)
    with pytest.raises(ValueError, match="new_k must be C-contiguous"):
        ck.validate_append(t["pool"], np.array([0, 1], np.int32), np.asfortranarray(nk), nk)


def test_validate_pool_layout_and_dtype():
    t = _table()
    with pytest.raises(ValueError, match="pool must have layout"):
        ck.validate_gather(np.zeros((6, 2, 3, 2, 3, 8), np.float32), t["kv_indptr"],
                           t["kv_indices"], t["page_lag"], t["page_valid"], 2)
    with pytest.raises(ValueError, match="pool dtype must be one of"):
        ck.validate_gather(t["pool"].astype(np.float64), t["kv_indptr"], t["kv_indices"],
                           t["page_lag"], t["page_valid"], 2)
    with pytest.raises(ValueError, match="pool must have 6 dims"):
        ck.validate_gather(t["pool"][0], t["kv_indptr"], t["kv_indices"], t["page_lag"],
                           t["page_valid"], 2)
    # torch pools with bf16/fp8 are accepted (numpy has no such dtypes)
    bf = torch.zeros(tuple(t["pool"].shape), dtype=torch.bfloat16)
    assert ck.validate_gather(bf, t["kv_indptr"], t["kv_indices"], t["page_lag"], t["page_valid"],
                              2).dtype == "bfloat16"


def test_validate_csr_errors():
    t = _table()
    args = lambda **kw: [kw.get(k, t[k]) for k in ("pool", "kv_indptr", "kv_indices", "page_lag", "page_valid")]  # noqa: E731
    i32 = lambda *x: np.array(x, np.int32)  # noqa: E731
    with pytest.raises(ValueError, match=r"kv_indptr must be non-decreasing \(monotone\); kv_indptr\[0\]=0 > kv_indptr\[1\]=-1|kv_indptr\[0\]"):
        ck.validate_gather(*args(kv_indptr=i32(0, -1, 3)), 2)
    with pytest.raises(ValueError, match=r"monotone.*kv_indptr\[1\]=3 > kv_indptr\[2\]=2"):
        ck.validate_gather(*args(kv_indptr=i32(0, 3, 2, 3)), 3)
    with pytest.raises(ValueError, match=r"kv_indptr\[-1\]=2 must equal len\(kv_indices\)=3"):
        ck.validate_gather(*args(kv_indptr=i32(0, 1, 2)), 2)
    with pytest.raises(ValueError, match=r"kv_indices\[2\]=6 is not a page id in \[0, num_pages=6\)"):
        ck.validate_gather(*args(kv_indices=i32(5, 1, 6)), 2)
    with pytest.raises(ValueError, match=r"kv_indices\[0\]=-1"):
        ck.validate_gather(*args(kv_indices=i32(-1, 1, 2)), 2)
    with pytest.raises(ValueError, match=r"page_valid\[1\]=4 is not in \[0, P=3\]"):
        ck.validate_gather(*args(page_valid=i32(3, 4, 3)), 2)
    with pytest.raises(ValueError, match=r"page_lag\[0\]=-2"):
        ck.validate_gather(*args(page_lag=i32(-2, 1, 1)), 2)
    with pytest.raises(ValueError, match="page_lag must have one entry per kv_indices entry"):
        ck.validate_gather(*args(page_lag=i32(-1, 1)), 2)
    with pytest.raises(ValueError, match="session 0 has 2 pages but n_slots=1"):
        ck.validate_gather(*args(), 1)
    with pytest.raises(ValueError, match="kv_indptr must be int32"):
        ck.validate_gather(*args(kv_indptr=np.array([0, 2, 3])), 2)


def test_validate_paged_attention_errors():
    t = _table()
    q = np.zeros((2, 2, 4, 8), np.float32)
    lb = np.zeros((2, 3), np.float32)           # W = 1
    table = [t[k] for k in ("kv_indptr", "kv_indices", "page_lag", "page_valid")]
    d = ck.validate_paged_attention(q, t["pool"], 1, *table, lb, 0.125)
    assert (d.B, d.Q, d.W) == (2, 4, 1)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, L=2\)"):
        ck.validate_paged_attention(q, t["pool"], 2, *table, lb, 0.125)
    with pytest.raises(ValueError, match=r"q must have shape \[B=2, H=2, Q, D=8\]"):
        ck.validate_paged_attention(np.ascontiguousarray(q[:, :, :, :4]), t["pool"], 0, *table, lb, 0.125)
    with pytest.raises(ValueError, match="lag_bias must be float32"):
        ck.validate_paged_attention(q, t["pool"], 0, *table, lb.astype(np.float64), 0.125)
    bad_lag = [table[0], table[1], np.array([-1, 2, 1], np.int32), table[3]]
    with pytest.raises(ValueError, match=r"page_lag\[1\]=2 has no lag_bias column"):
        ck.validate_paged_attention(q, t["pool"], 0, *bad_lag, lb, 0.125)
    # ... but a lag on a page with no valid token is never read, as in the reference
    empty = [table[0], table[1], np.array([-1, 2, 1], np.int32), np.array([3, 0, 3], np.int32)]
    ck.validate_paged_attention(q, t["pool"], 0, *empty, lb, 0.125)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ck.validate_paged_attention(q, t["pool"], 0, *table, lb, float("nan"))
    with pytest.raises(ValueError, match="kv_scale is only for fp8 pools"):
        ck.validate_paged_attention(q, t["pool"], 0, *table, lb, 0.1,
                                    kv_scale=np.ones((6, 2, 2), np.float32))
    fp8 = torch.zeros(tuple(t["pool"].shape), dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"kv_scale float32 \[num_pages, L, 2\] is required"):
        ck.validate_paged_attention(q, fp8, 0, *table, lb, 0.1)
    with pytest.raises(ValueError, match=r"kv_scale must be float32 \[num_pages=6, L=2, 2\]"):
        ck.validate_paged_attention(q, fp8, 0, *table, lb, 0.1, kv_scale=np.ones((6, 2, 3), np.float32))
    big = np.zeros((6, 1, 2, 1, 3, 129), np.float32)
    with pytest.raises(ValueError, match="D=129 > 128"):
        ck.validate_paged_attention(np.zeros((2, 1, 1, 129), np.float32), big, 0, *table, lb[:1], 0.1)


def test_copy_grid_matches_launcher_rule():
    assert ck.copy_grid(0) == 1
    assert ck.copy_grid(256) == 1 and ck.copy_grid(257) == 2
    assert ck.copy_grid(10 ** 12) == ck.COPY_MAX_BLOCKS


# ------------------------------------------------------------------ GPU execution

@pytest.fixture(scope="module")
def cuda():
    k = ck.CudaKernels()
    yield k
    k.close()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_gpu_gather_and_append_bit_exact(cuda, dtype, seed):
    rng = np.random.default_rng(5000 + seed)
    case = make_case(rng, dtype)
    n_slots = int(np.diff(case["kv_indptr"]).max()) + 1
    args = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"], n_slots)
    k, v, lag = cuda.gather(case["pool"], *args)
    rpool, back = as_reference_pool_for_copy(case["pool"])
    rk, rv, rlag = ref.gather(rpool, *args)
    assert np.array_equal(lag, rlag)
    assert np.array_equal(_bits(k), _bits(back(rk))) and np.array_equal(_bits(v), _bits(back(rv)))

    num_pages, L, H, P, D, _ = case["dims"]
    pages = rng.permutation(num_pages)[:2].astype(np.int32)
    pool = case["pool"]
    new_k, new_v = random_new_kv(rng, pool, (L, 2, H, P, D))
    want, back = as_reference_pool_for_copy(pool.copy() if isinstance(pool, np.ndarray) else pool.clone())
    ref.append(want, pages, as_reference_pool_for_copy(new_k)[0], as_reference_pool_for_copy(new_v)[0])
    cuda.append(pool, pages, new_k, new_v)
    assert np.array_equal(_bits(pool), _bits(back(want)))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_gpu_paged_attention_matches_reference(cuda, dtype, seed):
    if dtype == "float8_e4m3fn" and cuda.cc < ck.FP8_MIN_CC:
        case = make_case(np.random.default_rng(0), dtype)
        q = np.zeros((case["dims"][5], case["dims"][2], 1, case["dims"][4]), np.float32)
        lb = np.zeros((case["dims"][2], case["W"] + 2), np.float32)
        with pytest.raises(ck.UnsupportedDeviceError, match="8.9"):
            cuda.paged_attention(q, case["pool"], 0, case["kv_indptr"], case["kv_indices"],
                                 case["page_lag"], case["page_valid"], lb, 0.1, case["kv_scale"])
        return
    rng = np.random.default_rng(6000 + seed)
    case = make_case(rng, dtype)
    num_pages, L, H, P, D, B = case["dims"]
    q = rng.standard_normal((B, H, int(rng.integers(1, 71)), D)).astype(np.float32)
    lag_bias = rng.standard_normal((H, case["W"] + 2)).astype(np.float32)
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    out, lse = cuda.paged_attention(q, case["pool"], 0, *table, lag_bias, 1 / np.sqrt(D),
                                    kv_scale=case["kv_scale"])
    rpool = as_reference_pool_for_math(case["pool"], case["kv_scale"])
    rout, rlse = ref.paged_attention(q, rpool, 0, *table, lag_bias, 1 / np.sqrt(D))
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU execution: device path

def _to_cuda(a):
    return (torch.from_numpy(a) if isinstance(a, np.ndarray) else a).cuda()


def _mirrored(*arrays):
    return [ck.Mirrored(a, torch.from_numpy(a).cuda()) for a in arrays]


@gpu_torch
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(2))
def test_gpu_device_gather_and_append_equal_host_path(cuda, dtype, seed):
    """Torch CUDA tensors in place, Mirrored page table: same bits as the (copying) host path."""
    rng = np.random.default_rng(7000 + seed)
    case = make_case(rng, dtype)
    n_slots = int(np.diff(case["kv_indptr"]).max()) + 1
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    pool_h = case["pool"]
    pool_d = _to_cuda(pool_h)
    want = cuda.gather(pool_h, *table, n_slots)
    got = cuda.gather(pool_d, *_mirrored(*table), n_slots)
    assert all(g.device == pool_d.device for g in got)            # outputs stay on the device
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert np.array_equal(_bits(g.cpu()), _bits(w))
    # a host page table on the device path is uploaded by the driver: same result
    got2 = cuda.gather(pool_d, *table, n_slots)
    assert all(np.array_equal(_bits(a.cpu()), _bits(b.cpu())) for a, b in zip(got, got2))

    num_pages, L, H, P, D, _ = case["dims"]
    pages = rng.permutation(num_pages)[:2].astype(np.int32)
    new_k, new_v = random_new_kv(rng, pool_h, (L, 2, H, P, D))
    ptr = pool_d.data_ptr()
    cuda.append(pool_d, *_mirrored(pages), _to_cuda(new_k), _to_cuda(new_v))
    cuda.append(pool_h, pages, new_k, new_v)
    torch.cuda.synchronize()
    assert pool_d.data_ptr() == ptr                               # in place, no new storage
    assert np.array_equal(_bits(pool_d.cpu()), _bits(pool_h))


@gpu_torch
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_device_paged_attention_equals_host_path(cuda, dtype):
    rng = np.random.default_rng(8000)
    case = make_case(rng, dtype)
    num_pages, L, H, P, D, B = case["dims"]
    q = rng.standard_normal((B, H, 37, D)).astype(np.float32)
    lag_bias = rng.standard_normal((H, case["W"] + 2)).astype(np.float32)
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    ks = case["kv_scale"]
    if dtype == "float8_e4m3fn" and cuda.cc < ck.FP8_MIN_CC:
        with pytest.raises(ck.UnsupportedDeviceError, match="8.9"):
            cuda.paged_attention(_to_cuda(q), _to_cuda(case["pool"]), 0, *_mirrored(*table),
                                 _to_cuda(lag_bias), 0.1, _to_cuda(ks))
        return
    want = cuda.paged_attention(q, case["pool"], 0, *table, lag_bias, 1 / np.sqrt(D), kv_scale=ks)
    got = cuda.paged_attention(_to_cuda(q), _to_cuda(case["pool"]), 0, *_mirrored(*table),
                               _to_cuda(lag_bias), 1 / np.sqrt(D),
                               kv_scale=None if ks is None else _to_cuda(ks))
    torch.cuda.synchronize()
    # the same kernel on the same inputs: identical, not merely close
    assert np.array_equal(got[0].cpu().numpy(), want[0])
    assert np.array_equal(got[1].cpu().numpy(), want[1])


@gpu_torch
@pytest.mark.gpu
def test_gpu_raw_pointers_pycuda_style_stream_and_context(cuda):
    """DeviceArray over memory the caller owns, a stream given as an object with .handle (as
    pycuda's), a second CudaKernels on the caller's context (pycuda's Context has .handle)."""
    rng = np.random.default_rng(9000)
    case = make_case(rng, "float32")
    n_slots = int(np.diff(case["kv_indptr"]).max())
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    num_pages, L, H, P, D, B = case["dims"]
    S = n_slots * P
    pool_t = _to_cuda(case["pool"])
    outs_t = (torch.empty((L, B, H, S, D), device="cuda"), torch.empty((L, B, H, S, D), device="cuda"),
              torch.empty((B, S), dtype=torch.int32, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())                 # pool_t is written on the default
    pycuda_stream = SimpleNamespace(handle=side.cuda_stream)
    pool = ck.DeviceArray.from_torch(pool_t)
    outs = tuple(ck.DeviceArray.from_torch(t) for t in outs_t)
    with pytest.raises(ValueError, match="out=.* required with a DeviceArray pool"):
        cuda.gather(pool, *_mirrored(*table), n_slots)
    res = cuda.gather(pool, *_mirrored(*table), n_slots, out=outs, stream=pycuda_stream)
    assert res == outs
    side.synchronize()
    want = cuda.gather(case["pool"], *table, n_slots)
    for t, w in zip(outs_t, want):
        assert np.array_equal(_bits(t.cpu()), _bits(w))

    other = ck.CudaKernels(context=SimpleNamespace(handle=int(cuda.ctx)),
                           stream=SimpleNamespace(handle=side.cuda_stream))
    try:
        pages = np.array([int(case["kv_indices"][0])], np.int32)
        nk = torch.full((L, 1, H, P, D), 3.0, device="cuda")
        other.append(pool, *_mirrored(pages), ck.DeviceArray.from_torch(nk),
                     ck.DeviceArray.from_torch(nk))                # no torch tensor: its own stream
        other.synchronize()
        assert torch.all(pool_t[pages[0]] == 3.0)
    finally:
        other.close()                                              # borrowed: nothing destroyed
    cuda.gather(pool_t, *_mirrored(*table), n_slots)               # the shared context still works
    torch.cuda.synchronize()


@gpu_torch
@pytest.mark.gpu
def test_gpu_raw_pointers_are_checked_before_launch(cuda):
    drv = cuda.drv
    with cuda._current():
        err, small = drv.cuMemAlloc(64)
    assert err == drv.CUresult.CUDA_SUCCESS
    try:
        pool = ck.DeviceArray(int(small), (4, 1, 2, 1, 2, 8), "float32")  # 512 bytes > 64
        nk = torch.zeros((1, 1, 1, 2, 8), device="cuda")
        with pytest.raises(ValueError, match="pool: 512 bytes .* overrun its allocation"):
            cuda.append(pool, *_mirrored(np.array([0], np.int32)), nk, nk)
        host = np.zeros(64, np.float32)
        fake = ck.DeviceArray(host.ctypes.data, (1, 1, 2, 1, 2, 8), "float32")
        with pytest.raises(ValueError, match="not an address the CUDA driver allocated"):
            cuda.append(fake, *_mirrored(np.array([0], np.int32)), nk, nk)
        with pytest.raises(ValueError, match=r"pages is in device memory.*Mirrored"):
            cuda.append(ck.DeviceArray.from_torch(torch.zeros((1, 1, 2, 1, 2, 8), device="cuda")),
                        torch.zeros(1, dtype=torch.int32, device="cuda"), nk, nk)
    finally:
        with cuda._current():
            drv.cuMemFree(small)


@gpu_torch
@pytest.mark.gpu
def test_gpu_kvcache_uses_the_kernels_and_equals_the_torch_path():
    from eartalk.model.config import preset
    from eartalk.runtime.kv_cache import KVCache
    from eartalk.runtime.page_pool import PagePool
    from eartalk.runtime.page_table import SessionPages, build_page_table
    cfg = preset("test", sink_frames=2)
    meta = PagePool(3 * (cfg.sink_frames + cfg.window))
    kern = KVCache(meta.num_pages, cfg, device="cuda")
    twin = KVCache(meta.num_pages, cfg, device="cuda", kernels=None)
    try:
        assert isinstance(kern.kernels, ck.CudaKernels), kern.kernel_path
        g = torch.Generator(device="cuda").manual_seed(0)
        kern.pool.copy_(torch.randn(kern.pool.shape, device="cuda", generator=g))
        twin.pool.copy_(kern.pool)
        sessions = [SessionPages(meta, cfg, sink_valid=[3, 10]) for _ in range(3)]
        for step in range(6):
            table = build_page_table(sessions)
            for a, b in zip(kern.gather(table), twin.gather(table)):
                assert torch.equal(a, b)
            shape = (cfg.n_layer, 3, cfg.n_head, cfg.page_tokens, cfg.head_dim)
            nk = torch.randn(shape, device="cuda", generator=g)
            nv = torch.randn(shape, device="cuda", generator=g)
            pages = np.array([s.begin_step() for s in sessions], np.int32)
            kern.append(pages, nk, nv)
            twin.append(pages, nk, nv)
        assert torch.equal(kern.pool, twin.pool)
    finally:
        kern.close()
