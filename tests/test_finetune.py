"""Fine-tuning a trained bundle on one person's videos (eartalk.model.finetune, `eartalk train --from`)."""
import json

import numpy as np
import pytest
import torch

from eartalk.data.corpus import list_clips, load_clip
from eartalk.data.user_videos import import_user_videos
from eartalk.data.video_io import write_mp4
from eartalk.model.bundle import load_bundle, new_bundle, save_bundle
from eartalk.model.config import preset
from eartalk.model.finetune import (decoder_stage, encoder_digest, gpt_stage, mix_clips, run_finetune)
from eartalk.model.tokenizer import VQTokenizer
from eartalk.model.train_gpt import ClipTokens

SCALE = 0.003     # the fine-tune's 8 + 15 minutes -> about 1.4 + 2.7 seconds


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A base bundle (the test preset, random weights: what is tested is what the stages keep and
    change), a synthetic corpus to mix in, and 'the user's videos' imported from mp4 files."""
    from eartalk.data.synth import synthesize_corpus
    root = tmp_path_factory.mktemp("ft")
    base = save_bundle(new_bundle(preset("test"), seed=1), root / "base", recipe="smoke")
    mix = root / "mix"
    synthesize_corpus(mix, 6, seed=3, size=32, workers=1, progress=False)
    videos = root / "videos"
    videos.mkdir()
    for cid in list_clips(mix)[:3]:   # frames and speech of a synthetic clip, as a user's mp4 (no ground truth)
        c = load_clip(mix, cid)
        write_mp4(videos / f"{cid}.mp4", np.asarray(c.frames), c.audio)
    mine = root / "mine"
    import_user_videos(videos, mine, size=32, val_fraction=0.34)
    assert list_clips(mine, "train") and list_clips(mine, "val")
    return base, mix, mine


def _clip(i):
    return ClipTokens(f"c{i}", np.zeros((4, 4), np.int16), np.zeros(4, np.int16), np.zeros((8, 80), np.float32), {})


def test_mix_clips_repeats_the_users_clips_to_the_asked_share():
    user, syn = [_clip(i) for i in range(3)], [_clip(10 + i) for i in range(12)]
    half = mix_clips(user, syn, 0.5)
    assert len(half) == 24 and half[:12] == user * 4 and half[12:] == syn    # 12 of 24 draws synthetic
    quarter = mix_clips(user, syn, 0.25)                                     # r = round(12 * .75 / (.25 * 3)) = 12
    assert len(quarter) == 48 and sum(c in syn for c in quarter) == 12
    assert mix_clips(user, syn, 0.0) == user and mix_clips(user, [], 0.5) == user
    assert mix_clips(user * 10, syn, 0.9) == user * 10 + syn                 # at least one copy of each
    with pytest.raises(ValueError, match="mix share"):
        mix_clips(user, syn, 1.0)


def test_encoder_digest_follows_the_encoder_and_ignores_the_decoder():
    tok = VQTokenizer(preset("test"))
    d = encoder_digest(tok)
    with torch.no_grad():
        tok.head.weight.add_(1.0)
        tok.ref_encoder[1].weight.add_(1.0)
    assert encoder_digest(tok) == d
    with torch.no_grad():
        tok.encoder[1].weight[0, 0, 0, 0] += 1e-3
    assert encoder_digest(tok) != d


def test_the_decoder_stage_trains_every_part_that_is_not_the_encoder():
    """_freeze_encoder leaves trainable exactly the weights outside the encoder (and the training-only
    heads), the pixel tail among them: a part missing from DECODER_PARTS would stay untrained."""
    from eartalk.model.finetune import _freeze_encoder
    tok = VQTokenizer(preset("test", frame_codes=1, pixel_tail=4))
    trainable = set(_freeze_encoder(tok))
    frozen = {n for n, _ in tok.named_parameters()} - trainable
    assert {n.split(".")[0] for n in frozen} == {"encoder", "frame_head", "frame_emotion", "state_head"}
    assert {"tail.1.weight", "tail.5.bias"} <= trainable


def test_fine_tune_keeps_the_codes_trains_the_decoder_and_transformer_and_names_its_base(dirs, tmp_path):
    base, mix, mine = dirs
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="run the decoder stage first"):
        gpt_stage(base, mine, out, mix, progress=False, budget_scale=SCALE)
    before = load_bundle(base)
    dec = decoder_stage(base, mine, out, mix, progress=False, budget_scale=SCALE)
    assert dec["steps"] > 0 and dec["frames"] > 0 and dec["mix_frames"] > 0
    assert np.isfinite(dec["val_psnr_before"]) and np.isfinite(dec["val_psnr"])
    assert json.loads((out / "work/tokenizer_report.json").read_text())["val_psnr"] == dec["val_psnr"]
    tok = VQTokenizer.load(str(out / "work/tokenizer.safetensors"))
    old, new = before.tokenizer.state_dict(), tok.state_dict()
    for k in old:     # the encoder bit for bit, the decoder moved
        if k.startswith("encoder."):
            assert torch.equal(old[k], new[k]), k
    assert not torch.equal(old["head.weight"], new["head.weight"])
    assert not torch.equal(old["ref_encoder.1.weight"], new["ref_encoder.1.weight"])
    # the decoder stage alone is a complete model: the base transformer with the new decoder
    dec_only = load_bundle(out)
    assert all(torch.equal(a, b) for a, b in zip(before.gpt.state_dict().values(), dec_only.gpt.state_dict().values()))
    assert torch.equal(dec_only.tokenizer.state_dict()["head.weight"], new["head.weight"])
    training = json.loads((out / "model.json").read_text())["training"]
    assert training.keys() == {"decoder"} and training["decoder"]["val_psnr"] == dec["val_psnr"]

    rep = gpt_stage(base, mine, out, mix, progress=False, budget_scale=SCALE)
    assert rep["steps"] > 0 and rep["user_clips"] == len(list_clips(mine, "train"))
    assert rep["mix_clips"] == len(list_clips(mix, "train"))
    ft = load_bundle(out)                                    # hash and config checked
    assert ft.cfg == before.cfg
    assert any(not torch.equal(a, b) for a, b in zip(before.gpt.state_dict().values(), ft.gpt.state_dict().values()))
    card = json.loads((out / "model.json").read_text())
    assert card["recipe"] == "finetune" and card["finetuned_from"]["sha256"] == before.meta["sha256"]
    assert card["training"]["decoder"]["val_psnr"] == dec["val_psnr"] and card["training"]["gpt"]["steps"] == rep["steps"]
    # the same frames give the same tokens under the fine-tuned tokenizer as under the base
    clip = load_clip(mine, list_clips(mine, "train")[0])
    x = torch.from_numpy(np.asarray(clip.frames)).permute(0, 3, 1, 2)
    p = x[:1].expand(len(x), -1, -1, -1)
    assert torch.equal(ft.tokenizer.encode(x, p), before.tokenizer.encode(x, p))
    # a second run resumes the transformer stage from its checkpoint
    again = gpt_stage(base, mine, out, mix, progress=False, budget_scale=SCALE)
    assert again["steps"] >= rep["steps"]


def test_a_tokenizer_with_another_encoder_is_refused(dirs, tmp_path):
    base, mix, mine = dirs
    out = tmp_path / "run"
    (out / "work").mkdir(parents=True)
    other = VQTokenizer(preset("test"))     # another initialisation: other codes
    other.save(str(out / "work/tokenizer.safetensors"))
    with pytest.raises(ValueError, match="its encoder is not the one of"):
        gpt_stage(base, mine, out, mix, progress=False, budget_scale=SCALE)
    with pytest.raises(ValueError, match="a decoder stage of another model"):
        run_finetune(base, mine, out, mix, progress=False, budget_scale=SCALE)


def test_without_a_mix_corpus_the_transformer_stage_warns_that_controls_may_weaken(dirs, tmp_path):
    base, _, mine = dirs
    rep = run_finetune(base, mine, tmp_path / "run", None, progress=False, budget_scale=SCALE)
    assert "gpt" not in rep and rep["tokenizer"]["mix_frames"] == 0     # the decoder stage alone by default
    with pytest.warns(UserWarning, match="no --mix corpus"):
        rep = run_finetune(base, mine, tmp_path / "run", None, progress=False, budget_scale=SCALE, transformer=True)
    assert "tokenizer" not in rep and rep["gpt"]["mix_clips"] == 0 and load_bundle(tmp_path / "run")


def test_cli_fine_tunes_and_refuses_mixed_up_flags(dirs, tmp_path, capsys):
    from eartalk.cli import main
    base, mix, mine = dirs
    out = tmp_path / "cli"
    assert main(["train", "--from", str(base), "--data", str(mine), "--mix", str(mix), "--out", str(out),
                 "--budget-scale", str(SCALE), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"fine-tune of {base} (decoder stage)" in printed and "held-out PSNR of the tokenizer" in printed
    assert json.loads((out / "model.json").read_text())["training"].keys() == {"decoder"}
    assert main(["train", "gpt", "--from", str(base), "--data", str(mine), "--mix", str(mix), "--out", str(out),
                 "--budget-scale", str(SCALE), "--quiet"]) == 0
    assert json.loads((out / "model.json").read_text())["training"].keys() == {"decoder", "gpt"}
    capsys.readouterr()
    cases = [(["--mix", str(mix), "--recipe", "smoke"], "--mix goes with --from"),
             (["--from", str(base), "--recipe", "smoke"], "choose one"),
             (["probe", "--from", str(base)], "the probe trains from scratch"),
             (["--from", str(base), "--mix", str(tmp_path)], "is not a corpus"),
             (["--from", str(tmp_path / "nothing")], "is not a model directory")]
    for extra, msg in cases:
        assert main(["train", "--data", str(mine), "--out", str(tmp_path / "x"), "--quiet", *extra]) == 2, extra
        assert msg in capsys.readouterr().err, extra
