"""ONNX Runtime backend: parity with the torch backend over a 500-frame stream, IOBinding
outputs, provider selection, and refusal of corrupt / foreign / tampered files at load."""
import json
import shutil

import numpy as np
import onnx
import pytest

from eartalk.export import metadata as md
from eartalk.export.compare import BackendGraphs, bundle_hash, run_stream, synthetic_pcm
from eartalk.export.onnx_export import export_onnx
from eartalk.runtime.model_loader import is_trained, load_model
from eartalk.runtime.ort_backend import OrtBackend, provider_list
from eartalk.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def bundle():
    return load_model("test", random_init=True, seed=0)


@pytest.fixture(scope="module")
def onnx_dir(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort_onnx")
    b = bundle
    export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, out, model_name="test", weights_hash=bundle_hash(b))
    return out


def test_backend_parity_500_frames(bundle, onnx_dir):
    cfg, T = bundle.cfg, 500
    pcm = synthetic_pcm(T / cfg.fps, seed=1)
    ort_b = OrtBackend.from_bundle(onnx_dir, bundle)
    torch_b = TorchBackend(bundle)
    a = run_stream(BackendGraphs(torch_b), cfg, torch_b.receptive_field, T, pcm=pcm)
    b = run_stream(BackendGraphs(ort_b), cfg, ort_b.receptive_field, T, pcm=pcm)
    diff = float(np.abs(a["logits"] - b["logits"]).max())
    assert diff <= 1e-4, diff
    assert np.array_equal(a["tokens"], b["tokens"])
    assert len(np.unique(a["tokens"])) > 1           # the stream is not a constant
    # the tokens' own frames are identical: the uint8 pixels every backend emits (Backend.decode's rounding)
    from eartalk.export.compare import demo_portrait
    from eartalk.runtime.backend import to_uint8_frames
    ref_t, ref_o = (be.reference(demo_portrait(cfg)) for be in (torch_b, ort_b))
    every = a["tokens"][::25]
    assert np.array_equal(torch_b.decode(every, np.repeat(ref_t, len(every), 0)),
                          ort_b.decode(every, np.repeat(ref_o, len(every), 0)))
    # the streams show expected codes (runtime/soft_decode.py), which carry the logits' float
    # differences: a uint8 value may round the other way, by 1
    diff = np.abs(to_uint8_frames(a["images"]).astype(int) - to_uint8_frames(b["images"]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (int(diff.max()), int((diff > 0).sum()))


def test_outputs_are_fresh_arrays_with_the_contract_dtypes(bundle, onnx_dir):
    be = OrtBackend(onnx_dir, bundle.cfg)
    c = bundle.cfg
    pk = np.zeros((c.n_layer, 2, c.n_head, c.cache_tokens, c.head_dim), np.float32)
    lag = np.full((2, c.cache_tokens), -2, np.int32)
    lag[:, :c.page_tokens] = -1
    args = (np.zeros((2, c.tokens_per_frame), np.int64), np.zeros((2, c.audio_tokens, c.audio_dim), np.float32),
            np.zeros((2, c.cond_tokens, c.cond_dim), np.float32), np.zeros((2, c.cond_tokens), bool), pk, pk, lag)
    l1, k1, v1 = be.step(*args)
    l2, k2, v2 = be.step(*args)
    assert l1.shape == (2, c.tokens_per_frame, c.codebook_size) and k1.shape == (c.n_layer, 2, c.n_head, c.page_tokens, c.head_dim)
    assert l1.dtype == k1.dtype == np.float32
    # IOBinding writes into new buffers per call: a kept result is never overwritten by the next
    assert not np.shares_memory(l1, l2) and not np.shares_memory(k1, k2)
    np.testing.assert_array_equal(l1, l2)
    assert be.receptive_field == bundle.audio.receptive_field


def test_unknown_provider_lists_available():
    with pytest.raises(RuntimeError, match=r"no CUDAExecutionProvider; available providers: \[.*'CPUExecutionProvider'"):
        provider_list("cuda")
    assert provider_list("cpu") == ["CPUExecutionProvider"]


def test_truncated_file_refused(bundle, onnx_dir, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(onnx_dir, d)
    data = (d / "prefill.onnx").read_bytes()
    (d / "prefill.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(md.ArtifactError, match=r"prefill\.onnx: sha256 .* does not match the manifest"):
        OrtBackend(d, bundle.cfg)
    # with the manifest "fixed" to the truncated bytes the parse itself refuses it
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["prefill"]["sha256"] = md.file_sha256(d / "prefill.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(md.ArtifactError, match=r"prefill\.onnx: not a readable ONNX model"):
        OrtBackend(d, bundle.cfg)


def test_other_config_refused(bundle, onnx_dir):
    from eartalk.model.config import preset
    with pytest.raises(md.ArtifactError, match=r"manifest\.json: exported for another model config: window=3 \(expected 4\)"):
        OrtBackend(onnx_dir, preset("test", window=4))


def test_other_weights_refused(onnx_dir):
    other = load_model("test", random_init=True, seed=1)
    with pytest.raises(md.ArtifactError, match="weights sha256 .* does not match the model's"):
        OrtBackend.from_bundle(onnx_dir, other)


def test_file_from_another_version_refused(bundle, onnx_dir, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(onnx_dir, d)
    m = onnx.load(str(d / "step.onnx"))
    md.write_props(m, {"eartalk.version": "0.0.9"})
    onnx.save(m, str(d / "step.onnx"))
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["step"]["sha256"] = md.file_sha256(d / "step.onnx")   # consistent but foreign
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(md.ArtifactError, match=r"step\.onnx: exported by eartalk 0\.0\.9"):
        OrtBackend(d, bundle.cfg)


def test_swapped_file_refused(bundle, onnx_dir, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(onnx_dir, d)
    shutil.copy(d / "prefill.onnx", d / "step.onnx")
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["step"]["sha256"] = md.file_sha256(d / "step.onnx")
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(md.ArtifactError, match=r"step\.onnx: graph kind 'prefill', expected 'step'"):
        OrtBackend(d, bundle.cfg)


def test_open_session_through_onnxruntime_matches_torch(bundle, onnx_dir):
    """The runtime's own session/engine, backend="onnxruntime" vs "torch": the same frames."""
    from eartalk.runtime import open_session
    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, (bundle.cfg.image_size, bundle.cfg.image_size, 3), dtype=np.uint8)
    pcm = synthetic_pcm(1.2, seed=2)
    out = {}
    for backend, extra in (("torch", {}), ("onnxruntime", {"onnx_dir": onnx_dir})):
        s = open_session("test", backend=backend, portrait=portrait, random_init=True, seed=0, **extra)
        s.push_audio(pcm)
        s.flush()
        out[backend] = np.stack([f.image for f in s.frames()])
        s.close()
    assert len(out["torch"]) == 30
    # The same tokens decode to the same picture; a float decoder of another runtime can land on the
    # other side of a rounding boundary (measured: 10 of 92,160 values one level apart, the same
    # pixel in the last frames of this still face). Exact pixel identity is asserted by
    # test_backend_parity_500_frames; here a token going astray would show as large differences.
    diff = np.abs(out["torch"].astype(int) - out["onnxruntime"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (int(diff.max()), int((diff > 0).sum()))


@pytest.mark.skipif(not is_trained("tiny"), reason="no shipped default model (eartalk/assets/models/tiny) in this checkout")
def test_default_model_parity_500_frames(tmp_path):
    """The issue's parity on the shipped model itself: rendered portrait and eSpeak speech, 500
    frames, logits within 1e-4, identical tokens and identical uint8 frames."""
    from eartalk.export.compare import demo_portrait, speech_pcm
    from eartalk.runtime.backend import to_uint8_frames
    b = load_model("tiny")
    export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, tmp_path, model_name="tiny", weights_hash=bundle_hash(b))
    T = 500
    pcm, portrait = speech_pcm(seconds=T / b.cfg.fps), demo_portrait(b.cfg, seed=3)
    torch_b, ort_b = TorchBackend(b), OrtBackend.from_bundle(tmp_path, b)
    a = run_stream(BackendGraphs(torch_b), b.cfg, torch_b.receptive_field, T, pcm=pcm, portrait=portrait)
    o = run_stream(BackendGraphs(ort_b), b.cfg, ort_b.receptive_field, T, pcm=pcm, portrait=portrait)
    assert float(np.abs(a["logits"] - o["logits"]).max()) <= 1e-4
    assert np.array_equal(a["tokens"], o["tokens"])
    assert (a["tokens"][1:] != a["tokens"][:-1]).any()      # the model moves: not a frozen stream
    # The decoders' float outputs differ by ~4e-5 (kernel summation order), so a few uint8 values
    # round the other way: measured 2026-12-04, ~0.01% of values, by 1. Bit-identical frames are
    # not reached (issue 5 stays open on that point); more than one level would be a real bug.
    fa, fo = to_uint8_frames(a["images"]).astype(int), to_uint8_frames(o["images"]).astype(int)
    assert np.abs(fa - fo).max() <= 1 and (fa != fo).mean() < 1e-3


def test_refine_graph_matches_torch_and_serves_refining_sessions(tmp_path):
    """A model trained with refinement exports refine.onnx (the step with a draft, logits only):
    same logits as torch's drafted step; an ORT session with refine=2 makes the torch session's frames."""
    import torch
    from eartalk.model.bundle import new_bundle
    from eartalk.model.config import preset
    from eartalk.runtime import Engine
    b = new_bundle(preset("test", refine=True), seed=1)
    with torch.no_grad():             # drafts large enough to flip tokens (tests/test_refine.py)
        g = torch.Generator().manual_seed(0)
        for p in (b.gpt.draft_known, b.gpt.digit_emb.weight, b.gpt.head.weight):
            p.copy_(torch.randn(p.shape, generator=g))
    m = export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, tmp_path, model_name="test", weights_hash=bundle_hash(b))
    assert m["files"]["refine"]["inputs"]["draft_known"] == {"dtype": "bool", "shape": ["batch", 4]}
    assert list(m["files"]["refine"]["outputs"]) == ["logits"]
    ort_b, torch_b = OrtBackend.from_bundle(tmp_path, b), TorchBackend(b)
    c, rng = b.cfg, np.random.default_rng(0)
    pk = rng.standard_normal((c.n_layer, 3, c.n_head, c.cache_tokens, c.head_dim)).astype(np.float32)
    lag = np.full((3, c.cache_tokens), 1, np.int32)
    lag[:, :c.page_tokens] = -1
    args = (rng.integers(0, c.codebook_size, (3, 4)), rng.standard_normal((3, 2, 16)).astype(np.float32),
            rng.standard_normal((3, 4, 16)).astype(np.float32), rng.random((3, 4)) < 0.5, pk, pk, lag,
            rng.integers(0, c.codebook_size, (3, 4)), rng.random((3, 4)) < 0.5)
    np.testing.assert_allclose(ort_b.refine(*args), torch_b.refine(*args), atol=1e-5, rtol=0)
    portrait = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pcm = (rng.standard_normal(c.samples_per_frame * 8) * 0.2).astype(np.float32)
    frames = {}
    for name, be in (("torch", torch_b), ("ort", ort_b)):
        with Engine(be, max_sessions=1) as eng:
            s = eng.open_session(portrait, refine=2, idle_motion=False)
            s.push_audio(pcm)
            s.flush()
            frames[name] = np.stack([f.image for f in s.frames()])
    assert frames["torch"].shape[0] == 8 and np.array_equal(frames["torch"], frames["ort"])


def test_refinement_is_refused_without_a_refine_graph(bundle, onnx_dir):
    from eartalk.model.bundle import new_bundle
    from eartalk.model.config import preset
    be = OrtBackend.from_bundle(onnx_dir, bundle)
    assert "refine" not in json.loads((onnx_dir / "manifest.json").read_text())["files"]
    assert "not trained to refine" in be.refine_blocker()
    with pytest.raises(ValueError, match=r"unknown graphs \['refine'\].*only for a model trained with refinement"):
        export_onnx(bundle.cfg, bundle.gpt, bundle.tokenizer, bundle.audio, onnx_dir, graphs=("refine",))
    b = new_bundle(preset("test", refine=True), seed=1)       # a refining model exported without it
    out = onnx_dir.parent / "no_refine_graph"
    export_onnx(b.cfg, b.gpt, b.tokenizer, b.audio, out, weights_hash=bundle_hash(b),
                graphs=("step", "prefill", "tokenizer_encode", "tokenizer_reference", "tokenizer_decode", "audio_encoder"))
    assert "has no refine.onnx" in OrtBackend.from_bundle(out, b).refine_blocker()
