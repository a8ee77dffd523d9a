"""calibration/report.py and the runtime's --precision: the accuracy report of an int8 artifact
(JSON + markdown + PNG, numbers on the same inputs), OrtBackend/make_backend/generate/stream
loading the int8 graphs, the calibrate CLI end to end, and bench/quant.py's JSON keys."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eartalk.calibration.quantize import quantize
from eartalk.calibration.record import record
from eartalk.data.synth import synthesize_corpus
from eartalk.export import metadata as md
from eartalk.export.compare import bundle_hash
from eartalk.export.onnx_export import export_onnx
from eartalk.runtime.model_loader import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    b = load_model("test", random_init=True, seed=0)
    export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, root / "onnx", model_name="test", weights_hash=bundle_hash(b))
    synthesize_corpus(root / "corpus", clips=3, seed=0, size=128, workers=1, progress=False)
    # the calibrate CLI, as a user runs it (record, then quantize into a new folder)
    from eartalk.cli import main
    assert main(["calibrate", "record", "--model", "test", "--random-init", "--data", str(root / "corpus"),
                 "--split", "train", "--out", str(root / "calib"), "--samples", "12", "--max-clips", "2",
                 "--max-frames", "30"]) == 0
    rc = main(["calibrate", "quantize", "--onnx", str(root / "onnx"), "--calib", str(root / "calib"),
               "--precision", "int8", "--out", str(root / "q")])
    # a random-init model's near-tied logits may fail the token gate: the folder is written either
    # way, and the exit code says what the manifest says
    manifest = json.loads((root / "q/manifest.json").read_text())
    gates = [e["gate_passed"] for e in manifest["quantized"]["int8"].values()]
    assert rc == (0 if all(gates) else 1)
    return root


def test_report_files_and_numbers(qdir):
    from eartalk.calibration.report import accuracy_report
    rep = accuracy_report(qdir / "q", "int8", qdir / "corpus", qdir / "rep", model="test", random_init=True,
                          split="train", max_clips=1, max_frames=30, frames_drift=60, progress=False)
    for ext in ("json", "md", "png"):
        assert (qdir / "rep" / f"int8.report.{ext}").stat().st_size > 100
    saved = json.loads((qdir / "rep" / "int8.report.json").read_text())
    m = saved["metrics"]
    assert saved["frames"] == 30 and len(saved["per_frame"]["token_agreement"]) == 30
    assert 0.9 <= m["token_agreement"] <= 1 and m["decoder_psnr_db"] >= 30
    assert set(saved["drift"]) == {"fp32", "int8"} and saved["frames_drift"] == 60
    assert "lipsync_rel_delta" in m and "drift_slope_delta" in m
    assert saved["random_init"] and "RANDOM-INIT" in saved["notes"][0]
    assert saved["artifacts"]["step"]["file"] == "step.int8.onnx"
    md_text = (qdir / "rep" / "int8.report.md").read_text()
    assert "| token agreement (same inputs) |" in md_text and "Kept in fp32" in md_text
    assert rep["targets"]["token_agreement"]["met"] == (m["token_agreement"] >= 0.97)
    assert saved["guidance"] == 1.0 and "audio guidance 1 (unguided)" in md_text


def test_report_of_guided_streams(qdir):
    from eartalk.calibration.report import accuracy_report
    rep = accuracy_report(qdir / "q", "int8", qdir / "corpus", qdir / "rep-g", model="test", random_init=True,
                          split="train", max_clips=1, max_frames=30, frames_drift=20, progress=False, guidance=1.5)
    # one step call per frame still (two rows each: speech and silence, compared row by row)
    assert rep["guidance"] == 1.5 and rep["frames"] == 30
    assert "audio guidance 1.5" in (qdir / "rep-g" / "int8.report.md").read_text()


def test_runtime_loads_int8_graphs(qdir):
    from eartalk.runtime import make_backend
    from eartalk.runtime.ort_backend import OrtBackend
    fp = make_backend("test", "onnxruntime", random_init=True, onnx_dir=qdir / "q")
    q = make_backend("test", "onnxruntime", random_init=True, onnx_dir=qdir / "q", precision="int8")
    assert q.graphs["step"].path.name == "step.int8.onnx"
    assert q.graphs["tokenizer_decode"].path.name == "tokenizer_decode.int8.onnx"
    assert q.graphs["prefill"].path.name == "prefill.onnx"          # not quantized: stays fp32
    c = fp.cfg
    toks = np.arange(2 * c.tokens_per_frame).reshape(2, -1) % c.codebook_size
    ref = fp.reference(np.random.default_rng(0).random((2, 3, c.image_size, c.image_size), np.float32))
    a, b = fp.decode_float(fp.codes_of(toks), ref), q.decode_float(q.codes_of(toks), ref)
    assert not np.array_equal(a, b) and np.abs(a - b).mean() < 0.02    # really another graph, close to fp32
    with pytest.raises(md.ArtifactError, match="no fp8 graphs.*calibrate quantize"):
        OrtBackend(qdir / "q", c, precision="fp8")
    with pytest.raises(md.ArtifactError, match="no int8 graphs"):
        OrtBackend(qdir / "onnx", c, precision="int8")
    with pytest.raises(ValueError, match="needs backend='onnxruntime'"):
        make_backend("test", "torch", random_init=True, precision="int8")
    # a tampered int8 file is refused like any exported graph
    bad = qdir / "tampered"
    import shutil
    shutil.copytree(qdir / "q", bad)
    with open(bad / "step.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(md.ArtifactError, match="sha256"):
        OrtBackend(bad, c, precision="int8")


def test_generate_and_stream_cli_with_int8(qdir, tmp_path):
    from eartalk.cli import main
    from eartalk.data.audio_io import write_wav
    from eartalk.export.compare import synthetic_pcm
    from PIL import Image
    wav, png = tmp_path / "s.wav", tmp_path / "p.png"
    write_wav(wav, synthetic_pcm(0.4, seed=0))
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(png)
    common = ["--portrait", str(png), "--audio", str(wav), "--model", "test", "--random-init",
              "--backend", "onnxruntime", "--onnx-dir", str(qdir / "q"), "--precision", "int8"]
    assert main(["generate", *common, "--out", str(tmp_path / "g.mp4"), "--quiet"]) == 0
    assert (tmp_path / "g.mp4").stat().st_size > 0
    assert main(["stream", *common, "--out", str(tmp_path / "s.rgb"), "--quiet"]) == 0
    assert (tmp_path / "s.rgb").stat().st_size == 10 * 32 * 32 * 3        # 0.4 s = 10 frames
    # --precision int8 on the torch backend: a clear error, not a silent fp32 run
    assert main(["generate", "--portrait", str(png), "--audio", str(wav), "--model", "test", "--random-init",
                 "--precision", "int8", "--out", str(tmp_path / "x.mp4")]) == 2


def test_fp8_cli_refused_for_orin(qdir, capsys):
    from eartalk.cli import main
    assert main(["calibrate", "quantize", "--onnx", str(qdir / "onnx"), "--calib", str(qdir / "calib"),
                 "--precision", "fp8", "--target-sm", "87", "--out", str(qdir / "f")]) == 2
    assert "8.9" in capsys.readouterr().err


def test_bench_quant_json_keys(qdir, tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "quant.py"), "--quick", "--model", "test", "--onnx",
                    str(qdir / "q"), "--frames", "8", "--json", str(out)], check=True, capture_output=True,
                   cwd=tmp_path, timeout=600)
    r = json.loads(out.read_text())
    assert {"int8_vs_fp32", "token_agreement", "psnr_db"} <= set(r)
    assert r["int8_vs_fp32"]["frame_ms"]["int8"] > 0 and 0 <= r["token_agreement"] <= 1
    if r["int8_vs_fp32"]["speedup"] < 1.5:      # the per-op-type profile says where the time goes
        assert r["profile"]["int8"]["step"] and r["profile"]["fp32"]["tokenizer_decode"]
