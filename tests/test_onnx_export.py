"""ONNX export: the step contract, checker + shape inference, TensorRT-10 op set, metadata and
manifest, ONNX Runtime == torch for every graph, and refusal of bad/foreign files."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from eartalk.export import metadata as md
from eartalk.export.onnx_export import (GRAPHS, TRT10_OPS, ExportError, check_graph, export_onnx,
                                        io_signature, op_types)
from eartalk.model.audio import AudioEncoder
from eartalk.model.config import preset
from eartalk.model.gpt import EARTalkGPT
from eartalk.model.tokenizer import VQTokenizer, code_table


def make_models(seed=0):
    torch.manual_seed(seed)
    cfg = preset("test")
    return cfg, EARTalkGPT(cfg).eval(), VQTokenizer(cfg).eval(), AudioEncoder(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg, gpt, tok, enc = make_models()
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_onnx(cfg, gpt, tok, enc, out, model_name="test")
    return out, manifest, (cfg, gpt, tok, enc)


def test_files_and_manifest(exported):
    out, manifest, (cfg, *_models) = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert set(on_disk["files"]) == set(GRAPHS)
    assert on_disk["opset"] == 18 and on_disk["model_config"] == cfg.to_dict()
    assert on_disk["batch"] == {"dim": "batch", "min": 1, "max": cfg.max_batch}
    for kind, entry in on_disk["files"].items():
        assert entry["file"] == f"{kind}.onnx"
        assert entry["sha256"] == md.file_sha256(out / entry["file"])
    # every graph took less than the whole budget (recorded, not a timing assert on a shared CPU)
    assert set(manifest["export_seconds"]) == set(GRAPHS)


def test_step_contract_exact(exported):
    out, _, (cfg, *_models) = exported
    # test preset: N=4, A=2, F=16, C=4, Dc=16, L=2, H=2, D=8, P=C+A+N=10, S=(1+3)*10=40, V=16
    assert (cfg.tokens_per_frame, cfg.page_tokens, cfg.cache_tokens) == (4, 10, 40)
    sig = io_signature(onnx.load(str(out / "step.onnx")))
    assert sig == {
        "inputs": {"prev_tokens": ("int64", ["batch", 4]), "audio": ("float32", ["batch", 2, 16]),
                   "cond": ("float32", ["batch", 4, 16]), "cond_mask": ("bool", ["batch", 4]),
                   "past_k": ("float32", [2, "batch", 2, 40, 8]), "past_v": ("float32", [2, "batch", 2, 40, 8]),
                   "past_lag": ("int32", ["batch", 40])},
        "outputs": {"logits": ("float32", ["batch", 4, 16]), "new_k": ("float32", [2, "batch", 2, 10, 8]),
                    "new_v": ("float32", [2, "batch", 2, 10, 8])}}
    assert list(sig["inputs"]) == ["prev_tokens", "audio", "cond", "cond_mask", "past_k", "past_v", "past_lag"]
    assert list(sig["outputs"]) == ["logits", "new_k", "new_v"]


def test_other_graph_signatures(exported):
    out, _, (cfg, gpt, tok, enc) = exported
    R = enc.receptive_field
    sigs = {k: io_signature(onnx.load(str(out / f"{k}.onnx"))) for k in GRAPHS}
    assert sigs["prefill"]["outputs"]["sink_k"] == ("float32", [2, "batch", 2, 10, 8])
    assert sigs["tokenizer_encode"] == {"inputs": {"images": ("float32", ["batch", 3, 32, 32])},
                                        "outputs": {"tokens": ("int64", ["batch", 4])}}
    assert sigs["tokenizer_decode"]["inputs"] == {"codes": ("float32", ["batch", 4, 2]),   # 4 cells, 2 FSQ digits
                                                  "ref": ("float32", ["batch", tok.ref_channels + 48, 8, 8])}
    assert sigs["audio_encoder"] == {"inputs": {"mel_window": ("float32", ["batch", R, 80])},
                                     "outputs": {"audio": ("float32", ["batch", 2, 16])}}


@pytest.mark.parametrize("kind", GRAPHS)
def test_checker_shape_inference_opset_and_ops(exported, kind):
    out, _, _ = exported
    m = onnx.load(str(out / f"{kind}.onnx"))
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    assert len(inferred.graph.value_info) > 0
    assert {o.domain: o.version for o in m.opset_import}.get("") == 18
    assert op_types(m) <= TRT10_OPS, sorted(op_types(m) - TRT10_OPS)


def test_non_trt_op_is_refused(exported, tmp_path):
    out, _, _ = exported
    m = onnx.load(str(out / "audio_encoder.onnx"))
    # Unique has no TensorRT 10 importer: a graph using it would need a plugin on Jetson.
    m.graph.node.append(onnx.helper.make_node("Unique", ["audio"], ["u"]))
    with pytest.raises(ExportError, match=r"audio_encoder\.onnx: ops outside .*'Unique'"):
        check_graph(m, tmp_path / "audio_encoder.onnx")


def test_metadata_props(exported):
    out, manifest, (cfg, gpt, tok, enc) = exported
    want_hash = md.weights_sha256({"gpt": gpt, "tokenizer": tok, "audio_encoder": enc})
    assert manifest["weights_sha256"] == want_hash
    for kind in GRAPHS:
        props = md.read_props(out / f"{kind}.onnx")
        assert props["graph"] == kind
        assert props["model_config"] == cfg.to_json()
        assert props["weights_sha256"] == want_hash
        assert props["version"] == md.current_version()


def _feeds(kind, cfg, gpt, tok, enc, B, seed=3):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.codebook_size, (B, cfg.tokens_per_frame), generator=g)
    img = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g)
    if kind == "step":
        pk, pv, lag = gpt.empty_cache(B)
        P = cfg.page_tokens
        pk[:, :, :, :2 * P] = torch.randn(pk[:, :, :, :2 * P].shape, generator=g)
        pv[:, :, :, :2 * P] = torch.randn(pv[:, :, :, :2 * P].shape, generator=g)
        lag[:, :P], lag[:, P:2 * P] = -1, 1
        mask = torch.rand(B, cfg.cond_tokens, generator=g) < 0.5
        return (toks, torch.randn(B, cfg.audio_tokens, cfg.audio_dim, generator=g),
                torch.randn(B, cfg.cond_tokens, cfg.cond_dim, generator=g), mask, pk, pv, lag), gpt.step
    if kind == "prefill":
        return (toks,), gpt.prefill
    if kind == "tokenizer_encode":
        return (img,), tok.encode
    if kind == "tokenizer_reference":
        return (img,), tok.reference
    if kind == "tokenizer_decode":   # expected codes under a random distribution: between the codes too
        codes = torch.softmax(torch.randn(B, cfg.tokens_per_frame, cfg.codebook_size, generator=g) * 3, -1) \
            @ code_table(cfg.codebook_size)
        with torch.no_grad():
            return (codes, tok.reference(img)), tok.decode_codes
    return (torch.randn(B, enc.receptive_field, cfg.n_mels, generator=g) * 3 - 5,), enc.step


@pytest.mark.parametrize("kind", GRAPHS)
def test_onnxruntime_matches_torch(exported, kind):
    import onnxruntime as ort
    out, _, models = exported
    sess = ort.InferenceSession(str(out / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    for B in (1, 3):   # not the export example's batch (2): the batch really is dynamic
        args, fn = _feeds(kind, *models, B)
        with torch.no_grad():
            want = fn(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
        for w, o in zip(want, got):
            assert o.dtype == w.numpy().dtype and o.shape == tuple(w.shape)
            if o.dtype == np.int64:
                assert np.array_equal(o, w.numpy())
            else:
                np.testing.assert_allclose(o, w.numpy(), atol=1e-4, rtol=0)


def test_opset_17_refused(tmp_path):
    cfg, gpt, tok, enc = make_models()
    with pytest.raises(ValueError, match="opset 17 not supported"):
        export_onnx(cfg, gpt, tok, enc, tmp_path, opset=17)


# ------------------------------------------------------------------ refusals
def test_verify_accepts_the_export(exported):
    out, manifest, (cfg, *_m) = exported
    m = md.read_manifest(out)
    for kind in GRAPHS:
        md.verify_onnx(out / f"{kind}.onnx", kind, config=cfg.to_dict(), weights_hash=manifest["weights_sha256"],
                       manifest=m)


def test_truncated_file_refused(exported, tmp_path):
    out, _, _ = exported
    bad = tmp_path / "step.onnx"
    data = (out / "step.onnx").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(md.ArtifactError, match=r"step\.onnx: not a readable ONNX model \(truncated or corrupt"):
        md.verify_onnx(bad, "step")


def test_hash_mismatch_refused(exported, tmp_path):
    out, _, _ = exported
    d = tmp_path / "onnx"
    shutil.copytree(out, d)
    m = onnx.load(str(d / "step.onnx"))
    m.graph.initializer[0].raw_data = bytes(len(m.graph.initializer[0].raw_data))   # weights zeroed
    onnx.save(m, str(d / "step.onnx"))
    with pytest.raises(md.ArtifactError, match=r"step\.onnx: sha256 .* does not match the manifest"):
        md.verify_onnx(d / "step.onnx", "step", manifest=md.read_manifest(d))


def test_foreign_config_version_weights_refused(exported, tmp_path):
    out, manifest, (cfg, *_m) = exported
    m = onnx.load(str(out / "step.onnx"))
    other = dict(cfg.to_dict(), window=5)
    md.write_props(m, {"eartalk.model_config": json.dumps(other, sort_keys=True)})
    with pytest.raises(md.ArtifactError, match=r"another model config: window=5 \(expected 3\)"):
        md.check_props("step.onnx", md.read_props(m), "step", config=cfg.to_dict())
    m = onnx.load(str(out / "step.onnx"))
    md.write_props(m, {"eartalk.version": "0.0.1"})
    with pytest.raises(md.ArtifactError, match=r"step\.onnx: exported by eartalk 0\.0\.1, this is eartalk"):
        md.check_props("step.onnx", md.read_props(m), "step")
    with pytest.raises(md.ArtifactError, match="weights sha256 .* does not match"):
        md.check_props("step.onnx", md.read_props(m), "step", weights_hash="0" * 64, version="0.0.1")
    with pytest.raises(md.ArtifactError, match="graph kind 'step', expected 'prefill'"):
        md.check_props("step.onnx", md.read_props(m), "prefill", version="0.0.1")


def test_weights_hash_sees_every_tensor():
    cfg, gpt, tok, enc = make_models()
    h0 = md.weights_sha256({"gpt": gpt})
    with torch.no_grad():
        gpt.lag_bias[0, 0, 0] += 1e-6
    assert md.weights_sha256({"gpt": gpt}) != h0
