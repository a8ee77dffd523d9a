"""The kernels build for every target GPU without register spills, and NVRTC can compile them.

No GPU is needed: nvcc/ptxas and NVRTC only compile. The CMake build (the one `make
build-kernels` runs) is done once per source hash into a cached dir under the temp dir, so a
re-run of the suite with unchanged kernels costs nothing; it compiles each arch exactly once.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from eartalk import kernels_cu
from eartalk.runtime import cuda_kernels as ck

REPO = Path(__file__).resolve().parents[1]
ARCHS = (86, 87, 89, 90, 120)
KERNELS = {f"et_{op}_{w}" for op in ("append", "gather") for w in ("b4", "b2", "b1")} | {
    f"et_attn_{dt}_d{d}" for dt in ("f32", "f16", "bf16", "fp8") for d in (64, 128)}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="nvcc and cmake are needed to build the CUDA kernels")


def _key() -> str:
    h = hashlib.sha256(kernels_cu.sources_digest().encode())
    h.update((REPO / "CMakeLists.txt").read_bytes())
    return h.hexdigest()[:16]


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """ptxas --resource-usage log -> {function: {spill_stores, spill_loads, registers}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current]["spill_stores"] = int(m.group(1))
            out[current]["spill_loads"] = int(m.group(2))
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out.setdefault(current, {})["registers"] = int(m.group(1))
    return out


@pytest.fixture(scope="module")
def cmake_build() -> Path:
    """`cmake -S . -B <cache> && cmake --build <cache> -j2`, once per source hash."""
    build = Path(tempfile.gettempdir()) / "eartalk_kernels_cmake" / _key()
    stamp = build / "eartalk_build_seconds.txt"
    if not stamp.exists():
        shutil.rmtree(build, ignore_errors=True)
        t0 = time.monotonic()
        for cmd in (["cmake", "-S", str(REPO), "-B", str(build)],
                    ["cmake", "--build", str(build), "-j2"]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
        stamp.write_text(f"{time.monotonic() - t0:.1f}\n")
    return build


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_compiles_without_spills(cmake_build, arch):
    log = cmake_build / f"resource_usage_sm_{arch}.txt"
    usage = parse_resource_usage(log.read_text())
    assert set(usage) == KERNELS, f"sm_{arch}: kernels {sorted(set(usage) ^ KERNELS)} missing/extra"
    for name, u in usage.items():
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0, f"sm_{arch} {name} spills: {u}"
        assert u["registers"] <= 255


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kernels_have_bodies_only_from_sm89(cmake_build, arch):
    usage = parse_resource_usage((cmake_build / f"resource_usage_sm_{arch}.txt").read_text())
    regs = usage["et_attn_fp8_d64"]["registers"]
    if arch >= 89:
        assert regs >= usage["et_attn_f16_d64"]["registers"] // 2, "fp8 body missing on sm_89+"
    else:
        assert regs <= 16, f"sm_{arch} should hold only a trapping stub, uses {regs} registers"


@needs_nvcc
def test_cmake_outputs_and_ctest(cmake_build):
    for name in ("libeartalk_kernels.so", "libeartalk_kernels_host.so", "eartalk_kernels.fatbin"):
        assert (cmake_build / name).is_file(), name
    fat = (cmake_build / "eartalk_kernels.fatbin").read_bytes()
    assert fat[:4] == bytes.fromhex("50ed55ba"), "not a CUDA fatbin (magic 0xBA55ED50)"
    biggest_cubin = max((cmake_build / f"kv_cache_sm_{a}.cubin").stat().st_size for a in ARCHS)
    assert len(fat) > biggest_cubin
    nm = subprocess.run(["nm", "-D", "--defined-only", str(cmake_build / "libeartalk_kernels.so")],
                        capture_output=True, text=True)
    for sym in ("et_cuda_append", "et_cuda_gather", "et_cuda_paged_attention"):
        assert sym in nm.stdout, f"{sym} not exported"
    res = subprocess.run(["ctest", "--test-dir", str(cmake_build)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    seconds = float((cmake_build / "eartalk_build_seconds.txt").read_text())
    assert seconds > 0  # recorded for the report; the 2-minute budget is not a test assertion


@needs_nvcc
def test_debug_build_with_device_asserts_does_not_spill(tmp_path_factory):
    # Release defines NDEBUG; the debug build keeps every ET_ASSERT, which adds code and
    # registers. One arch is enough to see that asserts do not push acc[] into local memory.
    out = Path(tempfile.gettempdir()) / "eartalk_kernels_cmake" / f"debug-{_key()}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "resource_usage_sm_89_debug.txt"
    if not log.exists():
        res = subprocess.run(["nvcc", "-cubin", "-arch=sm_89", "--resource-usage", "-std=c++17",
                              f"-I{kernels_cu.SOURCE_DIR}", str(kernels_cu.source_path("kv_cache.cu")),
                              "-o", str(out / "kv_cache_sm_89_debug.cubin")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        log.write_text(res.stdout + res.stderr)
    usage = parse_resource_usage(log.read_text())
    assert set(usage) == KERNELS
    assert all(u["spill_stores"] == 0 and u["spill_loads"] == 0 for u in usage.values()), usage


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                    reason="cmake and g++ are needed for the host-only build")
def test_host_only_cmake_build_needs_no_nvcc(tmp_path):
    # EARTALK_WITH_CUDA=OFF must configure and build with no CUDA toolkit in sight.
    env = dict(os.environ, PATH="/usr/bin:/bin", CUDACXX="/nonexistent/nvcc")
    env.pop("CUDA_PATH", None)
    for cmd in (["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DEARTALK_WITH_CUDA=OFF"],
                ["cmake", "--build", str(tmp_path), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "libeartalk_kernels_host.so").is_file()
    assert not (tmp_path / "libeartalk_kernels.so").exists()


# ------------------------------------------------------------------ NVRTC (pip nvidia-cuda-nvrtc)

def _entries(ptx: str) -> dict[str, str]:
    """PTX text of each .entry, by name."""
    parts = re.split(r"\.visible \.entry (\w+)\(", ptx)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.fixture(scope="module")
def nvrtc_ptx():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (nvrtc bindings) not installed")
    return {arch: ck.compile_ptx(arch).decode() for arch in (86, 89)}


def test_nvrtc_compiles_every_kernel(nvrtc_ptx):
    for arch, ptx in nvrtc_ptx.items():
        assert f".target sm_{arch}" in ptx
        assert set(_entries(ptx)) == KERNELS


def test_nvrtc_fp8_gated_on_sm89(nvrtc_ptx):
    pre, post = _entries(nvrtc_ptx[86]), _entries(nvrtc_ptx[89])
    assert "trap;" in pre["et_attn_fp8_d64"] and "ld.global" not in pre["et_attn_fp8_d64"]
    assert "trap;" not in post["et_attn_fp8_d64"] and "ld.global" in post["et_attn_fp8_d64"]


def test_nvrtc_rejects_bad_arch():
    pytest.importorskip("cuda.bindings.nvrtc")
    with pytest.raises(ValueError, match="arch"):
        ck.compile_ptx(52)
