"""The CUDA kernel bodies (kernels_cu/kv_cache.cuh), compiled for the host by g++ and run by walking
the grid on the CPU, against the numpy reference (runtime/kv_reference.py).

append and gather must be bit-exact (compared as raw storage words, so NaN payloads and -0.0
count); paged attention within 1e-5. Page tables are random: 0..4 sink pages, windows of 1..16,
partial pages, pages scattered through a pool with holes, and NaN garbage everywhere a kernel must
not read (unused pages, tokens past page_valid), so a wrong index shows up as a NaN or a mismatch.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from eartalk.runtime import cuda_kernels as ck
from eartalk.runtime import kv_reference as ref

DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")


@pytest.fixture(scope="module")
def host() -> ck.HostKernels:
    # Cached by source hash in the temp dir: a rebuild happens only when a kernel source changes.
    return ck.HostKernels(ck.build_host_library(debug=True))


# ------------------------------------------------------------------ case generation

def _bits(a) -> np.ndarray:
    """Raw storage words of a numpy array or torch tensor, for bit-exact comparisons."""
    raw = ck._raw(a)
    return raw.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[raw.dtype.itemsize])


def random_table(rng, P: int, B: int, W: int, max_sinks: int = 4):
    """CSR rows (sinks first, then window pages oldest -> newest) and the page count they need."""
    rows = []
    for _ in range(B):
        n_sink = int(rng.integers(0, max_sinks + 1))
        n_win = int(rng.integers(0, W + 1))
        lags = [-1] * n_sink + list(range(n_win, 0, -1))
        if n_win and rng.random() < 0.2:
            lags[-1] = 0  # lag 0 (a page of the current step) is legal in the layout
        valid = [int(rng.integers(1, P + 1)) for _ in range(n_sink)]
        valid += [P if rng.random() < 0.7 else int(rng.integers(0, P + 1)) for _ in range(n_win)]
        rows.append((lags, valid))
    return rows


def make_case(rng, dtype: str, D: int | None = None, W: int | None = None, B: int | None = None):
    L = int(rng.integers(1, 4))
    H = int(rng.integers(1, 4))
    P = int(rng.integers(1, 9))
    D = D or int(rng.choice([1, 8, 16, 33, 64, 100, 128]))
    W = W or int(rng.integers(1, 17))
    B = B or int(rng.integers(1, 5))
    rows = random_table(rng, P, B, W)
    need = sum(len(lags) for lags, _ in rows)
    num_pages = need + int(rng.integers(1, 8))          # spare pages = holes
    ids = rng.permutation(num_pages)[:need].astype(np.int32)  # scattered, not contiguous
    kv_indptr = np.zeros(B + 1, np.int32)
    kv_indptr[1:] = np.cumsum([len(lags) for lags, _ in rows])
    page_lag = np.array([x for lags, _ in rows for x in lags], np.int32)
    page_valid = np.array([x for _, valid in rows for x in valid], np.int32)

    data = rng.standard_normal((num_pages, L, 2, H, P, D)).astype(np.float32)
    readable = np.zeros(data.shape, bool)
    for e, page in enumerate(ids):
        readable[page, :, :, :, :page_valid[e]] = True
    data[~readable] = np.nan                              # garbage a kernel must never read
    scale = None
    if dtype in ("float32", "float16"):
        pool = data.astype(dtype)
    elif dtype == "bfloat16":
        pool = torch.from_numpy(data).to(torch.bfloat16)
    else:
        pool = torch.from_numpy(data * 8).to(torch.float8_e4m3fn)  # NaN -> e4m3 NaN (0x7f/0xff)
        scale = (rng.random((num_pages, L, 2)) * 0.25 + 0.01).astype(np.float32)
    return dict(pool=pool, kv_indptr=kv_indptr, kv_indices=ids, page_lag=page_lag,
                page_valid=page_valid, W=W, dims=(num_pages, L, H, P, D, B), kv_scale=scale)


def random_new_kv(rng, pool, shape):
    """A step's new_k/new_v in the pool's dtype; torch dtypes get arbitrary bit patterns (NaN
    payloads included), which a copy must carry unchanged."""
    if isinstance(pool, np.ndarray):
        new_k = rng.standard_normal(shape).astype(pool.dtype)
        new_v = rng.standard_normal(shape).astype(pool.dtype)
        new_k.flat[0] = -0.0
        return new_k, new_v
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    width = torch.int16 if pool.element_size() == 2 else torch.uint8
    lo, hi = (-2 ** 15, 2 ** 15) if width == torch.int16 else (0, 256)
    return tuple(torch.randint(lo, hi, shape, dtype=width, generator=gen).view(pool.dtype)
                 for _ in range(2))


def as_reference_pool_for_copy(pool):
    """A pool the numpy reference accepts with the same bits/values per element (copies only)."""
    if isinstance(pool, np.ndarray):
        return pool, lambda x: x
    if pool.dtype == torch.bfloat16:   # same width as float16: the reference copies bits
        return pool.view(torch.float16).numpy(), lambda x: x.view(np.uint16)
    # 1-byte fp8: carry each byte as an exact float32 value, convert back after the copy.
    return pool.view(torch.uint8).numpy().astype(np.float32), lambda x: x.astype(np.uint8)


def as_reference_pool_for_math(pool, kv_scale):
    """fp32 values the kernel computes with (bf16 widened exactly, fp8 dequantised per page)."""
    if isinstance(pool, np.ndarray):
        return pool
    f = pool.float().numpy()
    if kv_scale is not None:
        f = f * kv_scale[:, :, :, None, None, None]
    return np.ascontiguousarray(f, dtype=np.float32)


# ------------------------------------------------------------------ decoders

def test_decoders_are_exact_for_every_code(host):
    f16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    bf16 = f16.copy()
    e4m3 = np.arange(256, dtype=np.uint16).astype(np.uint8)
    cases = [
        (1, f16, f16.view(np.float16).astype(np.float32)),
        (2, bf16, torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16).float().numpy()),
        (3, e4m3, torch.from_numpy(e4m3).view(torch.float8_e4m3fn).float().numpy()),
    ]
    for code, raw, want in cases:
        got = np.empty(raw.size, np.float32)
        rc = host.lib.et_host_decode(code, raw.ctypes.data_as(ctypes.c_void_p),
                                     got.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(raw.size))
        assert rc == 0
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan), f"dtype {code}: NaN codes differ"
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), \
            f"dtype {code}: decoded bits differ"


# ------------------------------------------------------------------ golden index map

def test_gather_golden_sink_window_mapping(host):
    # P=2. Session 0: sink page 5 (1 valid token), window pages 2 (lag 2) and 0 (lag 1).
    # Session 1: no sink, one window page 3 with 1 valid token. n_slots = 3.
    num_pages, L, H, P, D = 6, 1, 1, 2, 1
    pool = np.full((num_pages, L, 2, H, P, D), np.nan, np.float32)
    for page in range(num_pages):
        for t in range(P):
            pool[page, 0, 0, 0, t, 0] = page * 10 + t          # K = 10*page + token
            pool[page, 0, 1, 0, t, 0] = -(page * 10 + t)       # V = -K
    kv_indptr = np.array([0, 3, 4], np.int32)
    kv_indices = np.array([5, 2, 0, 3], np.int32)
    page_lag = np.array([-1, 2, 1, 1], np.int32)
    page_valid = np.array([1, 2, 2, 1], np.int32)
    k, v, lag = host.gather(pool, kv_indptr, kv_indices, page_lag, page_valid, 3)
    assert lag.tolist() == [[-1, -2, 2, 2, 1, 1], [1, -2, -2, -2, -2, -2]]
    assert k[0, 0, 0, :, 0].tolist() == [50, 0, 20, 21, 0, 1]
    assert k[0, 1, 0, :, 0].tolist() == [30, 0, 0, 0, 0, 0]
    assert np.array_equal(v, -k)
    assert not np.any(np.isnan(k)), "a NaN means a slot read a token past page_valid"


# ------------------------------------------------------------------ append

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_append_bit_exact(host, dtype, seed):
    rng = np.random.default_rng(1000 + seed)
    case = make_case(rng, dtype)
    num_pages, L, H, P, D, _ = case["dims"]
    B = int(rng.integers(1, num_pages + 1))
    pages = rng.permutation(num_pages)[:B].astype(np.int32)
    pool = case["pool"]
    new_k, new_v = random_new_kv(rng, pool, (L, B, H, P, D))
    want_pool, back = as_reference_pool_for_copy(pool.clone() if not isinstance(pool, np.ndarray) else pool.copy())
    want_k, _ = as_reference_pool_for_copy(new_k)
    want_v, _ = as_reference_pool_for_copy(new_v)
    ref.append(want_pool, pages, want_k, want_v)
    host.append(pool, pages, new_k, new_v)
    assert np.array_equal(_bits(pool), _bits(back(want_pool)))


# ------------------------------------------------------------------ gather

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_gather_bit_exact(host, dtype, seed):
    rng = np.random.default_rng(2000 + seed)
    case = make_case(rng, dtype)
    counts = np.diff(case["kv_indptr"])
    n_slots = int(counts.max()) + int(rng.integers(0, 3))
    args = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"], n_slots)
    k, v, lag = host.gather(case["pool"], *args)
    rpool, back = as_reference_pool_for_copy(case["pool"])
    rk, rv, rlag = ref.gather(rpool, *args)
    assert np.array_equal(lag, rlag)
    assert np.array_equal(_bits(k), _bits(back(rk)))
    assert np.array_equal(_bits(v), _bits(back(rv)))
    empty = lag == ref.LAG_EMPTY                       # [B, S]
    for b in range(lag.shape[0]):
        assert np.all(_bits(k)[:, b][:, :, empty[b]] == 0)  # exact zeros, not garbage
        assert np.all(_bits(v)[:, b][:, :, empty[b]] == 0)


@pytest.mark.parametrize("sinks", range(5))
@pytest.mark.parametrize("window", [1, 2, 7, 16])
def test_gather_every_sink_count_and_window(host, sinks, window):
    # Full-size sessions: each row has exactly `sinks` sink pages and a full window.
    rng = np.random.default_rng(sinks * 100 + window)
    L, H, P, D, B = 2, 2, 3, 4, 3
    per = sinks + window
    num_pages = B * per + 5
    ids = rng.permutation(num_pages)[:B * per].astype(np.int32)
    kv_indptr = (np.arange(B + 1) * per).astype(np.int32)
    page_lag = np.tile(np.array([-1] * sinks + list(range(window, 0, -1)), np.int32), B)
    page_valid = np.full(B * per, P, np.int32)
    page_valid[::3] = rng.integers(0, P + 1, page_valid[::3].size)
    pool = rng.standard_normal((num_pages, L, 2, H, P, D)).astype(np.float32)
    args = (kv_indptr, ids, page_lag, page_valid, per)
    got = host.gather(pool, *args)
    want = ref.gather(pool, *args)
    for g, w in zip(got, want):
        assert np.array_equal(_bits(g), _bits(w))


# ------------------------------------------------------------------ paged attention

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_matches_reference(host, dtype, seed):
    rng = np.random.default_rng(3000 + seed)
    case = make_case(rng, dtype)
    num_pages, L, H, P, D, B = case["dims"]
    Q = int(rng.integers(1, 71))
    q = rng.standard_normal((B, H, Q, D)).astype(np.float32)
    lag_bias = rng.standard_normal((H, case["W"] + 2)).astype(np.float32)
    layer = int(rng.integers(0, L))
    scale = float(1.0 / np.sqrt(D))
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    out, lse = host.paged_attention(q, case["pool"], layer, *table, lag_bias, scale,
                                    kv_scale=case["kv_scale"])
    rpool = as_reference_pool_for_math(case["pool"], case["kv_scale"])
    rout, rlse = ref.paged_attention(q, rpool, layer, *table, lag_bias, scale)
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("D", [64, 128])
def test_paged_attention_model_sized_pages(host, D):
    # tiny/small-preset-like shapes: P = 70 tokens (several tiles per page), 1 sink + W=8.
    rng = np.random.default_rng(D)
    L, H, P, B, W = 1, 2, 70, 2, 8
    per = 1 + W
    num_pages = B * per + 3
    ids = rng.permutation(num_pages)[:B * per].astype(np.int32)
    kv_indptr = (np.arange(B + 1) * per).astype(np.int32)
    page_lag = np.tile(np.array([-1] + list(range(W, 0, -1)), np.int32), B)
    page_valid = np.full(B * per, P, np.int32)
    pool = rng.standard_normal((num_pages, L, 2, H, P, D)).astype(np.float32)
    q = (rng.standard_normal((B, H, P, D)) * 2).astype(np.float32)
    lag_bias = rng.standard_normal((H, W + 2)).astype(np.float32)
    table = (kv_indptr, ids, page_lag, page_valid)
    out, lse = host.paged_attention(q, pool, 0, *table, lag_bias, 1 / np.sqrt(D))
    rout, rlse = ref.paged_attention(q, pool, 0, *table, lag_bias, 1 / np.sqrt(D))
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)


def test_paged_attention_empty_sessions(host):
    # Session 0 has no pages, session 1 only pages with 0 valid tokens: out 0, lse -inf.
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((4, 1, 2, 2, 3, 8)).astype(np.float32)
    kv_indptr = np.array([0, 0, 2, 3], np.int32)
    ids = np.array([1, 3, 2], np.int32)
    lag = np.array([-1, 1, 1], np.int32)
    valid = np.array([0, 0, 3], np.int32)
    q = rng.standard_normal((3, 2, 5, 8)).astype(np.float32)
    lag_bias = np.zeros((2, 3), np.float32)
    out, lse = host.paged_attention(q, pool, 0, kv_indptr, ids, lag, valid, lag_bias, 0.5)
    assert np.all(out[:2] == 0) and np.all(np.isneginf(lse[:2]))
    rout, rlse = ref.paged_attention(q, pool, 0, kv_indptr, ids, lag, valid, lag_bias, 0.5)
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)


def test_paged_attention_q_fp16_is_widened_exactly(host):
    rng = np.random.default_rng(11)
    case = make_case(rng, "float16", D=16)
    num_pages, L, H, P, D, B = case["dims"]
    q = rng.standard_normal((B, H, 9, D)).astype(np.float16)
    lag_bias = rng.standard_normal((H, case["W"] + 2)).astype(np.float32)
    table = (case["kv_indptr"], case["kv_indices"], case["page_lag"], case["page_valid"])
    out, lse = host.paged_attention(q, case["pool"], 0, *table, lag_bias, 0.25)
    rout, rlse = ref.paged_attention(q, case["pool"], 0, *table, lag_bias, 0.25)
    np.testing.assert_allclose(out, rout, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ C-level argument checks

def test_host_library_refuses_bad_tables_and_names_them(host):
    # Straight into the C entry point (the Python wrapper would refuse first): the host launcher
    # has its own checks so that C callers get the same protection.
    lib = host.lib
    pool = np.zeros((4, 1, 2, 1, 2, 4), np.float32)
    past = np.zeros((1, 2, 1, 4, 4), np.float32)
    lag = np.zeros((2, 4), np.int32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    i32 = lambda *x: np.array(x, np.int32)  # noqa: E731
    cases = [
        (i32(0, 2, 1), i32(0, 1), "kv_indptr is not monotone"),
        (i32(0, 1, 2), i32(0, 4), "kv_indices[1]=4 out of range"),
        (i32(1, 1, 2), i32(0, 1), "kv_indptr[0]=1"),
    ]
    for indptr, indices, msg in cases:
        ones = i32(1, 1)
        rc = lib.et_host_gather(0, p(pool), 4, 1, 1, 2, 4, p(indptr), p(indices), p(ones), p(ones),
                                2, 2, 2, p(past), p(past), p(lag))
        assert rc == 1001
        assert msg in lib.et_host_last_error().decode()
    pages = i32(0, 9)
    nk = np.zeros((1, 2, 1, 2, 4), np.float32)
    rc = lib.et_host_append(0, p(pool), 4, 1, 1, 2, 4, p(pages), 2, p(nk), p(nk))
    assert rc == 1001 and "pages[1]=9 out of range" in lib.et_host_last_error().decode()
