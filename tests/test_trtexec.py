"""Golden trtexec command text for TensorRT 10 and 11 (no TensorRT needed: pure text)."""
import pytest

from eartalk.export.onnx_export import expected_signature
from eartalk.export.trtexec import build_command, profile_command, render
from eartalk.model.config import preset

STEP_SHAPES_1 = ("prev_tokens:1x4,audio:1x2x16,cond:1x4x16,cond_mask:1x4,past_k:2x1x2x40x8,"
                 "past_v:2x1x2x40x8,past_lag:1x40")
STEP_SHAPES_2 = ("prev_tokens:2x4,audio:2x2x16,cond:2x4x16,cond_mask:2x4,past_k:2x2x2x40x8,"
                 "past_v:2x2x2x40x8,past_lag:2x40")
STEP_SHAPES_4 = ("prev_tokens:4x4,audio:4x2x16,cond:4x4x16,cond_mask:4x4,past_k:2x4x2x40x8,"
                 "past_v:2x4x2x40x8,past_lag:4x40")


@pytest.fixture(scope="module")
def manifest():
    """What `eartalk export onnx` writes for the test preset (shapes from the contract)."""
    cfg = preset("test")
    sig = expected_signature(cfg, receptive_field=68, ref_channels=80)
    files = {k: {"file": f"{k}.onnx", **{io: {n: {"dtype": d, "shape": s} for n, (d, s) in v[io].items()}
                                          for io in ("inputs", "outputs")}} for k, v in sig.items()}
    return {"batch": {"dim": "batch", "min": 1, "max": cfg.max_batch}, "files": files}


def test_trt10_fp16_step_build_golden(manifest):
    cmd = build_command("step", manifest["files"]["step"], "/m/onnx", "/m/eng", "fp16", trt=10,
                        opt_batch=2, max_batch=4)
    assert " ".join(cmd) == (
        "trtexec --onnx=/m/onnx/step.onnx --saveEngine=/m/eng/step.fp16.engine "
        f"--minShapes={STEP_SHAPES_1} --optShapes={STEP_SHAPES_2} --maxShapes={STEP_SHAPES_4} "
        "--fp16 --timingCacheFile=/m/eng/timing.cache --profilingVerbosity=detailed --skipInference")


def test_trt11_fp16_step_build_golden(manifest):
    # TensorRT 11 has no --fp16: the fp16-typed ONNX and a strongly typed network instead
    cmd = build_command("step", manifest["files"]["step"], "/m/onnx", "/m/eng", "fp16", trt=11,
                        opt_batch=2, max_batch=4)
    assert " ".join(cmd) == (
        "trtexec --onnx=/m/onnx/step.fp16.onnx --saveEngine=/m/eng/step.fp16.engine "
        f"--minShapes={STEP_SHAPES_1} --optShapes={STEP_SHAPES_2} --maxShapes={STEP_SHAPES_4} "
        "--stronglyTyped --timingCacheFile=/m/eng/timing.cache --profilingVerbosity=detailed --skipInference")


@pytest.mark.parametrize("trt,flag,src", [(10, "--int8", "step.int8.onnx"), (11, "--stronglyTyped", "step.int8.onnx")])
def test_int8_reads_qdq_graph(manifest, trt, flag, src):
    cmd = build_command("step", manifest["files"]["step"], "/m/onnx", "/m/eng", "int8", trt=trt, max_batch=4)
    assert cmd[1] == f"--onnx=/m/onnx/{src}" and flag in cmd
    assert not {"--fp16", "--int8", "--fp8", "--bf16"} & set(cmd) if trt == 11 else True


def test_trt10_strongly_typed_opt_in(manifest):
    cmd = build_command("step", manifest["files"]["step"], "/m/onnx", "/m/eng", "bf16", trt=10,
                        max_batch=4, strongly_typed=True)
    assert cmd[1] == "--onnx=/m/onnx/step.bf16.onnx" and "--stronglyTyped" in cmd and "--bf16" not in cmd


def test_profile_golden(manifest):
    cmd = profile_command("step", manifest["files"]["step"], "/m/eng", "fp16", batch=1)
    assert " ".join(cmd) == (
        f"trtexec --loadEngine=/m/eng/step.fp16.engine --shapes={STEP_SHAPES_1} --useCudaGraph "
        "--noDataTransfers --useSpinWait --separateProfileRun --dumpProfile --profilingVerbosity=detailed "
        "--dumpLayerInfo --exportProfile=/m/eng/step.fp16.b1.profile.json "
        "--exportLayerInfo=/m/eng/step.fp16.b1.layers.json --exportTimes=/m/eng/step.fp16.b1.times.json")


def test_audio_encoder_golden(manifest):
    cmd = build_command("audio_encoder", manifest["files"]["audio_encoder"], "/m/onnx", "/m/eng", "fp32",
                        trt=10, max_batch=4)
    assert " ".join(cmd) == (
        "trtexec --onnx=/m/onnx/audio_encoder.onnx --saveEngine=/m/eng/audio_encoder.fp32.engine "
        "--minShapes=mel_window:1x68x80 --optShapes=mel_window:1x68x80 --maxShapes=mel_window:4x68x80 "
        "--timingCacheFile=/m/eng/timing.cache --profilingVerbosity=detailed --skipInference")


def test_render_covers_every_graph_and_explains_figures(manifest):
    text = render(manifest, "/m/onnx", precision="fp8", trt=11)
    for kind in manifest["files"]:
        assert f"--onnx=/m/onnx/{kind}.fp8.onnx" in text and f"--loadEngine=/m/onnx/engines/{kind}.fp8.engine" in text
    assert text.count("--stronglyTyped") == len(manifest["files"])
    assert "compute capability >= 8.9" in text and "Orin (8.7)" in text
    for figure in ("GPU Compute Time", "Latency", "Enqueue Time", "Throughput"):
        assert f"#   {figure}" in text


def test_bad_arguments(manifest):
    with pytest.raises(ValueError, match="precision 'fp4'"):
        render(manifest, "/m", precision="fp4")
    with pytest.raises(ValueError, match="TensorRT major version 9"):
        render(manifest, "/m", trt=9)
    with pytest.raises(ValueError, match="opt batch 5 outside 1..4"):
        render(manifest, "/m", opt_batch=5)
