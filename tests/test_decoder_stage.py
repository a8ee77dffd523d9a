"""eartalk/model/decoder_stage.py: the shut-eye renders (bit for bit the renderer's frames of the
clip's states with the blink drawn), and stage 3 of the smoke recipe: the encoder and so every code
kept, the decoder trained, the card, a second run from stage 1's decoder, and the CLI."""
import json

import numpy as np
import pytest
import torch

from eartalk.cli import main
from eartalk.data.corpus import list_clips, load_clip
from eartalk.data.synth import rerender
from eartalk.model.bundle import load_bundle
from eartalk.model.decoder_stage import SHUT_VALUES, _stage_frames, decoder_stage, merge_parts, shut_eye_frames
from eartalk.model.finetune import encoder_digest
from eartalk.model.recipe import _recipe, gpt_stage, tokenizer_frames, tokenizer_stage
from eartalk.model.train_gpt import fit_size

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from eartalk.data.synth import synthesize_corpus
    d = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(d, 6, seed=3, size=32, workers=1, progress=False)   # 4 train, 2 val
    return d


def test_shut_eye_frames_are_the_renderers_frames_of_each_state_with_the_blink_drawn(corpus):
    s = shut_eye_frames(corpus, "train", 32, every=5, clip_every=2, max_clips=None, seed=0, progress=False)
    ids = list_clips(corpus, "train")
    assert sorted(set(s["index"].tolist())) == list(range(0, len(ids), 2))     # one clip in two
    assert set(np.unique(s["blink"])) <= set(SHUT_VALUES) and (s["blink"] == 1.0).any()
    assert len(s["frames"]) == len(s["index"]) == len(s["at"]) == len(s["exprs"]) > 0
    for i in sorted(set(s["index"].tolist())):
        clip = load_clip(corpus, ids[i])
        mine = s["index"] == i
        at = s["at"][mine]
        assert np.all(np.diff(at) == 5) and at[0] < 5                          # every 5th from an offset
        sub = {k: np.asarray(v)[at] for k, v in clip.gt.items()}
        want = fit_size(rerender(clip.meta["identity"], {**sub, "blink": s["blink"][mine]}, 32), 32)
        assert np.array_equal(s["frames"][mine], np.moveaxis(want, -1, 1))
        assert np.array_equal(s["emotion"][mine], sub["emotion"])              # the state's own emotion
        # the eyes differ from the clip's own frames where its eyes were open
        opened = np.asarray(clip.gt["blink"])[at] < 0.3
        assert (s["frames"][mine][opened] != np.moveaxis(np.asarray(clip.frames)[at][opened], -1, 1)).any()
    assert (s["exprs"] > 0).any()
    again = shut_eye_frames(corpus, "train", 32, every=5, clip_every=2, max_clips=None, seed=0, progress=False)
    assert all(np.array_equal(s[k], again[k]) for k in s)                      # seeded
    # with twins: the same renders, plus each state again with the clip's own blink
    tw = shut_eye_frames(corpus, "train", 32, every=5, clip_every=2, max_clips=None, seed=0, progress=False, twins=True)
    assert set(tw) == set(s) | {"open"} and all(np.array_equal(s[k], tw[k]) for k in s)
    for i in sorted(set(s["index"].tolist())):
        clip, mine = load_clip(corpus, ids[i]), s["index"] == i
        sub = {k: np.asarray(v)[s["at"][mine]] for k, v in clip.gt.items()}
        assert np.array_equal(tw["open"][mine], np.moveaxis(fit_size(rerender(clip.meta["identity"], sub, 32), 32), -1, 1))
    # rendered in parts, each with the draws the whole gives its clips: merged, the whole
    for n in (2, 3):
        parts = [shut_eye_frames(corpus, "train", 32, every=5, clip_every=2, max_clips=None, seed=0, progress=False,
                                 twins=True, part=(k, n)) for k in range(n)]
        assert all(len(p["index"]) < len(tw["index"]) for p in parts)
        merged = merge_parts(parts)
        assert set(merged) == set(tw) and all(np.array_equal(merged[k], tw[k]) for k in tw)
    with pytest.raises(ValueError, match="clip_every=0"):
        shut_eye_frames(corpus, "train", 32, every=5, clip_every=0, max_clips=None, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"part=\(2, 2\): expected \(k, n\) with 0 <= k < n"):
        shut_eye_frames(corpus, "train", 32, every=5, clip_every=2, max_clips=None, seed=0, progress=False, part=(2, 2))


def test_the_stage_loads_what_the_two_loaders_give_with_the_renders_made_in_a_second_process(corpus):
    r = _recipe("smoke")
    d, s = _stage_frames(corpus, 32, r, seed=4, progress=False)
    want_d = tokenizer_frames(corpus, "train", 32, r["dec_every"], r["max_clips"], False, expr=True)
    want_s = shut_eye_frames(corpus, "train", 32, r["dec_every"], r["dec_shut_clips"], r["max_clips"], 4, False,
                             twins=r["dec_mix"] > 0)
    assert r["dec_mix"] > 0 and "open" in s                                  # the smoke recipe mixes codes
    assert set(d) == set(want_d) and set(s) == set(want_s)
    assert all(np.array_equal(d[k], want_d[k], equal_nan=d[k].dtype.kind == "f") for k in d)
    assert all(np.array_equal(s[k], want_s[k]) for k in s)


def test_the_decoder_stage_keeps_every_code_and_trains_the_decoder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="follows the transformer's"):
        decoder_stage("smoke", corpus, out, progress=False)
    tokenizer_stage("smoke", corpus, out, progress=False)
    gpt_stage("smoke", corpus, out, progress=False)
    before = load_bundle(out)
    rep = decoder_stage("smoke", corpus, out, progress=False)
    after = load_bundle(out)                                      # hash and config checked
    assert rep["steps"] > 0 and rep["shut_frames"] > 0 and rep["frames"] > 0 and np.isfinite(rep["val_psnr"])
    assert rep["mix_prob"] == 0.5
    assert rep["encoder_sha256"] == encoder_digest(before.tokenizer) == encoder_digest(after.tokenizer)
    # the expression critic trained first (its minutes taken from the stage's), its term in the loss
    crit = rep["expression_critic"]
    assert rep["critic_weight"] == 1.0 and crit["steps"] > 0 and 0 <= crit["val_acc"] <= 1
    assert np.isfinite(crit["loss"]) and 0 < rep["critic"] <= 4       # the decoder's mean feature distance
    assert json.loads((out / "work" / "decoder" / "tokenizer_report.json").read_text())["expression_critic"] == crit
    tb, ta = before.tokenizer.state_dict(), after.tokenizer.state_dict()
    assert any(not torch.equal(tb[k], ta[k]) for k in tb if k.startswith("head."))   # the decoder trained
    for name in ("gpt", "audio"):                                 # the transformer and audio encoder kept
        b, a = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(b[k], a[k]) for k in b)
    clip = load_clip(corpus, list_clips(corpus, "val")[0])
    x = torch.from_numpy(np.moveaxis(fit_size(np.asarray(clip.frames[:6]), 32), -1, 1).copy())
    p = x[:1].expand(len(x), -1, -1, -1)
    with torch.no_grad():
        assert torch.equal(before.tokenizer.encode(x, p), after.tokenizer.encode(x, p))    # the same tokens
    card = json.loads((out / "model.json").read_text())
    assert card["recipe"] == "smoke" and set(card["training"]) >= {"tokenizer", "gpt", "decoder"}
    assert card["training"]["decoder"]["steps"] == rep["steps"]
    # run again (through the CLI): trained again from stage 1's decoder, not on top of its own
    assert main(["train", "decoder", "--recipe", "smoke", "--data", str(corpus), "--out", str(out), "--quiet"]) == 0
    assert "decoder stage of recipe smoke written to" in capsys.readouterr().out
    assert encoder_digest(load_bundle(out).tokenizer) == rep["encoder_sha256"]
    (out / "work" / "tokenizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has had its decoder stage"):
        decoder_stage("smoke", corpus, out, progress=False)
