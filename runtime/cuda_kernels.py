"""Drive the hand-written paged KV cache kernels (``kernels_cu/``) from Python.

Two executors share one validated entry point per op:

- :class:`CudaKernels`: the CUDA kernels through cuda-python's driver API
  (``cuda.bindings.driver``): cuInit, the device's primary context (or a caller's context and
  stream), ``cuModuleLoadData`` of the fatbin CMake built (``build/eartalk_kernels.fatbin`` or
  ``$EARTALK_KERNELS_FATBIN``) or, failing that, of PTX compiled at first use by NVRTC from the
  packaged ``.cu`` sources, so a pip install works without nvcc; then ``cuLaunchKernel``.
- :class:`HostKernels`: ``libeartalk_kernels_host.so``, the same kernel bodies compiled by g++
  and run on the CPU by walking the grid (:func:`build_host_library` makes it). The tests compare
  it with ``runtime/kv_reference.py`` on every run; no GPU is needed.

Every argument is checked BEFORE a launch (:func:`validate_append`, :func:`validate_gather`,
:func:`validate_paged_attention`; pure numpy, testable on a CPU): a page id out of range, a CSR
``kv_indptr`` that is not monotone, a dtype or layout that does not match the pool -> ``ValueError``
naming the argument. A kernel that read out of range on a GPU would corrupt or crash the whole
process, so these checks are not optional.

Arrays are numpy arrays or torch CPU tensors (torch gives bf16 and float8_e4m3fn, numpy does not);
index arrays are int32 (the CSR contract: refuse int64 rather than narrow it silently).

``is_available()`` returns ``(ok, reason)``; on a machine without the NVIDIA driver, as in CI, the
reason says so.
"""
from __future__ import annotations

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
    "DTYPE_CODES", "FP8_MIN_CC", "Dims", "UnsupportedDeviceError", "is_available",
    "validate_append", "validate_gather", "validate_paged_attention", "compile_ptx",
    "find_fatbin", "build_host_library", "HostKernels", "CudaKernels",
]

# dtype codes of kv_cache.cuh (et::DType)
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float8_e4m3fn": 3}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
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


# ------------------------------------------------------------------ array helpers

def _dtype_name(a) -> str:
    # numpy: "float32"; torch: "torch.float32" -> "float32"
    return str(a.dtype).replace("torch.", "")


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _is_contiguous(a) -> bool:
    return bool(a.is_contiguous()) if _is_torch(a) else bool(a.flags.c_contiguous)


def _check_array(name: str, a, ndim: int | None = None):
    if not (isinstance(a, np.ndarray) or _is_torch(a)):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if _is_torch(a) and a.device.type != "cpu":
        raise ValueError(f"{name} must be a host (CPU) tensor, got device {a.device}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(a.shape)}")
    if not _is_contiguous(a):
        raise ValueError(f"{name} must be C-contiguous (the kernels index it densely)")


def _int32(name: str, a) -> np.ndarray:
    _check_array(name, a, 1)
    if _dtype_name(a) != "int32":
        raise ValueError(f"{name} must be int32, got {_dtype_name(a)}")
    return a.numpy() if _is_torch(a) else a


def _raw(a) -> np.ndarray:
    """The array's storage as a numpy array of unsigned words of the same width (zero copy)."""
    if _is_torch(a):
        import torch
        view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
        return a.view(view).numpy()
    return a


def _check_pool(pool) -> tuple[str, int, int, int, int, int]:
    _check_array("pool", pool, 6)
    if pool.shape[2] != 2:
        raise ValueError(f"pool must have layout [num_pages, L, 2, H, P, D] (HND, 0=K 1=V), got "
                         f"shape {tuple(pool.shape)}")
    dt = _dtype_name(pool)
    if dt not in DTYPE_CODES:
        raise ValueError(f"pool dtype must be one of {sorted(DTYPE_CODES)}, got {dt}")
    num_pages, L, _, H, P, D = (int(x) for x in pool.shape)
    if min(num_pages, L, H, P, D) < 1:
        raise ValueError(f"pool has an empty dimension: shape {tuple(pool.shape)}")
    return dt, num_pages, L, H, P, D


def _check_csr(num_pages: int, P: int, kv_indptr, kv_indices, page_lag, page_valid):
    indptr = _int32("kv_indptr", kv_indptr)
    indices = _int32("kv_indices", kv_indices)
    lag = _int32("page_lag", page_lag)
    valid = _int32("page_valid", page_valid)
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


# ------------------------------------------------------------------ validation (CPU-testable)

def validate_append(pool, pages, new_k, new_v) -> Dims:
    """Check an append call; return its sizes or raise ``ValueError`` naming the argument."""
    dt, num_pages, L, H, P, D = _check_pool(pool)
    pg = _int32("pages", pages)
    B = pg.shape[0]
    want = (L, B, H, P, D)
    for name, a in (("new_k", new_k), ("new_v", new_v)):
        _check_array(name, a, 5)
        if tuple(int(x) for x in a.shape) != want:
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
    return Dims(dt, num_pages, L, H, P, D, B)


def validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots) -> Dims:
    dt, num_pages, L, H, P, D = _check_pool(pool)
    indptr, _, _, _, B, nnz = _check_csr(num_pages, P, kv_indptr, kv_indices, page_lag, page_valid)
    if not isinstance(n_slots, (int, np.integer)) or n_slots < 0:
        raise ValueError(f"n_slots must be an int >= 0 (pages per session), got {n_slots!r}")
    n_slots = int(n_slots)
    if n_slots * P > INT32_MAX:
        raise ValueError(f"n_slots*P = {n_slots * P} slots does not fit the kernels' int32 index")
    counts = np.diff(indptr)
    if B and counts.max() > n_slots:
        b = int(np.argmax(counts))
        raise ValueError(f"kv_indptr: session {b} has {int(counts[b])} pages but n_slots={n_slots}")
    return Dims(dt, num_pages, L, H, P, D, B, nnz=nnz, n_slots=n_slots)


def validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                             lag_bias, scale, kv_scale=None) -> Dims:
    dt, num_pages, L, H, P, D = _check_pool(pool)
    _, _, lag, valid, B, nnz = _check_csr(num_pages, P, kv_indptr, kv_indices, page_lag,
                                          page_valid)
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < L:
        raise ValueError(f"layer must be an int in [0, L={L}), got {layer!r}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"pool head dim D={D} > {MAX_HEAD_DIM}: no kernel instance")
    _check_array("q", q, 4)
    if int(q.shape[0]) != B or int(q.shape[1]) != H or int(q.shape[3]) != D:
        raise ValueError(f"q must have shape [B={B}, H={H}, Q, D={D}], got {list(q.shape)}")
    if _dtype_name(q) not in ("float32", "float16"):
        raise ValueError(f"q dtype must be float32 or float16, got {_dtype_name(q)}")
    _check_array("lag_bias", lag_bias, 2)
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
        _check_array("kv_scale", kv_scale, 3)
        if _dtype_name(kv_scale) != "float32" or tuple(int(x) for x in kv_scale.shape) != (num_pages, L, 2):
            raise ValueError(f"kv_scale must be float32 [num_pages={num_pages}, L={L}, 2], got "
                             f"{_dtype_name(kv_scale)} {list(kv_scale.shape)}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale is only for fp8 pools; pool dtype is {dt}")
    if B > GRID_YZ_MAX or H > GRID_YZ_MAX:
        raise ValueError(f"B={B} and H={H} must be <= {GRID_YZ_MAX} (grid y/z limit)")
    return Dims(dt, num_pages, L, H, P, D, B, nnz=nnz, Q=int(q.shape[2]), W=W)


def _q_f32(q) -> np.ndarray:
    """q as contiguous float32 numpy (fp16 -> fp32 is exact)."""
    a = q.numpy() if _is_torch(q) else q
    return np.ascontiguousarray(a, dtype=np.float32)


def _empty_like_pool(pool, shape):
    if _is_torch(pool):
        import torch
        return torch.empty(shape, dtype=pool.dtype)
    return np.empty(shape, dtype=pool.dtype)


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


class HostKernels:
    """The kernels' host build through ctypes (CPU; for tests and CPU timing, not a GPU figure)."""

    def __init__(self, lib_path: str | os.PathLike | None = None):
        self.path = Path(lib_path) if lib_path else build_host_library()
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.et_host_last_error.restype = ctypes.c_char_p

    def _check(self, rc: int, op: str):
        if rc != 0:
            msg = self.lib.et_host_last_error().decode()
            raise ValueError(f"{op}: {msg} (code {rc})")

    def append(self, pool, pages, new_k, new_v) -> None:
        d = validate_append(pool, pages, new_k, new_v)
        i = ctypes.c_int
        rc = self.lib.et_host_append(i(DTYPE_CODES[d.dtype]), _ptr(pool), i(d.num_pages), i(d.L),
                                     i(d.H), i(d.P), i(d.D), _ptr(pages), i(d.B), _ptr(new_k),
                                     _ptr(new_v))
        self._check(rc, "append")

    def gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots):
        d = validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots)
        S = d.n_slots * d.P
        past_k = _empty_like_pool(pool, (d.L, d.B, d.H, S, d.D))
        past_v = _empty_like_pool(pool, (d.L, d.B, d.H, S, d.D))
        past_lag = np.empty((d.B, S), np.int32)
        i = ctypes.c_int
        rc = self.lib.et_host_gather(i(DTYPE_CODES[d.dtype]), _ptr(pool), i(d.num_pages), i(d.L),
                                     i(d.H), i(d.P), i(d.D), _ptr(kv_indptr), _ptr(kv_indices),
                                     _ptr(page_lag), _ptr(page_valid), i(d.nnz), i(d.B),
                                     i(d.n_slots), _ptr(past_k), _ptr(past_v), _ptr(past_lag))
        self._check(rc, "gather")
        return past_k, past_v, past_lag

    def paged_attention(self, q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                        lag_bias, scale, kv_scale=None):
        d = validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                                     lag_bias, scale, kv_scale)
        qf = _q_f32(q)
        out = np.empty((d.B, d.H, d.Q, d.D), np.float32)
        lse = np.empty((d.B, d.H, d.Q), np.float32)
        i = ctypes.c_int
        ks = _ptr(kv_scale) if kv_scale is not None else ctypes.c_void_p(None)
        rc = self.lib.et_host_paged_attention(
            i(DTYPE_CODES[d.dtype]), _ptr(qf), _ptr(pool), i(d.num_pages), i(d.L), i(d.H),
            i(d.P), i(d.D), i(int(layer)), _ptr(kv_indptr), _ptr(kv_indices), _ptr(page_lag),
            _ptr(page_valid), i(d.nnz), _ptr(lag_bias), i(d.W), ks, ctypes.c_float(scale),
            i(d.B), i(d.Q), _ptr(out), _ptr(lse))
        self._check(rc, "paged_attention")
        return out, lse


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


class CudaKernels:
    """The CUDA kernels via the driver API. Host arrays in, host arrays out (copies each call);
    the ``*_device`` hooks for device-resident pools are a known gap (see docs).

    ``context``: an existing ``CUcontext`` (e.g. from pycuda: ``int(ctx.handle)``) to use instead
    of the device's primary context; ``stream``: an existing ``CUstream`` handle (int) to launch on.
    """

    def __init__(self, device: int = 0, context=None, stream=None, module: str = "auto"):
        ok, why = is_available()
        if not ok:
            raise RuntimeError(f"CUDA kernels unavailable: {why}")
        from cuda.bindings import driver
        self.drv = driver
        self.device = self._ck(driver.cuDeviceGet(device), "cuDeviceGet")
        self._own_ctx = context is None
        if context is None:
            self.ctx = self._ck(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        else:
            self.ctx = context if isinstance(context, driver.CUcontext) else driver.CUcontext(int(context))
        self._ck(driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        A = driver.CUdevice_attribute
        self.cc = (self._ck(driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "cc"),
                   self._ck(driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "cc"))
        self._own_stream = stream is None
        if stream is None:
            self.stream = self._ck(driver.cuStreamCreate(0), "cuStreamCreate")
        else:
            self.stream = stream if isinstance(stream, driver.CUstream) else driver.CUstream(int(stream))
        image, self.module_source = self._module_image(module)
        self.module = self._ck(driver.cuModuleLoadData(image), f"cuModuleLoadData({self.module_source})")
        self._fns: dict[str, object] = {}

    # -- plumbing
    def _ck(self, ret, what):
        err, *vals = ret if isinstance(ret, tuple) else (ret,)
        if err != self.drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed: {_err_name(self.drv, err)}")
        return vals[0] if len(vals) == 1 else (tuple(vals) if vals else None)

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

    def _upload(self, a, bufs):
        raw = np.ascontiguousarray(_raw(a))
        ptr = self._alloc(raw.nbytes)
        bufs.append(ptr)
        if raw.nbytes:
            self._ck(self.drv.cuMemcpyHtoDAsync(ptr, raw.ctypes.data, raw.nbytes, self.stream), "cuMemcpyHtoD")
        return ptr

    def _download(self, ptr, a):
        raw = _raw(a)
        if raw.nbytes:
            self._ck(self.drv.cuMemcpyDtoHAsync(raw.ctypes.data, ptr, raw.nbytes, self.stream), "cuMemcpyDtoH")

    def _launch(self, name, grid, block, args):
        vals = tuple(a[0] for a in args)
        types = tuple(a[1] for a in args)
        self._ck(self.drv.cuLaunchKernel(self._fn(name), *grid, *block, 0, self.stream,
                                         (vals, types), 0), f"cuLaunchKernel({name})")

    def _sync_free(self, bufs):
        try:
            self._ck(self.drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        finally:
            for p in bufs:
                self.drv.cuMemFree(p)

    @staticmethod
    def _sfx(dtype):
        return {4: "b4", 2: "b2", 1: "b1"}[DTYPE_BYTES[dtype]]

    # -- ops
    def append(self, pool, pages, new_k, new_v) -> None:
        """In place on the host ``pool`` (uploaded, appended on the GPU, downloaded)."""
        d = validate_append(pool, pages, new_k, new_v)
        bufs = []
        P_, I = ctypes.c_void_p, ctypes.c_int
        try:
            dp, dg, dk, dv = (self._upload(a, bufs) for a in (pool, pages, new_k, new_v))
            g = copy_grid(d.L * d.B * d.H * d.P * d.D)
            self._launch(f"et_append_{self._sfx(d.dtype)}", (g, 1, 1), (COPY_THREADS, 1, 1),
                         [(int(dp), P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I), (d.D, I),
                          (int(dg), P_), (d.B, I), (int(dk), P_), (int(dv), P_)])
            self._download(dp, pool)
        finally:
            self._sync_free(bufs)

    def gather(self, pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots):
        d = validate_gather(pool, kv_indptr, kv_indices, page_lag, page_valid, n_slots)
        S = d.n_slots * d.P
        past_k = _empty_like_pool(pool, (d.L, d.B, d.H, S, d.D))
        past_v = _empty_like_pool(pool, (d.L, d.B, d.H, S, d.D))
        past_lag = np.empty((d.B, S), np.int32)
        bufs = []
        P_, I = ctypes.c_void_p, ctypes.c_int
        try:
            ins = [self._upload(a, bufs) for a in (pool, kv_indptr, kv_indices, page_lag, page_valid)]
            outs = [self._upload(a, bufs) for a in (past_k, past_v, past_lag)]
            g = copy_grid(max(d.L * d.B * d.H * S * d.D, d.B * S))
            self._launch(f"et_gather_{self._sfx(d.dtype)}", (g, 1, 1), (COPY_THREADS, 1, 1),
                         [(int(ins[0]), P_), (d.num_pages, I), (d.L, I), (d.H, I), (d.P, I),
                          (d.D, I), (int(ins[1]), P_), (int(ins[2]), P_), (int(ins[3]), P_),
                          (int(ins[4]), P_), (d.B, I), (d.n_slots, I), (int(outs[0]), P_),
                          (int(outs[1]), P_), (int(outs[2]), P_)])
            for p, a in zip(outs, (past_k, past_v, past_lag)):
                self._download(p, a)
        finally:
            self._sync_free(bufs)
        return past_k, past_v, past_lag

    def paged_attention(self, q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                        lag_bias, scale, kv_scale=None):
        d = validate_paged_attention(q, pool, layer, kv_indptr, kv_indices, page_lag, page_valid,
                                     lag_bias, scale, kv_scale)
        if d.dtype == "float8_e4m3fn" and self.cc < FP8_MIN_CC:
            raise UnsupportedDeviceError(
                f"pool dtype float8_e4m3fn needs compute capability >= 8.9; this device is "
                f"{self.cc[0]}.{self.cc[1]} (no silent fallback: dequantise the pool first)")
        out = np.zeros((d.B, d.H, d.Q, d.D), np.float32)
        lse = np.full((d.B, d.H, d.Q), -np.inf, np.float32)
        if d.B == 0 or d.Q == 0:
            return out, lse
        dmax = 64 if d.D <= 64 else 128
        qblk = ATTN_QBLK[dmax]
        name = f"et_attn_{ {'float32': 'f32', 'float16': 'f16', 'bfloat16': 'bf16', 'float8_e4m3fn': 'fp8'}[d.dtype]}_d{dmax}"
        bufs = []
        P_, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        try:
            dq = self._upload(_q_f32(q), bufs)
            ins = [self._upload(a, bufs) for a in (pool, kv_indptr, kv_indices, page_lag, page_valid, lag_bias)]
            ks = int(self._upload(kv_scale, bufs)) if kv_scale is not None else 0
            dout, dlse = self._upload(out, bufs), self._upload(lse, bufs)
            self._launch(name, (-(-d.Q // qblk), d.H, d.B), (qblk, 1, 1),
                         [(int(dq), P_), (int(ins[0]), P_), (d.num_pages, I), (d.L, I), (d.H, I),
                          (d.P, I), (d.D, I), (int(layer), I), (int(ins[1]), P_), (int(ins[2]), P_),
                          (int(ins[3]), P_), (int(ins[4]), P_), (int(ins[5]), P_), (d.W, I),
                          (ks, P_), (float(scale), F), (d.B, I), (d.Q, I), (int(dout), P_),
                          (int(dlse), P_)])
            self._download(dout, out)
            self._download(dlse, lse)
        finally:
            self._sync_free(bufs)
        return out, lse

    def close(self):
        if getattr(self, "module", None) is not None:
            self.drv.cuModuleUnload(self.module)
            self.module = None
        if self._own_stream and getattr(self, "stream", None) is not None:
            self.drv.cuStreamDestroy(self.stream)
            self.stream = None
        if self._own_ctx and getattr(self, "ctx", None) is not None:
            self.drv.cuDevicePrimaryCtxRelease(self.device)
            self.ctx = None
