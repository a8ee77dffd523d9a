"""TensorRT engines from the exported ONNX graphs (TensorRT Python API, strongly typed networks).

A strongly typed network takes every tensor's precision from the ONNX types, so the precision is
chosen by the ONNX file, not by builder flags (which TensorRT 11 removes):

- ``fp32``: ``<kind>.onnx`` as exported;
- ``fp16``/``bf16``: :func:`cast_float_model` rewrites the float32 graph (initializers, constants,
  casts) to half precision, keeping float32 graph inputs/outputs behind Cast nodes so the engine's
  I/O contract is the fp32 one; written as ``<kind>.<precision>.onnx`` next to the engines;
- ``int8``/``fp8``: explicit Q/DQ graphs ``<kind>.<precision>.onnx`` from ``eartalk calibrate``
  (never implicit calibration). Without them the build is refused.

FP8 needs compute capability >= 8.9 (Orin is 8.7): refused before anything is built, never built
silently in another precision (TensorRT#4590). bf16 needs >= 8.0.

Each engine gets a sidecar ``<engine>.json`` (:func:`engine_metadata`) that the TensorRT backend
checks before deserialising: TensorRT version, compute capability, source ONNX sha256, precision,
model config and weights hash. One optimization profile covers batch 1..max_batch; a timing cache
file in the output folder makes rebuilds fast.

Without an importable ``tensorrt``, :func:`import_tensorrt` raises :class:`TensorRTUnavailable`
whose message says what to install on the target device.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from eartalk.export import metadata as md
from eartalk.export.trtexec import PRECISIONS, engine_name

INSTALL_HELP = """\
tensorrt is not importable in this Python. Build engines on the target device, after installing:
  Jetson Orin, JetPack 6.x (TensorRT 10.x):  sudo apt-get install python3-libnvinfer python3-libnvinfer-dev
      (system python3, or a venv made with --system-site-packages so it sees the apt package)
  Jetson, JetPack 7.2+ (TensorRT 11):        sudo apt-get install python3-libnvinfer
  x86_64 with an RTX GPU:                    pip install tensorrt     (or: pip install 'eartalk[tensorrt]')
Or print the equivalent trtexec commands: eartalk export trtexec --onnx DIR"""

FP8_MIN_CC = (8, 9)
BF16_MIN_CC = (8, 0)
FP16_MIN_CC = (5, 3)


class TensorRTUnavailable(RuntimeError):
    """tensorrt cannot be imported here; the message says what to install."""


class PrecisionUnsupported(RuntimeError):
    """The device or the ONNX folder cannot give the requested precision (no silent fallback)."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"{INSTALL_HELP}\n(import error: {e})") from e
    return trt


def device_compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) of CUDA device ``device`` via the driver API; RuntimeError without a GPU."""
    from eartalk.runtime.cuda_kernels import is_available
    ok, why = is_available()
    if not ok:
        raise RuntimeError(f"no CUDA device to build for: {why}")
    from cuda.bindings import driver
    A = driver.CUdevice_attribute
    err, dev = driver.cuDeviceGet(device)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGet({device}) failed: {err}")
    cc = []
    for attr in (A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR):
        err, v = driver.cuDeviceGetAttribute(attr, dev)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuDeviceGetAttribute failed: {err}")
        cc.append(int(v))
    return cc[0], cc[1]


def check_precision(precision: str, cc: tuple[int, int]) -> None:
    """Refuse a precision the device lacks, naming the device's compute capability."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    need = {"fp8": FP8_MIN_CC, "bf16": BF16_MIN_CC, "fp16": FP16_MIN_CC}.get(precision)
    if need and tuple(cc) < need:
        extra = " (Jetson Orin is 8.7: use int8 or fp16 there)" if precision == "fp8" else ""
        raise PrecisionUnsupported(
            f"{precision} needs compute capability >= {need[0]}.{need[1]}; this GPU is {cc[0]}.{cc[1]}"
            f"{extra}. Refusing rather than building another precision.")


# ------------------------------------------------------------------ ONNX precision
def _np_dtype(precision: str):
    if precision == "fp16":
        return np.float16
    import ml_dtypes   # an onnx dependency: numpy has no bfloat16
    return ml_dtypes.bfloat16


def cast_float_model(model, precision: str, keep_io_types: bool = True):
    """Copy of an ``onnx.ModelProto`` with its float32 computation in fp16 or bf16.

    Rewrites float32 initializers, ``Constant``/``ConstantOfShape`` values and ``Cast(to=FLOAT)``.
    With ``keep_io_types`` float32 graph inputs are cast to half on entry and float32 outputs are
    cast back on exit, so callers keep the fp32 contract. LayerNormalization keeps its default
    ``stash_type`` (statistics in fp32 inside the op). Shape/int tensors are untouched.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"cast_float_model: precision {precision!r}; expected fp16 or bf16")
    to = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    npt = _np_dtype(precision)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph

    def conv_tensor(t):
        if t.data_type != TensorProto.FLOAT:
            return t
        arr = numpy_helper.to_array(t).astype(npt)
        new = numpy_helper.from_array(arr, t.name)
        return new

    inits = [conv_tensor(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(inits)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(conv_tensor(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = to
    pre, post = [], []
    for v in g.input:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            if keep_io_types:
                inner = v.name + f"_{precision}"
                for n in g.node:
                    n.input[:] = [inner if x == v.name else x for x in n.input]
                pre.append(helper.make_node("Cast", [v.name], [inner], to=to, name=f"cast_in_{v.name}"))
            else:
                v.type.tensor_type.elem_type = to
    for v in g.output:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            if keep_io_types:
                inner = v.name + f"_{precision}"
                for n in g.node:
                    n.output[:] = [inner if x == v.name else x for x in n.output]
                    n.input[:] = [inner if x == v.name else x for x in n.input]
                post.append(helper.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT,
                                             name=f"cast_out_{v.name}"))
            else:
                v.type.tensor_type.elem_type = to
    nodes = pre + _fp32_islands(list(g.node), to, _opset(m)) + post
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]       # stale float32 annotations; re-inferred below
    m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _fp32_islands(nodes: list, to: int, opset: int) -> list:
    """Wrap nodes whose schema at ``opset`` has no ``to`` type (e.g. AveragePool has no bf16
    before opset 22) in Casts: their ``T`` inputs go to float32 and their ``T`` outputs back."""
    import onnx
    from onnx import TensorProto, helper
    want = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}[to]
    out = []
    for n in nodes:
        try:
            schema = onnx.defs.get_schema(n.op_type, opset, n.domain)
        except onnx.defs.SchemaError:
            out.append(n)
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        t_in = [i for i, f in enumerate(schema.inputs[:len(n.input)]) if
                f.type_str in allowed and want not in allowed[f.type_str] and "tensor(float)" in allowed[f.type_str]]
        if not t_in:
            out.append(n)
            continue
        bad = {schema.inputs[i].type_str for i in t_in}
        for i in t_in:
            if n.input[i]:
                src = n.input[i]
                n.input[i] = f"{src}_f32_for_{n.name}"
                out.append(helper.make_node("Cast", [src], [n.input[i]], to=TensorProto.FLOAT,
                                            name=f"{n.name}_in{i}_f32"))
        post = []
        for j, f in enumerate(schema.outputs[:len(n.output)]):
            if f.type_str in bad and n.output[j]:
                dst = n.output[j]
                n.output[j] = f"{dst}_f32"
                post.append(helper.make_node("Cast", [n.output[j]], [dst], to=to, name=f"{n.name}_out{j}_back"))
        out += [n, *post]
    return out


def has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def precision_onnx(onnx_dir: str | Path, kind: str, precision: str, out_dir: str | Path) -> Path:
    """The ONNX file whose types give ``precision``, making the fp16/bf16 cast if needed."""
    import onnx
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    base = onnx_dir / f"{kind}.onnx"
    if precision == "fp32":
        return base
    if precision in ("fp16", "bf16"):
        dst = out_dir / f"{kind}.{precision}.onnx"
        src_props = md.read_props(base)
        if dst.is_file() and md.read_props(dst).get("source_sha256") == md.file_sha256(base):
            return dst
        m = cast_float_model(md.load_onnx(base), precision)
        md.write_props(m, {md.PREFIX + "source_sha256": md.file_sha256(base),
                           md.PREFIX + "precision": precision, **{md.PREFIX + k: v for k, v in src_props.items()}})
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(dst))
        return dst
    qdq = onnx_dir / f"{kind}.{precision}.onnx"
    if not qdq.is_file():
        raise PrecisionUnsupported(f"{qdq}: missing. {precision} engines are built from explicit Q/DQ graphs "
                                   f"calibrated on recorded step inputs: run `eartalk calibrate` first")
    if not has_qdq(md.load_onnx(qdq)):
        raise PrecisionUnsupported(f"{qdq}: has no QuantizeLinear/DequantizeLinear nodes; "
                                   f"a strongly typed build would silently stay fp32")
    return qdq


# ------------------------------------------------------------------ build
def engine_metadata(trt_version: str, cc: tuple[int, int], onnx_path: Path, precision: str, kind: str,
                    props: dict, batch: tuple[int, int, int], device_name: str = "") -> dict:
    """The sidecar written next to an engine and checked by ``runtime/trt_backend.py``."""
    return {"format": md.FORMAT_VERSION, "graph": kind, "precision": precision,
            "tensorrt_version": trt_version, "compute_capability": f"{cc[0]}.{cc[1]}",
            "device_name": device_name, "source_onnx": onnx_path.name,
            "source_onnx_sha256": md.file_sha256(onnx_path), "model_config": json.loads(props["model_config"]),
            "weights_sha256": props["weights_sha256"], "eartalk_version": props["version"],
            "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "strongly_typed": True}


def build_engine(trt, onnx_path: Path, engine_path: Path, entry: dict, batch: tuple[int, int, int],
                 timing_cache: Path, workspace_mb: int = 1024, log=print) -> None:
    """Parse ``onnx_path`` into a strongly typed network, one profile over the batch, serialise."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):   # deprecated no-op in 10.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse it: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, spec in entry["inputs"].items():
        shp = lambda b: tuple(b if isinstance(d, str) else d for d in spec["shape"])  # noqa: E731
        profile.set_shape(name, shp(batch[0]), shp(batch[1]), shp(batch[2]))
    config.add_optimization_profile(profile)
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(engine))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"{engine_path}: built in {time.perf_counter() - t0:.1f} s")


def build_all(onnx_dir: str | Path, out_dir: str | Path, precision: str, graphs: list[str] | None = None,
              opt_batch: int = 1, max_batch: int | None = None, device: int = 0, log=print) -> list[dict]:
    """Engines for ``graphs`` (default: all in the manifest); returns their sidecars.

    Order of refusals: precision name, ONNX folder and manifest, Q/DQ files, tensorrt import,
    device compute capability -- so the cheapest mistake is reported first.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = md.read_manifest(onnx_dir)
    kinds = graphs or list(manifest["files"])
    mb = max_batch or int(manifest["batch"]["max"])
    if not 1 <= opt_batch <= mb:
        raise ValueError(f"opt batch {opt_batch} outside 1..{mb}")
    for kind in kinds:
        md.verify_onnx(onnx_dir / md.manifest_entry(manifest, kind, onnx_dir)["file"], kind, manifest=manifest)
        if precision in ("int8", "fp8"):
            precision_onnx(onnx_dir, kind, precision, out_dir)
    trt = import_tensorrt()
    cc = device_compute_capability(device)
    check_precision(precision, cc)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecars = []
    for kind in kinds:
        entry = manifest["files"][kind]
        src = precision_onnx(onnx_dir, kind, precision, out_dir)
        eng = out_dir / engine_name(kind, precision)
        build_engine(trt, src, eng, entry, (1, opt_batch, mb), out_dir / "timing.cache", log=log)
        meta = engine_metadata(trt.__version__, cc, src, precision, kind, md.read_props(onnx_dir / entry["file"]),
                               (1, opt_batch, mb))
        meta["engine_sha256"] = md.file_sha256(eng)
        eng.with_name(eng.name + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        sidecars.append(meta)
    return sidecars
