"""Hand-written CUDA paged KV cache kernels (installed as ``eartalk.kernels_cu``).

The C++/CUDA sources ship as package data so that ``runtime/cuda_kernels.py`` can compile them with
NVRTC at first use (a pip install needs no nvcc), and so that the host build used by the tests is
made from the very same text:

- ``kv_cache.cuh``      kernel bodies as ``__host__ __device__`` functions (append, gather, paged
                        attention phases); no CUDA headers, so g++ compiles it too
- ``kv_cache.cu``       thin extern "C" ``__global__`` wrappers + runtime-API launchers
- ``kv_cache_host.cpp`` the host launcher: walks the grid on the CPU, validates arguments
- ``kv_cache_api.h``    the C API of both shared libraries

The CMake build at the repository root makes ``libeartalk_kernels.so``,
``libeartalk_kernels_host.so`` and ``eartalk_kernels.fatbin`` from these files.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
KERNEL_SOURCE = "kv_cache.cu"
HEADERS = ("kv_cache.cuh", "kv_cache_api.h")
HOST_SOURCE = "kv_cache_host.cpp"

__all__ = ["SOURCE_DIR", "KERNEL_SOURCE", "HEADERS", "HOST_SOURCE", "source_path", "read_source",
           "sources_digest"]


def source_path(name: str) -> Path:
    """Absolute path of one packaged source file; ``ValueError`` if it is not one of ours."""
    known = (KERNEL_SOURCE, HOST_SOURCE) + HEADERS
    if name not in known:
        raise ValueError(f"unknown kernel source {name!r}; expected one of {list(known)}")
    path = SOURCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} is missing from the installed package")
    return path


def read_source(name: str) -> str:
    return source_path(name).read_text()


def sources_digest() -> str:
    """SHA-256 over every source file: the cache key for compiled artifacts."""
    h = hashlib.sha256()
    for name in (KERNEL_SOURCE, HOST_SOURCE) + HEADERS:
        h.update(name.encode())
        h.update(source_path(name).read_bytes())
    return h.hexdigest()
