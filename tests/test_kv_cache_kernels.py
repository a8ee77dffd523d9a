"""KVCache's kernel path on a CPU, and the device-path API of runtime/cuda_kernels.py.

KVCache dispatches append/gather to a kernels object when its pool is on a CUDA device and the
kernels are available. Here the kernels object is a recorder that delegates to HostKernels: the
same kernel source compiled by g++, called with the same arguments CudaKernels gets (the pool
tensor itself, Mirrored (host, device) page tables, out= tensors). So on a CPU we prove that the
kernel path gives bit-identical results to the torch path and to the numpy reference, and that
everything is validated before a launch. What needs a GPU is in tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eartalk.model.config import preset
from eartalk.runtime import cuda_kernels as ck
from eartalk.runtime import kv_cache as kvc
from eartalk.runtime import kv_reference as kr
from eartalk.runtime.kv_cache import KVCache
from eartalk.runtime.page_pool import PagePool
from eartalk.runtime.page_table import PageTable, SessionPages, build_page_table

CFG = preset("test", sink_frames=2)          # W = 3, P = 10, L = 2, H = 2, D = 8
N_SLOTS = CFG.sink_frames + CFG.window
WIDTH = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float8_e4m3fn: torch.uint8}


@pytest.fixture(scope="module")
def host() -> ck.HostKernels:
    return ck.HostKernels(ck.build_host_library(debug=True))   # cached by source hash


class Recorder:
    """Stands in for CudaKernels: records each call's arguments, runs the host build."""

    def __init__(self, host):
        self.host, self.calls = host, []

    def append(self, pool, pages, new_k, new_v, stream=None):
        self.calls.append(("append", pool, pages))
        return self.host.append(pool, pages, new_k, new_v, stream=stream)

    def gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out=None,
               stream=None):
        self.calls.append(("gather", pool, (kv_indptr, kv_indices, page_lag, page_valid), out))
        return self.host.gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots,
                                out=out, stream=stream)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(WIDTH[t.dtype])


def _random_bits(shape, dtype, gen):
    """Arbitrary storage words (NaN payloads, -0.0 included): a copy must carry them unchanged."""
    w = WIDTH[dtype]
    lo, hi = {torch.int32: (-2 ** 31, 2 ** 31), torch.int16: (-2 ** 15, 2 ** 15),
              torch.uint8: (0, 256)}[w]
    return torch.randint(lo, hi, shape, dtype=torch.int64, generator=gen).to(w).view(dtype)


def _pair(dtype, host, num_pages, seed=0):
    """A kernel-path cache and a torch-path cache holding the same random (garbage) pool.

    fp8 has no masked_fill on the CPU, so its torch-path twin is a uint8 pool with the same bytes.
    """
    rec = Recorder(host)
    kern = KVCache(num_pages, CFG, dtype=dtype, kernels=rec)
    twin = KVCache(num_pages, CFG, dtype=torch.uint8 if dtype == torch.float8_e4m3fn else dtype,
                   kernels=None)
    kern.pool.copy_(_random_bits(kern.pool.shape, dtype, torch.Generator().manual_seed(seed)))
    _bits(twin.pool).copy_(_bits(kern.pool)) if twin.pool.dtype != torch.uint8 else \
        twin.pool.copy_(kern.pool.view(torch.uint8))
    return kern, twin, rec


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = _bits(a) if a.dtype in WIDTH else a
    b = _bits(b) if b.dtype in WIDTH else b
    return a.dtype == b.dtype and torch.equal(a, b)


def _as_twin(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ------------------------------------------------------------------ dispatch

def test_select_kernels_decision(monkeypatch):
    assert KVCache(2, CFG).kernels is None                      # CPU pool: torch path
    assert "torch path" in KVCache(2, CFG).kernel_path
    assert kvc.select_kernels("cpu", "auto")[0] is None
    assert kvc.select_kernels("cuda:0", None) == (None, "kernels=None: torch path")
    fake = object()
    assert kvc.select_kernels("cpu", fake)[0] is fake           # injected: used on any device
    with pytest.raises(ValueError, match="kernels must be 'auto'"):
        kvc.select_kernels("cpu", "cuda")

    # a CUDA pool without a driver: torch path, and the reason says why
    monkeypatch.setattr(ck, "is_available", lambda: (False, "no NVIDIA driver: test"))
    k, why = kvc.select_kernels("cuda:1", "auto")
    assert k is None and "no NVIDIA driver: test" in why

    # with one: CudaKernels on the pool's own device
    made = []

    class FakeCuda:
        def __init__(self, device):
            made.append(device)
    monkeypatch.setattr(ck, "is_available", lambda: (True, ""))
    monkeypatch.setattr(ck, "CudaKernels", FakeCuda)
    k, why = kvc.select_kernels("cuda:1", "auto")
    assert isinstance(k, FakeCuda) and made == [1] and why == "CudaKernels on cuda:1"

    # kernels that fail to load (no fatbin, NVRTC error): the torch path, which is correct
    def broken(device):
        raise RuntimeError("cuModuleLoadData failed")
    monkeypatch.setattr(ck, "CudaKernels", broken)
    k, why = kvc.select_kernels("cuda:0", "auto")
    assert k is None and "cuModuleLoadData failed" in why


def test_kernel_path_gets_the_pool_itself_and_mirrored_tables(host):
    kern, _, rec = _pair(torch.float32, host, 12)
    shape = (CFG.n_layer, 2, CFG.n_head, CFG.page_tokens, CFG.head_dim)
    kern.append(np.array([3, 7]), torch.zeros(shape), torch.ones(shape))
    op, pool, pages = rec.calls[-1]
    assert op == "append" and pool is kern.pool                 # zero copy: the pool tensor itself
    assert isinstance(pages, ck.Mirrored) and pages.host.dtype == np.int32
    assert pages.host.tolist() == [3, 7] and pages.device.tolist() == [3, 7]
    assert torch.all(kern.pool[3, :, 0] == 0) and torch.all(kern.pool[7, :, 1] == 1)

    table = PageTable(np.array([0, 2], np.int32), np.array([3, 7], np.int32),
                      np.array([-1, 1], np.int32), np.array([10, 4], np.int32))
    k, v, lag = kern.gather(table)
    op, pool, index, out = rec.calls[-1]
    assert op == "gather" and pool is kern.pool
    assert all(isinstance(m, ck.Mirrored) for m in index)
    assert [m.host.tolist() for m in index] == [[0, 2], [3, 7], [-1, 1], [10, 4]]
    assert out[0] is k and out[1] is v and out[2] is lag       # written in place, not copied
    assert lag.dtype == torch.int32 and lag.shape == (1, N_SLOTS * CFG.page_tokens)


# ------------------------------------------------------------------ kernel path == torch path

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn])
def test_kernel_path_equals_torch_path_over_a_stream(host, dtype):
    """Sessions stepping through the real page table (sinks, window eviction, page reuse, a
    session leaving): every gather and the final pool equal bit for bit."""
    meta = PagePool(3 * N_SLOTS + 2)                             # 2 pages never used: garbage
    kern, twin, rec = _pair(dtype, host, meta.num_pages, seed=1)
    sessions = [SessionPages(meta, CFG, sink_valid=[4, 10]) for _ in range(3)]
    gen = torch.Generator().manual_seed(2)
    for step in range(7):
        if step == 4:
            sessions[0].close()
        live = [s for s in sessions if not s.closed]
        table = build_page_table(live)
        got, want = kern.gather(table), twin.gather(table)
        for g, w in zip(got, want):
            assert _same(_as_twin(g), w)
        shape = (CFG.n_layer, len(live), CFG.n_head, CFG.page_tokens, CFG.head_dim)
        nk, nv = _random_bits(shape, dtype, gen), _random_bits(shape, dtype, gen)
        pages = np.array([s.begin_step() for s in live], np.int32)
        kern.append(pages, nk, nv)
        twin.append(pages, _as_twin(nk), _as_twin(nv))
        assert _same(_as_twin(kern.pool), twin.pool)
    assert [c[0] for c in rec.calls] == ["gather", "append"] * 7   # every op took the kernel path


@pytest.mark.parametrize("seed", range(3))
def test_kernel_path_gather_equals_reference_on_random_tables(host, seed):
    rng = np.random.default_rng(seed)
    kern, twin, _ = _pair(torch.float32, host, 40, seed=seed)
    kern.pool[0, 0, 0, 0, 0, 0] = -0.0                           # signed zero must survive
    twin.pool[0, 0, 0, 0, 0, 0] = -0.0
    counts = rng.integers(0, N_SLOTS + 1, size=rng.integers(1, 5))
    ids = rng.permutation(40)[: counts.sum()].astype(np.int32)
    table = PageTable(kv_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                      kv_indices=ids,
                      page_lag=rng.integers(-1, CFG.window + 1, ids.size).astype(np.int32),
                      page_valid=rng.integers(0, CFG.page_tokens + 1, ids.size).astype(np.int32))
    k, v, lag = kern.gather(table)
    rk, rv, rlag = kr.gather(kern.pool.numpy(), **table.as_kwargs(), n_slots=N_SLOTS)
    # compared as words: the pool is random bits, NaNs included, and unread slots are exact 0
    assert np.array_equal(k.numpy().view(np.uint32), rk.view(np.uint32))
    assert np.array_equal(v.numpy().view(np.uint32), rv.view(np.uint32))
    assert np.array_equal(lag.numpy(), rlag)
    tk, tv, tlag = twin.gather(table)
    assert _same(k, tk) and _same(v, tv) and torch.equal(lag, tlag)


# ------------------------------------------------------------------ validated before any launch

def test_bad_calls_never_reach_the_kernels(host):
    kern, _, rec = _pair(torch.float32, host, 6)
    before = kern.pool.clone()
    shape = (CFG.n_layer, 2, CFG.n_head, CFG.page_tokens, CFG.head_dim)
    with pytest.raises(ValueError, match="page ids in"):
        kern.append([0, 6], torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="distinct"):
        kern.append([2, 2], torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(TypeError, match="dtype"):
        kern.append([0, 1], torch.zeros(shape, dtype=torch.float64), torch.zeros(shape))
    with pytest.raises(ValueError, match="session 0 has 6 pages but n_slots=5"):
        kern.gather(PageTable(np.array([0, 6], np.int32), np.arange(6, dtype=np.int32),
                              np.full(6, -1, np.int32), np.full(6, 10, np.int32)))
    with pytest.raises(ValueError, match="kv_indices must be 1-D int32"):   # never narrowed
        kern.gather(PageTable(np.array([0, 1], np.int32), np.array([1]), np.array([-1], np.int32),
                              np.array([10], np.int32)))
    assert rec.calls == []
    # a page id out of range reaches the kernels object, whose validation refuses it (host half)
    with pytest.raises(ValueError, match=r"kv_indices\[0\]=9 is not a page id in \[0, num_pages=6\)"):
        kern.gather(PageTable(np.array([0, 1], np.int32), np.array([9], np.int32),
                              np.array([-1], np.int32), np.array([10], np.int32)))
    assert _same(kern.pool, before)                             # compared as words: NaN garbage


def test_mirrored_validates_host_half_and_launch_reads_device_half(host):
    pool = torch.zeros((5, 1, 2, 1, 2, 4))
    nk = torch.ones((1, 2, 1, 2, 4))
    with pytest.raises(ValueError, match=r"pages\[1\]=5 is not a page id"):
        host.append(pool, ck.Mirrored(np.array([0, 5], np.int32), np.array([0, 1], np.int32)),
                    nk, nk)
    with pytest.raises(ValueError, match=r"pages.device must be int32 with the host copy's shape \[2\]"):
        host.append(pool, ck.Mirrored(np.array([0, 1], np.int32), np.array([0], np.int32)), nk, nk)
    with pytest.raises(ValueError, match=r"pages.device must be in host memory .* like the pool, got a DeviceArray"):
        host.append(pool, ck.Mirrored(np.array([0, 1], np.int32),
                                      ck.DeviceArray(0x1000, (2,), "int32")), nk, nk)
    # The contract: the two halves hold the same values. The launch reads the device half.
    host.append(pool, ck.Mirrored(np.array([0, 1], np.int32), np.array([3, 4], np.int32)), nk, nk)
    assert pool[3:].eq(1).all() and pool[:3].eq(0).all()


def test_device_arguments_are_validated_on_the_host():
    """Device-path validation needs no GPU: shapes, dtypes and places from metadata, index
    values from the host half of a Mirrored. The pointers here are never dereferenced."""
    pool = ck.DeviceArray(0x10000, (6, 2, 2, 2, 3, 8), "float32", device=0)
    idx = lambda n: ck.DeviceArray(0x20000, (n,), "int32")   # noqa: E731
    i32 = lambda *x: np.array(x, np.int32)                     # noqa: E731
    table = dict(kv_indptr=ck.Mirrored(i32(0, 2, 3), idx(3)),
                 kv_indices=ck.Mirrored(i32(5, 1, 2), idx(3)),
                 page_lag=ck.Mirrored(i32(-1, 1, 1), idx(3)),
                 page_valid=ck.Mirrored(i32(3, 2, 3), idx(3)))
    d = ck.validate_gather(pool, **table, n_slots=2)
    assert (d.place, d.B, d.nnz, d.n_slots) == ("device", 2, 3, 2)
    # a host page table is fine too (the driver uploads it) ...
    assert ck.validate_gather(pool, i32(0, 2, 3), i32(5, 1, 2), i32(-1, 1, 1), i32(3, 2, 3),
                              2).place == "device"
    # ... a bare device one is not: nothing could check its values before the launch
    with pytest.raises(ValueError, match=r"kv_indices is in device memory: .*pass Mirrored"):
        ck.validate_gather(pool, **{**table, "kv_indices": idx(3)}, n_slots=2)
    with pytest.raises(ValueError, match=r"kv_indices\[0\]=6 is not a page id"):
        ck.validate_gather(pool, **{**table, "kv_indices": ck.Mirrored(i32(6, 1, 2), idx(3))},
                           n_slots=2)
    with pytest.raises(ValueError, match="monotone"):
        ck.validate_gather(pool, **{**table, "kv_indptr": ck.Mirrored(i32(0, 3, 2), idx(3))},
                           n_slots=3)
    # outputs: where the pool lives, with the contract's shapes
    S = 2 * 3
    kv = ck.DeviceArray(0x30000, (2, 2, 2, S, 8), "float32")
    lag = ck.DeviceArray(0x40000, (2, S), "int32")
    ck.validate_gather(pool, **table, n_slots=2, out=(kv, kv, lag))
    with pytest.raises(ValueError, match=r"past_lag must have shape \[2, 6\]"):
        ck.validate_gather(pool, **table, n_slots=2,
                           out=(kv, kv, ck.DeviceArray(0x40000, (2, 5), "int32")))
    with pytest.raises(ValueError, match=r"past_k must be in device memory .* like the pool, got a numpy array"):
        ck.validate_gather(pool, **table, n_slots=2,
                           out=(np.zeros((2, 2, 2, S, 8), np.float32), kv, lag))
    # append: new K/V must live with the pool
    nk = ck.DeviceArray(0x50000, (2, 2, 2, 3, 8), "float32")
    assert ck.validate_append(pool, ck.Mirrored(i32(0, 4), idx(2)), nk, nk).place == "device"
    with pytest.raises(ValueError, match=r"new_v must be in device memory .* like the pool, got a numpy"):
        ck.validate_append(pool, i32(0, 4), nk, np.zeros((2, 2, 2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="new_k dtype float16 does not match pool dtype float32"):
        ck.validate_append(pool, i32(0, 4), ck.DeviceArray(0x50000, (2, 2, 2, 3, 8), "float16"), nk)
    # paged attention on a device: q float32 only (no hidden conversion on some stream)
    q16 = ck.DeviceArray(0x60000, (2, 2, 4, 8), "float16")
    lb = ck.DeviceArray(0x70000, (2, 3), "float32")
    with pytest.raises(ValueError, match="q dtype must be float32, got float16"):
        ck.validate_paged_attention(q16, pool, 0, *table.values(), lb, 0.1)
    q = ck.DeviceArray(0x60000, (2, 2, 4, 8), "float32")
    assert ck.validate_paged_attention(q, pool, 0, *table.values(), lb, 0.1).Q == 4


def test_host_kernels_refuse_a_device_pool(host):
    pool = ck.DeviceArray(0x10000, (6, 1, 2, 1, 3, 8), "float32")
    nk = ck.DeviceArray(0x50000, (1, 1, 1, 3, 8), "float32")
    with pytest.raises(ValueError, match="HostKernels runs on the CPU"):
        host.append(pool, np.array([0], np.int32), nk, nk)


def test_device_array_and_handles():
    a = ck.DeviceArray(np.uint64(0x1000), [2, 3], torch.bfloat16, device=1)
    assert (a.ptr, a.shape, a.dtype, a.nbytes, a.ndim, a.data_ptr()) == (0x1000, (2, 3), "bfloat16", 12, 2, 0x1000)
    assert ck.DeviceArray(0, (0, 4), np.int32).nbytes == 0          # empty: no address needed
    with pytest.raises(ValueError, match="not a device address"):
        ck.DeviceArray(0, (2,), "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ck.DeviceArray(0x1000, (2,), "float64")
    with pytest.raises(ValueError, match="non-negative"):
        ck.DeviceArray(0x1000, (-1,), "float32")
    with pytest.raises(ValueError, match="contiguous torch CUDA tensor"):
        ck.DeviceArray.from_torch(torch.zeros(3))
    # pycuda objects carry .handle, torch streams .cuda_stream, cuda-python handles convert
    from cuda.bindings import driver
    assert ck.stream_handle(SimpleNamespace(handle=0x77)) == 0x77
    assert ck.stream_handle(SimpleNamespace(cuda_stream=0x88)) == 0x88
    assert ck.stream_handle(driver.CUstream(0x99)) == 0x99
    assert ck.stream_handle(None) == 0 and ck.stream_handle(5) == 5
    assert ck.context_handle(SimpleNamespace(handle=0x1234)) == 0x1234
    assert ck.context_handle(driver.CUcontext(0x42)) == 0x42
    with pytest.raises(ValueError, match=r"stream must be an int handle.*\.cuda_stream or \.handle"):
        ck.stream_handle("default")


# ------------------------------------------------------------------ CudaKernels' driver code on a CPU

class EmulatedDriver:
    """Just enough of ``cuda.bindings.driver`` to run CudaKernels' own code on a CPU: "device"
    memory is host memory registered as allocations, and cuLaunchKernel runs the kernel's host
    build with the exact argument list CudaKernels built for the GPU (plus the dtype code and nnz
    that the host API takes in addition). So this checks the marshalling a GPU would get, the
    copies made (none on the device path) and the pointer checks, without a GPU."""

    class CUresult:
        CUDA_SUCCESS = 0
        CUDA_ERROR_NOT_FOUND = 500

    class CUpointer_attribute:
        CU_POINTER_ATTRIBUTE_CONTEXT = 1

    CUstream = staticmethod(int)

    def __init__(self, lib):
        self.lib, self.ranges, self.bufs = lib, [], {}
        self.launches, self.allocs, self.copies, self.syncs, self.depth = [], 0, 0, 0, 0

    def register(self, a) -> ck.DeviceArray:
        """A DeviceArray over a host array's storage, known to this 'driver' as one allocation."""
        ptr = a.data_ptr() if ck._is_torch(a) else a.ctypes.data
        nbytes = a.numel() * a.element_size() if ck._is_torch(a) else a.nbytes
        self.ranges.append((ptr, nbytes, a))
        return ck.DeviceArray(ptr, tuple(a.shape), ck._dtype_name(a))

    def cuCtxPushCurrent(self, ctx):
        self.depth += 1
        return (0,)

    def cuCtxPopCurrent(self):
        self.depth -= 1
        return (0, None)

    def cuMemAlloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.bufs[buf.ctypes.data] = buf
        self.ranges.append((buf.ctypes.data, n, buf))
        self.allocs += 1
        return (0, buf.ctypes.data)

    def cuMemFree(self, p):
        buf = self.bufs.pop(int(p))
        self.ranges = [r for r in self.ranges if r[2] is not buf]
        return (0,)

    def cuMemcpyHtoDAsync(self, dst, src, n, stream):
        ctypes.memmove(int(dst), int(src), n)
        self.copies += 1
        return (0,)

    cuMemcpyDtoHAsync = cuMemcpyHtoDAsync

    def cuStreamSynchronize(self, stream):
        self.syncs += 1
        return (0,)

    def cuMemGetAddressRange(self, p):
        for base, size, _ in self.ranges:
            if base <= p < base + max(size, 1):
                return (0, base, size)
        return (self.CUresult.CUDA_ERROR_NOT_FOUND, 0, 0)

    def cuPointerGetAttribute(self, attr, p):
        return (0, 0)

    def cuModuleGetFunction(self, module, name):
        return (0, name.decode())

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shmem, stream, args, extra):
        vals, types = args
        self.launches.append((fn, (gx, gy, gz), (bx, by, bz), stream))
        c = [t(v) for v, t in zip(vals, types)]
        I = ctypes.c_int
        op, kind = fn.split("_")[1:3]
        if op == "attn":
            code = {"f32": 0, "f16": 1, "bf16": 2, "fp8": 3}[kind]
            B = vals[16]
            nnz = ctypes.c_int32.from_address(vals[8] + 4 * B).value
            rc = self.lib.lib.et_host_paged_attention(I(code), *c[:12], I(nnz), *c[12:])
        else:
            code = {"b4": 0, "b2": 1, "b1": 3}[kind]      # copies move words: width is enough
            if op == "append":
                rc = self.lib.lib.et_host_append(I(code), *c)
            else:
                nnz = ctypes.c_int32.from_address(vals[6] + 4 * vals[10]).value
                rc = self.lib.lib.et_host_gather(I(code), *c[:10], I(nnz), *c[10:])
        self.lib._check(rc, fn)
        return (0,)


@pytest.fixture()
def emu(host):
    drv = EmulatedDriver(host)
    k = object.__new__(ck.CudaKernels)      # no cuInit here: the emulated driver stands in
    k.drv, k.ordinal, k.ctx, k.stream, k.cc = drv, 0, 1, 0, (8, 9)
    k.module, k._fns, k._own_ctx, k._own_stream = "module", {}, False, False
    yield k, drv
    assert drv.depth == 0                   # every push of the context was popped


def _copy_of(a):
    return a.copy() if isinstance(a, np.ndarray) else a.clone()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_cuda_kernels_device_path_on_emulated_driver(emu, host, dtype):
    from test_kernels_host import _bits as bits, make_case, random_new_kv
    k, drv = emu
    rng = np.random.default_rng(11)
    case = make_case(rng, dtype)
    num_pages, L, H, P, D, B = case["dims"]
    table = [case[n] for n in ("kv_indptr", "kv_indices", "page_lag", "page_valid")]
    n_slots = int(np.diff(case["kv_indptr"]).max()) + 1
    S = n_slots * P
    want = host.gather(case["pool"], *table, n_slots)

    pool = drv.register(case["pool"])
    index = [ck.Mirrored(t, drv.register(t.copy())) for t in table]
    outs_h = tuple(_copy_of(w) for w in want)
    for o in outs_h:
        bits(o)[...] = 0x55                                          # must all be overwritten
    outs = tuple(drv.register(o) for o in outs_h)
    res = k.gather(pool, *index, n_slots, out=outs, stream=SimpleNamespace(handle=0xAB))
    assert res == outs
    assert all(np.array_equal(bits(o), bits(w)) for o, w in zip(outs_h, want))
    # zero copy and asynchronous: no allocation, no copy, no sync; one launch on pycuda's stream
    assert (drv.allocs, drv.copies, drv.syncs) == (0, 0, 0)
    assert drv.launches[-1] == (f"et_gather_b{ck.DTYPE_BYTES[dtype]}", (ck.copy_grid(L * B * H * S * D), 1, 1),
                                (ck.COPY_THREADS, 1, 1), 0xAB)
    # a host page table on the device path: uploaded to temporaries, freed after a sync
    k.gather(pool, *table, n_slots, out=outs)
    assert (drv.allocs, drv.copies, drv.syncs, len(drv.bufs)) == (4, 4, 1, 0)
    assert all(np.array_equal(bits(o), bits(w)) for o, w in zip(outs_h, want))

    pages = rng.permutation(num_pages)[:2].astype(np.int32)
    new_k, new_v = random_new_kv(rng, case["pool"], (L, 2, H, P, D))
    ref_pool = _copy_of(case["pool"])
    host.append(ref_pool, pages, new_k, new_v)
    k.append(pool, ck.Mirrored(pages, drv.register(pages.copy())), drv.register(new_k),
             drv.register(new_v))
    assert np.array_equal(bits(case["pool"]), bits(ref_pool))     # written in place

    q = rng.standard_normal((B, H, 5, D)).astype(np.float32)
    lag_bias = rng.standard_normal((H, case["W"] + 2)).astype(np.float32)
    ks = case["kv_scale"]
    o_want, lse_want = host.paged_attention(q, case["pool"], 0, *table, lag_bias, 0.3, ks)
    o, lse = np.full_like(o_want, np.nan), np.full_like(lse_want, np.nan)
    k.paged_attention(drv.register(q), pool, 0, *index, drv.register(lag_bias), 0.3,
                      None if ks is None else drv.register(ks), out=(drv.register(o), drv.register(lse)))
    # as words: the pages appended above hold arbitrary bits, so some outputs are NaN
    assert np.array_equal(o.view(np.uint32), o_want.view(np.uint32))
    assert np.array_equal(lse.view(np.uint32), lse_want.view(np.uint32))
    dmax = 64 if D <= 64 else 128
    assert drv.launches[-1][1:3] == ((-(-5 // ck.ATTN_QBLK[dmax]), H, B), (ck.ATTN_QBLK[dmax], 1, 1))


def test_cuda_kernels_host_path_on_emulated_driver(emu, host):
    """The copying path (host pool): upload, launch, download, sync, free every temporary."""
    from test_kernels_host import make_case
    k, drv = emu
    case = make_case(np.random.default_rng(12), "float32")
    table = [case[n] for n in ("kv_indptr", "kv_indices", "page_lag", "page_valid")]
    n_slots = int(np.diff(case["kv_indptr"]).max())
    got = k.gather(case["pool"], *table, n_slots)
    want = host.gather(case["pool"], *table, n_slots)
    assert all(np.array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32))
               for g, w in zip(got, want))
    assert drv.syncs == 1 and drv.bufs == {} and drv.allocs == 8   # pool, 4 index, 3 outputs


def test_cuda_kernels_refuse_bad_pointers_before_launch(emu):
    k, drv = emu
    pool_h = np.zeros((4, 1, 2, 1, 2, 8), np.float32)
    base = drv.register(pool_h)
    nk = drv.register(np.zeros((1, 1, 1, 2, 8), np.float32))
    pages = ck.Mirrored(np.array([0], np.int32), drv.register(np.array([0], np.int32)))
    too_big = ck.DeviceArray(base.ptr, (8, 1, 2, 1, 2, 8), "float32")  # twice the allocation
    with pytest.raises(ValueError, match=r"pool: 1024 bytes .* overrun its allocation \(512 bytes"):
        k.append(too_big, pages, nk, nk)
    stray = np.zeros_like(pool_h)                                      # never registered
    with pytest.raises(ValueError, match="pool: 0x[0-9a-f]+ is not an address the CUDA driver allocated"):
        k.append(ck.DeviceArray(stray.ctypes.data, stray.shape, "float32"), pages, nk, nk)
    with pytest.raises(ValueError, match="DeviceArray of device 1 but these kernels run on device 0"):
        k.append(ck.DeviceArray(base.ptr, base.shape, "float32", device=1), pages, nk, nk)
    with pytest.raises(ValueError, match="out=.* required with a DeviceArray pool"):
        k.gather(base, *[ck.Mirrored(a, drv.register(a.copy())) for a in
                         (np.array([0, 1], np.int32), np.array([2], np.int32),
                          np.array([-1], np.int32), np.array([2], np.int32))], 1)
    assert drv.launches == []
