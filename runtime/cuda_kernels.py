"""Drive the hand-written paged KV cache kernels (``kernels_cu/``) from Python.

Two executors share one validated entry point per op:

- :class:`CudaKernels`: the CUDA kernels through cuda-python's driver API
  (``cuda.bindings.driver``): cuInit, the device's primary context (or a caller's context and
  stream, e.g. pycuda's), ``cuModuleLoadData`` of the fatbin CMake built
  (``build/eartalk_kernels.fatbin`` or ``$EARTALK_KERNELS_FATBIN``) or, failing that, of PTX
  compiled at first use by NVRTC from the packaged ``.cu`` sources, so a pip install works without
  nvcc; then ``cuLaunchKernel``.
- :class:`HostKernels`: ``libeartalk_kernels_host.so``, the same kernel bodies compiled by g++
  and run on the CPU by walking the grid (:func:`build_host_library` makes it). The tests compare
  it with ``runtime/kv_reference.py`` on every run; no GPU is needed.

Where the data lives decides the path, per call, from the pool:

- host pool (numpy array or torch CPU tensor): :class:`CudaKernels` uploads, launches and
  downloads (a round trip per call: for tests and tools, not for serving);
- device pool (torch CUDA tensor, or :class:`DeviceArray` for a raw pointer from pycuda,
  ``cuMemAlloc``, TensorRT ...): zero copy, the kernel runs on the caller's buffers, on
  ``stream=`` (default: torch's current stream when torch tensors are passed, else the kernels'
  own stream) and the call returns without waiting for it.

Every argument is checked BEFORE a launch (:func:`validate_append`, :func:`validate_gather`,
:func:`validate_paged_attention`; pure numpy, testable on a CPU): a page id out of range, a CSR
``kv_indptr`` that is not monotone, a dtype or layout that does not match the pool -> ``ValueError``
naming the argument. A kernel that read out of range on a GPU would corrupt or crash the whole
process, so these checks are not optional. Index values can only be checked on the host, so an
index array in device memory must come as :class:`Mirrored` ``(host, device)``: the host copy the
caller built it from is validated, the device copy is what the kernel reads. A bare device index
array is refused. (A host index array is also accepted on the device path; the driver then
uploads it to a temporary buffer and waits for the kernel before freeing it.)

Index arrays are int32 (the CSR contract: refuse int64 rather than narrow it silently). torch
gives bf16 and float8_e4m3fn, numpy does not.

``is_available()`` returns ``(ok, reason)``; on a machine without the NVIDIA driver, as in CI, the
reason says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eartalk import kernels_cu

__all__ = [
    "DTYPE_CODES", "FP8_MIN_CC", "Dims", "DeviceArray", "Mirrored", "UnsupportedDeviceError",
    "is_available", "validate_append", "validate_gather", "validate_paged_attention",
    "compile_ptx", "find_fatbin", "build_host_library", "HostKernels", "CudaKernels",
    "stream_handle", "context_handle",
]

# dtype codes of kv_cache.cuh (et::DType)
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float8_e4m3fn": 3}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int32": 4}
FP8_MIN_CC = (8, 9)          # e4m3 KV only where the hardware has fp8 (design.md, Quantization)
MAX_HEAD_DIM = 128           # kernel instances exist for D <= 64 and D <= 128
COPY_THREADS = 256           # block size and grid cap of the copy kernels (kv_cache.cu)
COPY_MAX_BLOCKS = 4096
ATTN_QBLK = {64: 64, 128: 32}  # threads (= queries) per attention block, per DMAX (AttnShape)
INT32_MAX = 2 ** 31 - 1
GRID_YZ_MAX = 65535


class UnsupportedDeviceError(RuntimeError):
    """The device cannot run what was asked (e.g. fp8 KV below compute capability 8.9)."""


@dataclass(frozen=True)
class Dims:
    """Sizes read off a validated pool and call."""
    dtype: str
    num_pages: int
    L: int
    H: int
    P: int
    D: int
    B: int
    nnz: int = 0
    n_slots: int = 0
    Q: int = 0
    W: int = 0
    place: str = "host"      # where the pool lives: "host" or "device"


def _dtype_str(dt) -> str:
    """``"float32"`` from a str, numpy dtype/type or torch dtype."""
    if isinstance(dt, str):
        return dt
    if type(dt).__module__.startswith("torch"):
        return str(dt).replace("torch.", "")
    return np.dtype(dt).name


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in device memory the caller owns: a raw pointer, shape and dtype.

    For device memory torch did not allocate: ``int(pycuda_allocation)``, a ``cuMemAlloc`` result,
    a TensorRT binding. The driver never frees it. Nothing about the pointer can be checked
    here; :class:`CudaKernels` asks the driver, before launching, that ``[ptr, ptr + nbytes)``
    lies inside one allocation, so a host pointer or a buffer too small for ``shape`` is refused
    instead of faulting. ``device``: the CUDA ordinal, when known (checked against the kernels').
    """
    ptr: int
    shape: tuple
    dtype: str
    device: int | None = None

    def __post_init__(self):
        ptr = int(self.ptr)                           # CUdeviceptr, pycuda DeviceAllocation
        shape = tuple(int(x) for x in self.shape)
        dt = _dtype_str(self.dtype)
        if dt not in DTYPE_BYTES:
            raise ValueError(f"DeviceArray dtype must be one of {sorted(DTYPE_BYTES)}, got {dt}")
        if any(x < 0 for x in shape):
            raise ValueError(f"DeviceArray shape must be non-negative, got {list(shape)}")
        if ptr < 0 or (ptr == 0 and math.prod(shape) > 0):
            raise ValueError(f"DeviceArray ptr={ptr:#x} is not a device address for a non-empty array")
        object.__setattr__(self, "ptr", ptr)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dt)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    def data_ptr(self) -> int:
        return self.ptr

    @classmethod
    def from_torch(cls, t) -> "DeviceArray":
        """View of a contiguous CUDA tensor (the tensor must outlive the launch)."""
        if not _is_torch(t) or t.device.type != "cuda" or not t.is_contiguous():
            raise ValueError("DeviceArray.from_torch needs a contiguous torch CUDA tensor")
        return cls(t.data_ptr(), tuple(t.shape), _dtype_str(t.dtype), t.device.index)


@dataclass(frozen=True)
class Mirrored:
    """One int32 index array held twice: ``host`` is validated, ``device`` is what the kernel reads.

    The caller guarantees both hold the same values: ``device`` was copied from ``host`` (e.g.
    ``torch.from_numpy(host).cuda()``) in stream order before the launch and neither changed
    since. That is the only way to give a device-resident page table to a launch, since the
    values of device memory cannot be checked without a copy back and a sync per call.
    """
    host: object
    device: object


def stream_handle(stream) -> int:
    """A ``CUstream`` as an int from: an int, a cuda-python ``CUstream``, a pycuda ``Stream``
    (``.handle``) or a torch ``cuda.Stream`` (``.cuda_stream``). ``None`` -> 0 (legacy default)."""
    return _handle("stream", stream, ("cuda_stream", "handle"))


def context_handle(context) -> int:
    """A ``CUcontext`` as an int from: an int, a cuda-python ``CUcontext`` or a pycuda ``Context``
    (``.handle``)."""
    return _handle("context", context, ("handle",))


def _handle(what: str, obj, attrs) -> int:
    if obj is None:
        return 0
    for attr in attrs:
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            break
    try:
        h = int(obj)   # cuda-python handle types convert with int()
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int handle, a cuda-python object or an object with "
                         f"{' or '.join('.' + a for a in attrs)}, got {type(obj).__name__}") from None
    if h < 0:
        raise ValueError(f"{what} handle must be >= 0, got {h}")
    return h


# ------------------------------------------------------------------ array helpers

def _dtype_name(a) -> str:
    # numpy: "float32"; torch: "torch.float32" -> "float32"; DeviceArray: "float32"
    return str(a.dtype).replace("torch.", "")


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _place(a) -> str | None:
    """``"host"``, ``"device"`` (CUDA), another torch device type, or None (not an array)."""
    if isinstance(a, DeviceArray):
        return "device"
    if isinstance(a, np.ndarray):
        return "host"
    if _is_torch(a) and hasattr(a, "device"):
        return {"cpu": "host", "cuda": "device"}.get(a.device.type, a.device.type)
    return None


def _where(a) -> str:
    if isinstance(a, DeviceArray):
        return "a DeviceArray (device memory)"
    if _is_torch(a):
        return f"a torch tensor on {a.device}"
    return "a numpy array (host memory)"


_PLACE_WORDS = {"host": "host memory (numpy or a torch CPU tensor)",
                "device": "device memory (a torch CUDA tensor or DeviceArray)"}


def _is_contiguous(a) -> bool:
    if isinstance(a, DeviceArray):
        return True                     # contiguous by definition
    return bool(a.is_contiguous()) if _is_torch(a) else bool(a.flags.c_contiguous)


def _shape(a) -> tuple[int, ...]:
    return tuple(int(x) for x in a.shape)


def _check_array(name: str, a, ndim: int | None = None, place: str = "host"):
    p = _place(a)
    if p is None:
        raise ValueError(f"{name} must be a numpy array, torch tensor or DeviceArray, got "
                         f"{type(a).__name__}")
    if p != place:
        raise ValueError(f"{name} must be in {_PLACE_WORDS[place]} like the pool, got {_where(a)}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {_shape(a)}")
    if not _is_contiguous(a):
        raise ValueError(f"{name} must be C-contiguous (the kernels index it densely)")


def _int32(name: str, a) -> np.ndarray:
    """A host int32 index array's values (numpy view, no copy)."""
    _check_array(name, a, 1, "host")
    if _dtype_name(a) != "int32":
        raise ValueError(f"{name} must be int32, got {_dtype_name(a)}")
    return a.numpy() if _is_torch(a) else a


def _index(name: str, a, place: str) -> np.ndarray:
    """Host values of an index argument for a launch on ``place``; refuses what cannot be checked.

    A :class:`Mirrored` index has its host part validated and its device part checked to be an
    int32 array of the same length where the pool lives (``place``): that is the one the launch
    reads. A bare array in device memory is refused: its values are unknown to the host.
    """
    if isinstance(a, Mirrored):
        host = _int32(f"{name}.host", a.host)
        dev = a.device
        if _place(dev) != place:
            raise ValueError(f"{name}.device must be in {_PLACE_WORDS[place]} like the pool, got "
                             f"{_where(dev) if _place(dev) else type(dev).__name__}")
        _check_array(f"{name}.device", dev, 1, place)
        if _dtype_name(dev) != "int32" or _shape(dev) != _shape(host):
            raise ValueError(f"{name}.device must be int32 with the host copy's shape "
                             f"{list(_shape(host))}, got {_dtype_name(dev)} {list(_shape(dev))}")
        return host
    if _place(a) == "device":
        raise ValueError(f"{name} is in device memory: its values cannot be checked before the "
                         f"launch; pass Mirrored(host=<the host array it was copied from>, "
                         f"device={name})")
    return _int32(name, a)


def _launch_index(a):
    """The array a launch reads for an index argument (the device half of a Mirrored)."""
    return a.device if isinstance(a, Mirrored) else a


def _raw(a) -> np.ndarray:
    """The array's storage as a numpy array of unsigned words of the same width (zero copy)."""
    if _is_torch(a):
        import torch
        view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
        return a.view(view).numpy()
    return a


def _check_pool(pool) -> tuple[str, int, int, int, int, int, str]:
    place = _place(pool)
    if place not in ("host", "device"):
        raise ValueError(f"pool must be a numpy array, a torch CPU/CUDA tensor or a DeviceArray, "
                         f"got {_where(pool) if place else type(pool).__name__}")
    _check_array("pool", pool, 6, place)
    if pool.shape[2] != 2:
        raise ValueError(f"pool must have layout [num_pages, L, 2, H, P, D] (HND, 0=K 1=V), got "
                         f"shape {_shape(pool)}")
    dt = _dtype_name(pool)
    if dt not in DTYPE_CODES:
        raise ValueError(f"pool dtype must be one of {sorted(DTYPE_CODES)}, got {dt}")
    num_pages, L, _, H, P, D = _shape(pool)
    if min(num_pages, L, H, P, D) < 1:
        raise ValueError(f"pool has an empty dimension: shape {_shape(pool)}")
    return dt, num_pages, L, H, P, D, place


def _check_csr(num_pages: int, P: int, kv_indptr, kv_indices, page_lag, page_valid,
               place: str = "host"):
    indptr = _index("kv_indptr", kv_indptr, place)
    indices = _index("kv_indices", kv_indices, place)
    lag = _index("page_lag", page_lag, place)
    valid = _index("page_valid", page_valid, place)
    if indptr.shape[0] < 1:
        raise ValueError("kv_indptr must have B+1 >= 1 entries, got an empty array")
    nnz = indices.shape[0]
    if indptr[0] != 0:
        raise ValueError(f"kv_indptr[0] must be 0, got {int(indptr[0])}")
    steps = np.diff(indptr.astype(np.int64))
    if np.any(steps < 0):
        b = int(np.argmax(steps < 0))
        raise ValueError(f"kv_indptr must be non-decreasing (monotone); kv_indptr[{b}]="
                         f"{int(indptr[b])} > kv_indptr[{b + 1}]={int(indptr[b + 1])}")
    if int(indptr[-1]) != nnz:
        raise ValueError(f"kv_indptr[-1]={int(indptr[-1])} must equal len(kv_indices)={nnz}")
    for name, a in (("page_lag", lag), ("page_valid", valid)):
        if a.shape[0] != nnz:
            raise ValueError(f"{name} must have one entry per kv_indices entry ({nnz}), got "
                             f"{a.shape[0]}")
    if nnz:
        bad = np.flatnonzero((indices < 0) | (indices >= num_pages))
        if bad.size:
            raise ValueError(f"kv_indices[{bad[0]}]={int(indices[bad[0]])} is not a page id in "
                             f"[0, num_pages={num_pages})")
        bad = np.flatnonzero((valid < 0) | (valid > P))
        if bad.size:
            raise ValueError(f"page_valid[{bad[0]}]={int(valid[bad[0]])} is not in [0, P={P}]")
        bad = np.flatnonzero(lag < -1)
        if bad.size:
            raise ValueError(f"page_lag[{bad[0]}]={int(lag[bad[0]])}: expected -1 (sink) or >= 0")
    return indptr, indices, lag, valid, indptr.shape[0] - 1, nnz


def _check_out(name: str, a, shape: tuple, dtype: str, place: str):
    _check_array(name, a, len(shape), place)
    if _shape(a) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(_shape(a))}")
    if _dtype_name(a) != dtype:
        raise ValueError(f"{name} must be {dtype}, got {_dtype_name(a)}")


def _check_outs(names, out, specs, place: str):
    if not isinstance(out, (tuple, list)) or len(out) != len(specs):
        raise ValueError(f"out must be a tuple ({', '.join(names)}), got {type(out).__name__}")
    for name, a, (shape, dtype) in zip(names, out, specs):
        _check_out(name, a, shape, dtype, place)


# ------------------------------------------------------------------ validation (CPU-testable)

def validate_append(pool, pages, new_k, new_v) -> Dims:
    """Check an append call; return its sizes or raise ``ValueError`` naming the argument."""
    dt, num_pages, L, H, P, D, place = _check_pool(pool)
    pg = _index("pages", pages, place)
    B = pg.shape[0]
    want = (L, B, H, P, D)
    for name, a in (("new_k", new_k), ("new_v", new_v)):
        _check_array(name, a, 5, place)
        if _shape(a) != want:
            raise ValueError(f"{name} must have shape [L, B, H, P, D] = {list(want)}, got "
                             f"{list(a.shape)}")
        if _dtype_name(a) != dt:
            raise ValueError(f"{name} dtype {_dtype_name(a)} does not match pool dtype {dt}")
    if B:
        bad = np.flatnonzero((pg < 0) | (pg >= num_pages))
        if bad.size:
            raise ValueError(f"pages[{bad[0]}]={int(pg[bad[0]])} is not a page id in "
                             f"[0, num_pages={num_pages})")
        if np.unique(pg).size != B:
            raise ValueError(f"pages must be distinct (two sessions writing one page), got "
                             f"{pg.tolist()}")
    return Dims(dt, num_pages, L, H, P, D, B, place=place)


def validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots,
                    out=None) -> Dims:
    """``out``: optional ``(past_k, past_v, past_lag)`` to write, where the pool lives."""
    dt, num_pages, L, H, P, D, place = _check_pool(pool)
    indptr, _, _, _, B, nnz = _check_csr(num_pages, P, kv_indptr, kv_indices, page_lag,
                                         page_valid, place)
    if not isinstance(n_slots, (int, np.integer)) or n_slots < 0:
        raise ValueError(f"n_slots must be an int >= 0 (pages per session), got {n_slots!r}")
    n_slots = int(n_slots)
    if n_slots * P > INT32_MAX:
        raise ValueError(f"n_slots*P = {n_slots * P} slots does not fit the kernels' int32 index")
    counts = np.diff(indptr)
    if B and counts.max() > n_slots:
        b = int(np.argmax(counts))
        raise ValueError(f"kv_indptr: session {b} has {int(counts[b])} pages but n_slots={n_slots}")
    if out is not None:
        S = n_slots * P
        _check_outs(("past_k", "past_v", "past_lag"), out,
                    [((L, B, H, S, D), dt), ((L, B, H, S, D), dt), ((B, S), "int32")], place)
    return Dims(dt, num_pages, L, H, P, D, B, nnz=nnz, n_slots=n_slots, place=place)


def validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                             lag_bias, scale, kv_scale=None, out=None) -> Dims:
    """``out``: optional ``(out float32 [B,H,Q,D], lse float32 [B,H,Q])``, where the pool lives.

    On the device path q must already be float32 (the host path widens fp16 itself; on a device
    that would be a hidden allocation and a kernel on some other stream)."""
    dt, num_pages, L, H, P, D, place = _check_pool(pool)
    _, _, lag, valid, B, nnz = _check_csr(num_pages, P, kv_indptr, kv_indices, page_lag,
                                          page_valid, place)
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < L:
        raise ValueError(f"layer must be an int in [0, L={L}), got {layer!r}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"pool head dim D={D} > {MAX_HEAD_DIM}: no kernel instance")
    _check_array("q", q, 4, place)
    if int(q.shape[0]) != B or int(q.shape[1]) != H or int(q.shape[3]) != D:
        raise ValueError(f"q must have shape [B={B}, H={H}, Q, D={D}], got {list(q.shape)}")
    q_ok = ("float32", "float16") if place == "host" else ("float32",)
    if _dtype_name(q) not in q_ok:
        raise ValueError(f"q dtype must be {' or '.join(q_ok)}, got {_dtype_name(q)}")
    _check_array("lag_bias", lag_bias, 2, place)
    if _dtype_name(lag_bias) != "float32" or int(lag_bias.shape[0]) != H or lag_bias.shape[1] < 2:
        raise ValueError(f"lag_bias must be float32 [H={H}, W+2], got {_dtype_name(lag_bias)} "
                         f"{list(lag_bias.shape)}")
    W = int(lag_bias.shape[1]) - 2
    if nnz:
        bad = np.flatnonzero((valid > 0) & ((lag < -1) | (lag > W)))
        if bad.size:
            raise ValueError(f"page_lag[{bad[0]}]={int(lag[bad[0]])} has no lag_bias column: "
                             f"expected -1 (sink) or 0..W={W}")
    if not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if dt == "float8_e4m3fn":
        if kv_scale is None:
            raise ValueError("kv_scale float32 [num_pages, L, 2] is required for an fp8 pool")
        _check_array("kv_scale", kv_scale, 3, place)
        if _dtype_name(kv_scale) != "float32" or _shape(kv_scale) != (num_pages, L, 2):
            raise ValueError(f"kv_scale must be float32 [num_pages={num_pages}, L={L}, 2], got "
                             f"{_dtype_name(kv_scale)} {list(kv_scale.shape)}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale is only for fp8 pools; pool dtype is {dt}")
    if B > GRID_YZ_MAX or H > GRID_YZ_MAX:
        raise ValueError(f"B={B} and H={H} must be <= {GRID_YZ_MAX} (grid y/z limit)")
    Q = int(q.shape[2])
    if out is not None:
        _check_outs(("out", "lse"), out, [((B, H, Q, D), "float32"), ((B, H, Q), "float32")],
                    place)
    return Dims(dt, num_pages, L, H, P, D, B, nnz=nnz, Q=Q, W=W, place=place)


def _q_f32(q) -> np.ndarray:
    """q as contiguous float32 numpy (fp16 -> fp32 is exact)."""
    a = q.numpy() if _is_torch(q) else q
    return np.ascontiguousarray(a, dtype=np.float32)


def _empty_like_pool(pool, shape, dtype=None):
    """A new array where the pool lives (torch CUDA tensors on the pool's device)."""
    if _is_torch(pool):
        import torch
        dt = {"int32": torch.int32, "float32": torch.float32}.get(dtype, pool.dtype)
        return torch.empty(shape, dtype=dt, device=pool.device)
    return np.empty(shape, dtype=dtype or pool.dtype)


def copy_grid(total: int) -> int:
    """Blocks of the copy kernels' grid-stride loops (same rule as kv_cache.cu)."""
    assert total >= 0, total
    return max(1, min(COPY_MAX_BLOCKS, -(-total // COPY_THREADS)))


# ------------------------------------------------------------------ host build

def build_host_library(out_dir: str | os.PathLike | None = None, debug: bool = True,
                       cxx: str | None = None) -> Path:
    """Compile ``libeartalk_kernels_host.so`` with g++ (cached by source hash) and return its path.

    ``debug`` keeps ``assert`` live (no -DNDEBUG) so the kernel bodies' preconditions are checked.
    """
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"C++ compiler {cxx!r} not found on PATH; set CXX")
    out_dir = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "eartalk_kernels_host"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256((kernels_cu.sources_digest() + cxx + str(debug)).encode()).hexdigest()[:16]
    lib = out_dir / f"libeartalk_kernels_host-{key}.so"
    if lib.exists():
        return lib
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           f"-I{kernels_cu.SOURCE_DIR}", str(kernels_cu.source_path(kernels_cu.HOST_SOURCE)),
           "-o", str(tmp)]
    if not debug:
        cmd.insert(1, "-DNDEBUG")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"host kernel build failed ({' '.join(cmd)}):\n{res.stderr}")
    os.replace(tmp, lib)  # atomic: concurrent test workers never load a half-written library
    return lib


def _ptr(a) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.data_ptr() if _is_torch(a) else a.ctypes.data)


def _host_only(d: Dims, who: str):
    if d.place != "host":
        raise ValueError(f"{who} runs on the CPU: the pool must be in host memory, got device "
                         f"memory (use CudaKernels)")


class HostKernels:
    """The kernels' host build through ctypes (CPU; for tests and CPU timing, not a GPU figure).

    Same signatures as :class:`CudaKernels` (``out=``, :class:`Mirrored` indices, ``stream=``),
    so it can stand in for it on a CPU: it validates the ``host`` half of a Mirrored index and
    reads the ``device`` half, exactly as a launch would. ``stream`` is accepted and ignored (the
    host build is synchronous).
    """

    def __init__(self, lib_path: str | os.PathLike | None = None):
        self.path = Path(lib_path) if lib_path else build_host_library()
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.et_host_last_error.restype = ctypes.c_char_p

    def _check(self, rc: int, op: str):
        if rc != 0:
            msg = self.lib.et_host_last_error().decode()
            raise ValueError(f"{op}: {msg} (code {rc})")

    def append(self, pool, pages, new_k, new_v, stream=None) -> None:
        d = validate_append(pool, pages, new_k, new_v)
        _host_only(d, "HostKernels")
        i = ctypes.c_int
        rc = self.lib.et_host_append(i(DTYPE_CODES[d.dtype]), _ptr(pool), i(d.num_pages), i(d.L),
                                     i(d.H), i(d.P), i(d.D), _ptr(_launch_index(pages)), i(d.B),
                                     _ptr(new_k), _ptr(new_v))
        self._check(rc, "append")

    def gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out=None,
               stream=None):
        d = validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out)
        _host_only(d, "HostKernels")
        S = d.n_slots * d.P
        if out is None:
            out = (_empty_like_pool(pool, (d.L, d.B, d.H, S, d.D)),
                   _empty_like_pool(pool, (d.L, d.B, d.H, S, d.D)),
                   np.empty((d.B, S), np.int32))
        past_k, past_v, past_lag = out
        ix = [_ptr(_launch_index(a)) for a in (kv_indptr, kv_indices, page_lag, page_valid)]
        i = ctypes.c_int
        rc = self.lib.et_host_gather(i(DTYPE_CODES[d.dtype]), _ptr(pool), i(d.num_pages), i(d.L),
                                     i(d.H), i(d.P), i(d.D), *ix, i(d.nnz), i(d.B),
                                     i(d.n_slots), _ptr(past_k), _ptr(past_v), _ptr(past_lag))
        self._check(rc, "gather")
        return past_k, past_v, past_lag

    def paged_attention(self, q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                        lag_bias, scale, kv_scale=None, out=None, stream=None):
        d = validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                                     lag_bias, scale, kv_scale, out)
        _host_only(d, "HostKernels")
        qf = _q_f32(q)
        if out is None:
            out = (np.empty((d.B, d.H, d.Q, d.D), np.float32), np.empty((d.B, d.H, d.Q), np.float32))
        o, lse = out
        ix = [_ptr(_launch_index(a)) for a in (kv_indptr, kv_indices, page_lag, page_valid)]
        i = ctypes.c_int
        ks = _ptr(kv_scale) if kv_scale is not None else ctypes.c_void_p(None)
        rc = self.lib.et_host_paged_attention(
            i(DTYPE_CODES[d.dtype]), _ptr(qf), _ptr(pool), i(d.num_pages), i(d.L), i(d.H),
            i(d.P), i(d.D), i(int(layer)), *ix, i(d.nnz), _ptr(lag_bias), i(d.W), ks,
            ctypes.c_float(scale), i(d.B), i(d.Q), _ptr(o), _ptr(lse))
        self._check(rc, "paged_attention")
        return o, lse

    def close(self):
        """Nothing to release (the library stays loaded); for parity with CudaKernels."""


# ------------------------------------------------------------------ CUDA (driver API)

def is_available() -> tuple[bool, str]:
    """Can :class:`CudaKernels` run here? ``(True, "")`` or ``(False, why not)``."""
    try:
        from cuda.bindings import driver
    except ImportError as e:
        return False, f"cuda-python is not installed ({e}); pip install 'eartalk[cuda]'"
    try:
        err, = driver.cuInit(0)
    except Exception as e:  # cuda-python raises when libcuda.so (the driver) cannot be loaded
        return False, f"no NVIDIA driver: cuInit could not load libcuda ({type(e).__name__}: {e})"
    if err != driver.CUresult.CUDA_SUCCESS:
        return False, f"cuInit failed: {_err_name(driver, err)}"
    err, n = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or n == 0:
        return False, "the NVIDIA driver reports no CUDA device"
    return True, ""


def _err_name(driver, err) -> str:
    try:
        e2, name = driver.cuGetErrorName(err)
        return name.decode() if e2 == driver.CUresult.CUDA_SUCCESS else str(err)
    except Exception:
        return str(err)


def _nvrtc_check(nvrtc, res, prog=None, what="nvrtc"):
    if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise RuntimeError(f"{what} failed: {res}\n{log}")


def compile_ptx(arch: int = 86, debug: bool = False) -> bytes:
    """Compile ``kv_cache.cu`` to PTX for ``compute_<arch>`` with NVRTC (no GPU, no nvcc needed).

    ``arch`` is the compute capability as an int (86 = 8.6). fp8 kernels keep their bodies only
    for arch >= 89, exactly as in the nvcc build.
    """
    from cuda.bindings import nvrtc
    if not isinstance(arch, int) or arch < 75:
        raise ValueError(f"arch must be an int compute capability >= 75 (e.g. 86), got {arch!r}")
    src = kernels_cu.read_source(kernels_cu.KERNEL_SOURCE).encode()
    names = [h.encode() for h in kernels_cu.HEADERS]
    bodies = [kernels_cu.read_source(h).encode() for h in kernels_cu.HEADERS]
    res, prog = nvrtc.nvrtcCreateProgram(src, b"kv_cache.cu", len(names), bodies, names)
    _nvrtc_check(nvrtc, res, what="nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17"]
        if debug:
            opts.append(b"-DET_DEBUG")
        res, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _nvrtc_check(nvrtc, res, prog, what=f"NVRTC compile of kv_cache.cu for compute_{arch}")
        res, n = nvrtc.nvrtcGetPTXSize(prog)
        _nvrtc_check(nvrtc, res, prog, "nvrtcGetPTXSize")
        ptx = b" " * n
        res, = nvrtc.nvrtcGetPTX(prog, ptx)
        _nvrtc_check(nvrtc, res, prog, "nvrtcGetPTX")
        return ptx
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def find_fatbin() -> Path | None:
    """The CMake-built fatbin: ``$EARTALK_KERNELS_FATBIN`` or ``<repo>/build/eartalk_kernels.fatbin``."""
    env = os.environ.get("EARTALK_KERNELS_FATBIN")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ValueError(f"EARTALK_KERNELS_FATBIN={env} is not a file")
        return p
    p = kernels_cu.SOURCE_DIR.parent / "build" / "eartalk_kernels.fatbin"
    return p if p.is_file() else None


_ATTN_DT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}


class CudaKernels:
    """The CUDA kernels via the driver API.

    Each op takes host or device arrays, decided by the pool (see the module docstring):

    - host pool: uploaded, launched, downloaded and synchronised in the call (a round trip);
    - device pool (torch CUDA tensor or :class:`DeviceArray`): launched on the caller's buffers
      with no copy of K/V, on ``stream`` (default: torch's current stream if any argument is a
      torch tensor, so the launch is ordered after the torch ops that produced the inputs; else
      this object's stream), and the call returns without synchronising. Outputs of ``gather``
      and ``paged_attention`` are written into ``out=`` or, for a torch pool, into new tensors
      on the pool's device.

    ``device``: CUDA ordinal. ``context``: an existing context to use instead of the device's
    primary one (an int ``CUcontext``, a cuda-python ``CUcontext`` or a pycuda ``Context``, via
    ``.handle``); torch allocates in the primary context, so keep the default with torch tensors.
    ``stream``: the default stream for launches (int, ``CUstream``, pycuda ``Stream`` or torch
    ``cuda.Stream``); any op also takes ``stream=`` per call. The context is pushed around every
    driver call and popped after, so a caller's current context (pycuda's) is left as it was.
    """

    def __init__(self, device: int = 0, context=None, stream=None, module: str = "auto"):
        ok, why = is_available()
        if not ok:
            raise RuntimeError(f"CUDA kernels unavailable: {why}")
        if not isinstance(device, (int, np.integer)) or device < 0:
            raise ValueError(f"device must be a CUDA ordinal (int >= 0), got {device!r}")
        from cuda.bindings import driver
        self.drv = driver
        self.ordinal = int(device)
        self.device = self._ck(driver.cuDeviceGet(self.ordinal), "cuDeviceGet")
        self._own_ctx = context is None
        if context is None:
            self.ctx = self._ck(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        else:
            self.ctx = driver.CUcontext(context_handle(context))
        A = driver.CUdevice_attribute
        self.cc = (self._ck(driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "cc"),
                   self._ck(driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "cc"))
        self._own_stream = stream is None
        self.module = self.stream = None
        self._fns: dict[str, object] = {}
        try:
            with self._current():   # the stream and module belong to self.ctx, whatever was current
                if stream is None:
                    self.stream = self._ck(driver.cuStreamCreate(0), "cuStreamCreate")
                else:
                    self.stream = driver.CUstream(stream_handle(stream))
                image, self.module_source = self._module_image(module)
                self.module = self._ck(driver.cuModuleLoadData(image),
                                       f"cuModuleLoadData({self.module_source})")
        except BaseException:
            self.close()            # release the retained primary context and the stream
            raise

    # -- plumbing
    def _ck(self, ret, what):
        err, *vals = ret if isinstance(ret, tuple) else (ret,)
        if err != self.drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed: {_err_name(self.drv, err)}")
        return vals[0] if len(vals) == 1 else (tuple(vals) if vals else None)

    @contextlib.contextmanager
    def _current(self):
        """Make self.ctx current for the calls inside, then restore the caller's context."""
        self._ck(self.drv.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.drv.cuCtxPopCurrent()

    def _module_image(self, module: str):
        if module not in ("auto", "fatbin", "nvrtc"):
            raise ValueError(f"module must be 'auto', 'fatbin' or 'nvrtc', got {module!r}")
        fat = find_fatbin() if module in ("auto", "fatbin") else None
        if fat is not None:
            return fat.read_bytes(), str(fat)
        if module == "fatbin":
            raise RuntimeError("no fatbin: run `make build-kernels` or set EARTALK_KERNELS_FATBIN")
        from cuda.bindings import nvrtc
        _, archs = nvrtc.nvrtcGetSupportedArchs()
        arch = self.cc[0] * 10 + self.cc[1]
        usable = [a for a in archs if a <= arch]
        if not usable:
            raise UnsupportedDeviceError(f"NVRTC supports no arch <= sm_{arch} (supports {archs})")
        return compile_ptx(max(usable)), f"NVRTC PTX compute_{max(usable)}"

    def _fn(self, name):
        if name not in self._fns:
            self._fns[name] = self._ck(self.drv.cuModuleGetFunction(self.module, name.encode()),
                                       f"cuModuleGetFunction({name})")
        return self._fns[name]

    def _alloc(self, nbytes):
        return self._ck(self.drv.cuMemAlloc(max(1, nbytes)), "cuMemAlloc")

    def _upload(self, a, bufs, stream):
        raw = np.ascontiguousarray(_raw(a))
        ptr = self._alloc(raw.nbytes)
        bufs.append(ptr)
        if raw.nbytes:
            # pageable source: the call returns once the bytes are staged, so `raw` may go
            self._ck(self.drv.cuMemcpyHtoDAsync(ptr, raw.ctypes.data, raw.nbytes, stream), "cuMemcpyHtoD")
        return ptr

    def _download(self, ptr, a, stream):
        raw = _raw(a)
        if raw.nbytes:
            self._ck(self.drv.cuMemcpyDtoHAsync(raw.ctypes.data, ptr, raw.nbytes, stream), "cuMemcpyDtoH")

    def _launch(self, name, grid, block, args, stream):
        vals = tuple(a[0] for a in args)
        types = tuple(a[1] for a in args)
        self._ck(self.drv.cuLaunchKernel(self._fn(name), *grid, *block, 0, stream,
                                         (vals, types), 0), f"cuLaunchKernel({name})")

    def _sync_free(self, bufs, stream):
        """Wait for the stream, then free temporaries (they must outlive the kernels reading them)."""
        try:
            self._ck(self.drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
        finally:
            for p in bufs:
                self.drv.cuMemFree(p)

    @staticmethod
    def _sfx(dtype):
        return {4: "b4", 2: "b2", 1: "b1"}[DTYPE_BYTES[dtype]]

    # -- device path helpers
    def _stream_for(self, stream, arrays):
        """The launch stream: the caller's, else torch's current one if torch tensors are
        involved (orders the kernel after the torch ops that wrote its inputs), else ours."""
        if stream is not None:
            return self.drv.CUstream(stream_handle(stream))
        for a in arrays:
            if _is_torch(a) and a.device.type == "cuda":
                import torch
                return self.drv.CUstream(torch.cuda.current_stream(a.device).cuda_stream)
        return self.stream

    def _device_ptr(self, name: str, a) -> int:
        """The address of a device array, after checking it is usable by these kernels."""
        if _is_torch(a):
            if a.device.index != self.ordinal:
                raise ValueError(f"{name} is on {a.device} but these kernels run on cuda:{self.ordinal}")
            return int(a.data_ptr())
        if a.device is not None and a.device != self.ordinal:
            raise ValueError(f"{name} is a DeviceArray of device {a.device} but these kernels run "
                             f"on device {self.ordinal}")
        if a.nbytes == 0:
            return a.ptr
        # A raw pointer is only a number: ask the driver that the whole [ptr, ptr + nbytes) is
        # one allocation, so a host pointer or a short buffer is refused instead of faulting.
        err, base, size = self.drv.cuMemGetAddressRange(a.ptr)
        if err != self.drv.CUresult.CUDA_SUCCESS:
            raise ValueError(f"{name}: {a.ptr:#x} is not an address the CUDA driver allocated "
                             f"({_err_name(self.drv, err)}): a host pointer, or freed memory?")
        if a.ptr + a.nbytes > int(base) + int(size):
            raise ValueError(f"{name}: {a.nbytes} bytes for shape {list(a.shape)} {a.dtype} from "
                             f"{a.ptr:#x} overrun its allocation ({int(size)} bytes from "
                             f"{int(base):#x})")
        A = self.drv.CUpointer_attribute
        err, ctx = self.drv.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_CONTEXT, a.ptr)
        if err == self.drv.CUresult.CUDA_SUCCESS and int(ctx) not in (0, int(self.ctx)):
            raise ValueError(f"{name} was allocated in another CUDA context than these kernels "
                             f"use; pass that context as CudaKernels(context=...)")
        return a.ptr

    def _index_ptr(self, name: str, a, stream, tmp) -> int:
        """Device address of a validated index argument; a host array is uploaded into ``tmp``."""
        if isinstance(a, Mirrored):
            return self._device_ptr(f"{name}.device", a.device)
        return int(self._upload(a, tmp, stream))

    def _finish(self, tmp, stream):
        # Temporaries exist only for host index arrays: free them once the kernel has read them.
        # Without them the launch stays asynchronous, like any op on the stream.
        if tmp:
            self._sync_free(tmp, stream)

    @staticmethod
    def _new_device_outputs(pool, specs, stream_h):
        """torch outputs on the pool's device; None for a DeviceArray pool (out= is required)."""
        if not _is_torch(pool):
            return None
        import torch
        outs = tuple(_empty_like_pool(pool, shape, dtype) for shape, dtype in specs)
        cur = torch.cuda.current_stream(pool.device)
        if stream_h != cur.cuda_stream:
            # allocated for torch's current stream but written on another: tell the caching
            # allocator, or it could hand the memory out again while the kernel still writes
            ext = torch.cuda.ExternalStream(stream_h, device=pool.device)
            for t in outs:
                t.record_stream(ext)
        return outs

    def _check_fp8(self, d: Dims):
        if d.dtype == "float8_e4m3fn" and self.cc < FP8_MIN_CC:
            raise UnsupportedDeviceError(
                f"pool dtype float8_e4m3fn needs compute capability >= 8.9; this device is "
                f"{self.cc[0]}.{self.cc[1]} (no silent fallback: dequantise the pool first)")

    # -- ops
    def append(self, pool, pages, new_k, new_v, stream=None) -> None:
        """``pool[pages[b], :, 0/1] = new_k/new_v[:, b]``, in place wherever the pool lives."""
        d = validate_append(pool, pages, new_k, new_v)
        P_, I = ctypes.c_void_p, ctypes.c_int
        s = self._stream_for(stream, (pool, new_k, new_v, _launch_index(pages)))
        name = f"et_append_{self._sfx(d.dtype)}"
        g = copy_grid(d.L * d.B * d.H * d.P * d.D)
        with self._current():
            bufs = []
            if d.place == "device":
                try:
                    dp, dk, dv = (self._device_ptr(n, a) for n, a in
                                  (("pool", pool), ("new_k", new_k), ("new_v", new_v)))
                    dg = self._index_ptr("pages", pages, s, bufs)
                    self._launch(name, (g, 1, 1), (COPY_THREADS, 1, 1),
                                 [(dp, P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I),
                                  (d.D, I), (dg, P_), (d.B, I), (dk, P_), (dv, P_)], s)
                finally:
                    self._finish(bufs, s)
                return
            try:
                dp, dg, dk, dv = (self._upload(a, bufs, s) for a in
                                  (pool, _launch_index(pages), new_k, new_v))
                self._launch(name, (g, 1, 1), (COPY_THREADS, 1, 1),
                             [(int(dp), P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I),
                              (d.D, I), (int(dg), P_), (d.B, I), (int(dk), P_), (int(dv), P_)], s)
                self._download(dp, pool, s)
            finally:
                self._sync_free(bufs, s)

    def gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out=None,
               stream=None):
        """Dense ``past_k, past_v [L,B,H,S,D]`` and ``past_lag int32 [B,S]`` (into ``out`` if given)."""
        d = validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots, out)
        S = d.n_slots * d.P
        index = (kv_indptr, kv_indices, page_lag, page_valid)
        kv_shape = (d.L, d.B, d.H, S, d.D)
        s = self._stream_for(stream, (pool, *(out or ()), *map(_launch_index, index)))
        name = f"et_gather_{self._sfx(d.dtype)}"
        g = copy_grid(max(d.L * d.B * d.H * S * d.D, d.B * S))
        P_, I = ctypes.c_void_p, ctypes.c_int

        def args(dp, ix, outs):
            return [(dp, P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I), (d.D, I),
                    *((p, P_) for p in ix), (d.B, I), (d.n_slots, I), *((p, P_) for p in outs)]

        with self._current():
            bufs = []
            if d.place == "device":
                if out is None:
                    out = self._new_device_outputs(pool, [(kv_shape, None), (kv_shape, None),
                                                          ((d.B, S), "int32")], int(s))
                    if out is None:
                        raise ValueError("out=(past_k, past_v, past_lag) device buffers are "
                                         "required with a DeviceArray pool")
                try:
                    dp = self._device_ptr("pool", pool)
                    outs = [self._device_ptr(n, a) for n, a in
                            zip(("past_k", "past_v", "past_lag"), out)]
                    ix = [self._index_ptr(n, a, s, bufs) for n, a in
                          zip(("kv_indptr", "kv_indices", "page_lag", "page_valid"), index)]
                    self._launch(name, (g, 1, 1), (COPY_THREADS, 1, 1), args(dp, ix, outs), s)
                finally:
                    self._finish(bufs, s)
                return tuple(out)
            if out is None:
                out = (_empty_like_pool(pool, kv_shape), _empty_like_pool(pool, kv_shape),
                       np.empty((d.B, S), np.int32))
            try:
                dp = int(self._upload(pool, bufs, s))
                ix = [int(self._upload(_launch_index(a), bufs, s)) for a in index]
                outs = [int(self._upload(a, bufs, s)) for a in out]
                self._launch(name, (g, 1, 1), (COPY_THREADS, 1, 1), args(dp, ix, outs), s)
                for p, a in zip(outs, out):
                    self._download(p, a, s)
            finally:
                self._sync_free(bufs, s)
        return tuple(out)

    def paged_attention(self, q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                        lag_bias, scale, kv_scale=None, out=None, stream=None):
        """``(out float32 [B,H,Q,D], lse float32 [B,H,Q])`` of the queries over the paged K/V."""
        d = validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                                     lag_bias, scale, kv_scale, out)
        self._check_fp8(d)
        index = (kv_indptr, kv_indices, page_lag, page_valid)
        specs = [((d.B, d.H, d.Q, d.D), "float32"), ((d.B, d.H, d.Q), "float32")]
        s = self._stream_for(stream, (pool, q, lag_bias, *(out or ()), *map(_launch_index, index)))
        dmax = 64 if d.D <= 64 else 128
        qblk = ATTN_QBLK[dmax]
        name = f"et_attn_{_ATTN_DT[d.dtype]}_d{dmax}"
        P_, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

        def args(dq, dp, ix, dlb, ks, do, dl):
            return [(dq, P_), (dp, P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I), (d.D, I),
                    (int(layer), I), *((p, P_) for p in ix), (dlb, P_), (d.W, I), (ks, P_),
                    (float(scale), F), (d.B, I), (d.Q, I), (do, P_), (dl, P_)]

        grid, block = (-(-d.Q // qblk), d.H, d.B), (qblk, 1, 1)
        with self._current():
            bufs = []
            if d.place == "device":
                if out is None:
                    out = self._new_device_outputs(pool, specs, int(s))
                    if out is None:
                        raise ValueError("out=(out, lse) device buffers are required with a "
                                         "DeviceArray pool")
                if d.B == 0 or d.Q == 0:
                    return tuple(out)     # empty outputs: nothing to launch
                try:
                    dq, dp, dlb = (self._device_ptr(n, a) for n, a in
                                   (("q", q), ("pool", pool), ("lag_bias", lag_bias)))
                    ks = self._device_ptr("kv_scale", kv_scale) if kv_scale is not None else 0
                    do, dl = (self._device_ptr(n, a) for n, a in zip(("out", "lse"), out))
                    ix = [self._index_ptr(n, a, s, bufs) for n, a in
                          zip(("kv_indptr", "kv_indices", "page_lag", "page_valid"), index)]
                    self._launch(name, grid, block, args(dq, dp, ix, dlb, ks, do, dl), s)
                finally:
                    self._finish(bufs, s)
                return tuple(out)
            if out is None:
                out = (np.zeros(specs[0][0], np.float32), np.full(specs[1][0], -np.inf, np.float32))
            if d.B == 0 or d.Q == 0:
                return tuple(out)
            try:
                dq = int(self._upload(_q_f32(q), bufs, s))
                dp, dlb = (int(self._upload(a, bufs, s)) for a in (pool, lag_bias))
                ix = [int(self._upload(_launch_index(a), bufs, s)) for a in index]
                ks = int(self._upload(kv_scale, bufs, s)) if kv_scale is not None else 0
                do, dl = (int(self._upload(a, bufs, s)) for a in out)
                self._launch(name, grid, block, args(dq, dp, ix, dlb, ks, do, dl), s)
                for p, a in zip((do, dl), out):
                    self._download(p, a, s)
            finally:
                self._sync_free(bufs, s)
        return tuple(out)

    def synchronize(self, stream=None) -> None:
        """Wait for ``stream`` (default: this object's) to drain."""
        s = self.stream if stream is None else self.drv.CUstream(stream_handle(stream))
        with self._current():
            self._ck(self.drv.cuStreamSynchronize(s), "cuStreamSynchronize")

    def close(self):
        if getattr(self, "ctx", None) is None:
            return
        with self._current():
            if getattr(self, "module", None) is not None:
                self.drv.cuModuleUnload(self.module)
                self.module = None
            if self._own_stream and getattr(self, "stream", None) is not None:
                self.drv.cuStreamDestroy(self.stream)
                self.stream = None
        if self._own_ctx:
            self.drv.cuDevicePrimaryCtxRelease(self.device)
        self.ctx = None
