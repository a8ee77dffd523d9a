"""Transformer training: the loss, input corruption, and the two recipe stages end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eartalk.data.corpus import list_clips
from eartalk.model.bundle import load_bundle, new_bundle
from eartalk.model.config import preset
from eartalk.model.recipe import gpt_stage, tokenizer_stage


def _batch(cfg, B=2, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, V = cfg.tokens_per_frame, cfg.codebook_size
    return (torch.randint(0, V, (B, T, N), generator=g), torch.randint(0, V, (B, N), generator=g),
            torch.randint(0, V, (B, N), generator=g), torch.randn(B, T, cfg.audio_tokens, cfg.audio_dim, generator=g),
            torch.randn(B, T, cfg.cond_tokens, cfg.cond_dim, generator=g), torch.ones(B, T, cfg.cond_tokens, dtype=torch.bool))


def test_loss_is_cross_entropy_of_teacher_forcing_and_corruption_touches_inputs_only():
    from eartalk.model.train_gpt import gpt_loss
    bundle = new_bundle(preset("test"))
    b = _batch(bundle.cfg)
    toks, prev, port, aud, cond, mask = b
    with torch.no_grad():
        logits = bundle.gpt.forward_train(toks, port, aud, cond, mask, prev_first=prev)
        want = F.cross_entropy(logits.flatten(0, 2), toks.flatten())
        assert torch.equal(gpt_loss(bundle, b), want)
        # full corruption: the inputs are other tokens (a different loss), the targets are not
        noisy = gpt_loss(bundle, b, corrupt=1.0, gen=torch.Generator().manual_seed(1))
        assert not torch.equal(noisy, want)
        # the same generator state gives the same corrupted loss (reproducible training)
        assert torch.equal(noisy, gpt_loss(bundle, b, corrupt=1.0, gen=torch.Generator().manual_seed(1)))


def test_bf16_training_forward_is_close_to_float32():
    from eartalk.model.train_gpt import gpt_loss
    bundle = new_bundle(preset("test"))
    b = _batch(bundle.cfg)
    with torch.enable_grad():
        a = gpt_loss(bundle, b, bf16=False)
        h = gpt_loss(bundle, b, bf16=True)
    assert abs(float(a) - float(h)) < 0.02 * float(a)
    with torch.no_grad():   # validation is always float32
        assert torch.equal(gpt_loss(bundle, b, bf16=True), gpt_loss(bundle, b, bf16=False))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from eartalk.data.synth import synthesize_corpus
    d = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(d, 6, seed=3, size=32, workers=1, progress=False)   # 4 train, 2 val
    assert list_clips(d, "train") and list_clips(d, "val")
    return d


def test_recipe_stages_write_a_loadable_model_and_resume(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="train the tokenizer first"):
        gpt_stage("smoke", corpus, out, progress=False)
    tok = tokenizer_stage("smoke", corpus, out, progress=False)
    assert np.isfinite(tok["val_psnr"]) and tok["val_frames"] > 0
    assert (out / "work/tokenizer_curves.png").exists()
    assert json.loads((out / "work/tokenizer_report.json").read_text())["val_psnr"] == tok["val_psnr"]
    rep = gpt_stage("smoke", corpus, out, progress=False)
    assert rep["steps"] > 0 and np.isfinite(rep["train_loss"])
    bundle = load_bundle(out)                       # hash and config checked
    assert bundle.cfg == preset("test")
    card = json.loads((out / "model.json").read_text())
    assert card["recipe"] == "smoke" and card["training"]["tokenizer"]["val_psnr"] == tok["val_psnr"]
    # a second run resumes from the checkpoint: its step count continues
    again = gpt_stage("smoke", corpus, out, progress=False)
    assert again["steps"] >= rep["steps"] and again["minutes"] >= rep["minutes"]
