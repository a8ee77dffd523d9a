"""The exact ``trtexec`` commands to build and to profile each exported graph, for TensorRT 10 and 11.

Pure text from ``manifest.json``: nothing here needs TensorRT or a GPU, so the commands can be
generated on a laptop and pasted on a Jetson. Shapes come from the manifest: every input's batch
dimension gets ``--minShapes`` 1, ``--optShapes`` ``opt_batch``, ``--maxShapes`` ``max_batch``;
all other dimensions are the static ones of the step contract.

Precision, per TensorRT major version:

- TensorRT 10 (JetPack 6): fp16/bf16 by builder flag on the fp32 ONNX (``--fp16``/``--bf16``);
  int8/fp8 from the explicit Q/DQ ONNX (``<kind>.int8.onnx``/``<kind>.fp8.onnx`` from
  ``eartalk calibrate``) with ``--int8``/``--fp8``. ``strongly_typed=True`` switches to the
  TensorRT 11 style instead.
- TensorRT 11 (JetPack 7.2): the precision flags are gone. The ONNX types carry the precision and
  the network is built ``--stronglyTyped``: fp32 ``<kind>.onnx``, fp16/bf16 ``<kind>.fp16.onnx``
  (:func:`eartalk.export.trt_build.cast_float_model`), int8/fp8 the Q/DQ ONNX.

The profile command is the maintainers' set (TensorRT#3857). ``--profilingVerbosity=detailed``
also goes on the build command: layer information is recorded at build time, so a profile of an
engine built without it cannot name its layers.
"""
from __future__ import annotations

import shlex
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
TRT_VERSIONS = (10, 11)
TRT10_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "int8": ["--int8"], "fp8": ["--fp8"]}
PROFILE_FLAGS = ["--useCudaGraph", "--noDataTransfers", "--useSpinWait", "--separateProfileRun",
                 "--dumpProfile", "--profilingVerbosity=detailed", "--dumpLayerInfo"]

FIGURES_NOTE = """\
# Which trtexec figure is which (its "Performance summary"):
#   GPU Compute Time  GPU time of one inference's kernels (CUDA events around the enqueue). The
#                     engine's cost per call: one step call = one video frame for B sessions; the
#                     budget at 25 fps is 40 ms for step + tokenizer_decode + audio_encoder together.
#   Latency           host wall time of one inference: H2D + GPU compute + D2H. With
#                     --noDataTransfers it is GPU compute plus launch overhead.
#   Enqueue Time      host CPU time to launch one inference (one graph launch with --useCudaGraph).
#                     When it nears GPU Compute Time the CPU, not the GPU, limits the frame rate.
#   Throughput        inferences per second (qps), not frames per session: a batch-B call is B frames.
# --exportTimes has per-iteration start/end of each; --exportProfile has per-layer times."""


def onnx_name(kind: str, precision: str, trt: int, strongly_typed: bool) -> str:
    """ONNX file a build reads: precision in the types for strongly typed builds and for Q/DQ."""
    if precision in ("int8", "fp8") or (strongly_typed and precision != "fp32"):
        return f"{kind}.{precision}.onnx"
    return f"{kind}.onnx"


def engine_name(kind: str, precision: str) -> str:
    return f"{kind}.{precision}.engine"


def _shapes(inputs: dict, batch: int) -> str:
    """``name:1x64,audio:1x2x128`` with the batch symbol replaced by ``batch``."""
    parts = []
    for name, spec in inputs.items():
        dims = [str(batch) if isinstance(d, str) else str(d) for d in spec["shape"]]
        parts.append(f"{name}:{'x'.join(dims)}")
    return ",".join(parts)


def _check(precision: str, trt: int):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if trt not in TRT_VERSIONS:
        raise ValueError(f"TensorRT major version {trt}; expected one of {TRT_VERSIONS}")


def build_command(kind: str, entry: dict, onnx_dir: str, engine_dir: str, precision: str = "fp32",
                  trt: int = 10, opt_batch: int = 1, max_batch: int = 16,
                  strongly_typed: bool | None = None, trtexec: str = "trtexec") -> list[str]:
    """argv of the build: ``entry`` is the manifest's ``files[kind]``."""
    _check(precision, trt)
    st = (trt >= 11) if strongly_typed is None else strongly_typed
    src = Path(onnx_dir) / onnx_name(kind, precision, trt, st)
    eng = Path(engine_dir) / engine_name(kind, precision)
    ins = entry["inputs"]
    cmd = [trtexec, f"--onnx={src}", f"--saveEngine={eng}",
           f"--minShapes={_shapes(ins, 1)}", f"--optShapes={_shapes(ins, opt_batch)}",
           f"--maxShapes={_shapes(ins, max_batch)}"]
    cmd += ["--stronglyTyped"] if st else TRT10_FLAGS[precision]
    cmd += [f"--timingCacheFile={Path(engine_dir) / 'timing.cache'}", "--profilingVerbosity=detailed",
            "--skipInference"]
    return cmd


def profile_command(kind: str, entry: dict, engine_dir: str, precision: str = "fp32", batch: int = 1,
                    trtexec: str = "trtexec") -> list[str]:
    """argv of the profile run of a built engine at ``batch`` (the same for TensorRT 10 and 11)."""
    eng = Path(engine_dir) / engine_name(kind, precision)
    stem = Path(engine_dir) / f"{kind}.{precision}.b{batch}"
    return [trtexec, f"--loadEngine={eng}", f"--shapes={_shapes(entry['inputs'], batch)}", *PROFILE_FLAGS,
            f"--exportProfile={stem}.profile.json", f"--exportLayerInfo={stem}.layers.json",
            f"--exportTimes={stem}.times.json"]


def render(manifest: dict, onnx_dir: str, engine_dir: str | None = None, precision: str = "fp32",
           trt: int = 10, opt_batch: int = 1, strongly_typed: bool | None = None,
           graphs: list[str] | None = None, trtexec: str = "trtexec") -> str:
    """A shell script: per graph, the build and the profile command, then the figures note."""
    _check(precision, trt)
    engine_dir = engine_dir or str(Path(onnx_dir) / "engines")
    max_batch = int(manifest["batch"]["max"])
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt batch {opt_batch} outside 1..{max_batch}")
    st = (trt >= 11) if strongly_typed is None else strongly_typed
    lines = [f"# eartalk: trtexec commands for TensorRT {trt}.x, precision {precision}"
             f"{', strongly typed' if st else ''}; batch 1..{max_batch}, optimised for {opt_batch}",
             "# (on Jetson, trtexec is /usr/src/tensorrt/bin/trtexec)", f"mkdir -p {shlex.quote(engine_dir)}"]
    if precision == "fp8":
        lines.append("# fp8 needs compute capability >= 8.9 (Ada/Hopper/Blackwell); Jetson Orin (8.7) cannot build it.")
    if precision in ("int8", "fp8"):
        lines.append(f"# {precision}: the Q/DQ graphs <kind>.{precision}.onnx come from `eartalk calibrate`.")
    elif st and precision != "fp32":
        lines.append(f"# {precision}: <kind>.{precision}.onnx (float tensors cast) is written by "
                     f"`eartalk export trtexec` / `eartalk export trt`.")
    for kind in graphs or list(manifest["files"]):
        entry = manifest["files"][kind]
        lines.append(f"\n# {kind}")
        lines.append(shlex.join(build_command(kind, entry, onnx_dir, engine_dir, precision, trt,
                                              opt_batch, max_batch, strongly_typed, trtexec)))
        lines.append(shlex.join(profile_command(kind, entry, engine_dir, precision, opt_batch, trtexec)))
    lines.append("")
    lines.append(FIGURES_NOTE)
    return "\n".join(lines) + "\n"
