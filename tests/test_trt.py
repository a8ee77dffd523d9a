"""TensorRT path: what runs without TensorRT (refusals, sidecar checks, fp16/bf16 ONNX casts) and
the engine build + backend tests, skipped with a reason where tensorrt or a GPU is missing."""
import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch

from eartalk.export import metadata as md
from eartalk.export.onnx_export import export_onnx
from eartalk.export.trt_build import (INSTALL_HELP, PrecisionUnsupported, TensorRTUnavailable, build_all,
                                      cast_float_model, check_precision, precision_onnx)
from eartalk.model.audio import AudioEncoder
from eartalk.model.config import preset
from eartalk.model.gpt import EARTalkGPT
from eartalk.model.tokenizer import VQTokenizer
from eartalk.runtime.trt_backend import EngineMismatch, check_engine_metadata

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="tensorrt is not installable here (NVIDIA's index); "
                                                    "run on a Jetson/RTX machine with tensorrt")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = preset("test")
    out = tmp_path_factory.mktemp("trt_onnx")
    export_onnx(cfg, EARTalkGPT(cfg), VQTokenizer(cfg), AudioEncoder(cfg), out, model_name="test",
                graphs=("step", "audio_encoder"))
    return out


def test_fp8_refused_on_orin():
    with pytest.raises(PrecisionUnsupported, match=r"fp8 needs compute capability >= 8\.9; this GPU is 8\.7"):
        check_precision("fp8", (8, 7))
    check_precision("fp8", (8, 9))
    check_precision("int8", (8, 7))
    with pytest.raises(PrecisionUnsupported, match="bf16 needs compute capability >= 8.0; this GPU is 7.5"):
        check_precision("bf16", (7, 5))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed: the missing-tensorrt message cannot be shown")
def test_without_tensorrt_cli_says_what_to_install(onnx_dir, tmp_path, capsys):
    from eartalk.cli import main
    rc = main(["export", "trt", "--onnx", str(onnx_dir), "--precision", "fp16", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "python3-libnvinfer" in err and "pip install tensorrt" in err and "eartalk[tensorrt]" in err
    with pytest.raises(TensorRTUnavailable):
        build_all(onnx_dir, tmp_path / "e", "fp16")


def test_int8_without_qdq_graph_refused_before_tensorrt(onnx_dir, tmp_path):
    with pytest.raises(PrecisionUnsupported, match=r"step\.int8\.onnx: missing.*eartalk calibrate"):
        build_all(onnx_dir, tmp_path, "int8", graphs=["step"])


@pytest.mark.parametrize("kind", ["step", "audio_encoder"])
def test_fp16_cast_runs_and_stays_close(onnx_dir, tmp_path, kind):
    path = precision_onnx(onnx_dir, kind, "fp16", tmp_path)
    assert path.name == f"{kind}.fp16.onnx"
    m = md.load_onnx(path)
    assert md.read_props(m)["source_sha256"] == md.file_sha256(onnx_dir / f"{kind}.onnx")
    assert all(t.data_type != 1 for t in m.graph.initializer)     # no float32 weights left
    feeds = _feeds(md.load_onnx(onnx_dir / f"{kind}.onnx"))
    ref = ort.InferenceSession(str(onnx_dir / f"{kind}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32                  # fp32 I/O contract kept
        assert np.abs(r - g).max() < 5e-2 * max(1.0, np.abs(r).max())


def test_bf16_cast_is_valid_onnx_and_close(onnx_dir):
    # onnxruntime's CPU provider has no bf16 MatMul: the ONNX reference evaluator runs it instead
    from onnx.reference import ReferenceEvaluator
    base = md.load_onnx(onnx_dir / "audio_encoder.onnx")
    m = cast_float_model(base, "bf16")
    feeds = _feeds(base)
    ref = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ReferenceEvaluator(m).run(None, feeds)[0]
    assert got.dtype == np.float32 and np.abs(ref - got).max() < 0.1


def _feeds(model):
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [2 if d.dim_param else d.dim_value for d in t.shape.dim]
        feeds[i.name] = {1: lambda: rng.standard_normal(shape).astype(np.float32),
                         7: lambda: rng.integers(0, 16, shape),
                         6: lambda: np.where(np.arange(shape[-1]) < 10, -1, -2)[None].repeat(shape[0], 0).astype(np.int32),
                         9: lambda: rng.random(shape) < 0.5}[t.elem_type]()
    return feeds


META = {"graph": "step", "engine_sha256": "ab" * 32, "compute_capability": "8.7", "tensorrt_version": "10.3.0",
        "precision": "fp16", "model_config": {"window": 8}, "weights_sha256": "cd" * 32}


def test_engine_sidecar_accepted_when_everything_matches():
    check_engine_metadata("step.fp16.engine", META, trt_version="10.3.0", cc=(8, 7), graph="step",
                          precision="fp16", config={"window": 8}, weights_hash="cd" * 32, engine_sha256="ab" * 32)


@pytest.mark.parametrize("kw,msg", [
    (dict(cc=(8, 9)), r"compute capability '8\.7' in its sidecar, expected '8\.9' \(engines are per GPU"),
    (dict(trt_version="11.4.1"), r"TensorRT version '10\.3\.0' in its sidecar, expected '11\.4\.1'"),
    (dict(weights_hash="00" * 32), r"weights sha256 'cdcd"),
    (dict(config={"window": 4}), r"model config \{'window': 8\} in its sidecar, expected \{'window': 4\}"),
    (dict(engine_sha256="ff" * 32), r"engine sha256 .*\(the engine file changed or is incomplete\)"),
    (dict(precision="int8"), r"precision 'fp16' in its sidecar, expected 'int8'"),
])
def test_engine_sidecar_mismatch_refused(kw, msg):
    args = dict(trt_version="10.3.0", cc=(8, 7), graph="step", precision="fp16", config={"window": 8},
                weights_hash="cd" * 32, engine_sha256="ab" * 32)
    args.update(kw)
    with pytest.raises(EngineMismatch, match=r"step\.fp16\.engine: " + msg):
        check_engine_metadata("step.fp16.engine", META, **args)


def test_trt_backend_importable_without_tensorrt():
    import eartalk.runtime.trt_backend as tb
    assert tb.TrtBackend.name == "tensorrt"


@needs_trt
def test_build_engine_and_backend_parity(onnx_dir, tmp_path):
    from eartalk.runtime.cuda_kernels import is_available
    ok, why = is_available()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    metas = build_all(onnx_dir, tmp_path, "fp32", graphs=["step"])
    assert metas[0]["strongly_typed"] and metas[0]["source_onnx_sha256"] == md.file_sha256(onnx_dir / "step.onnx")
