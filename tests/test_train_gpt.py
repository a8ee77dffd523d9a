"""Transformer training: the loss, input corruption, and the two recipe stages end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

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
        # the initial head and embeddings are near zero: perturb them so what the model reads matters
        g = torch.Generator().manual_seed(3)
        for p in bundle.gpt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        logits = bundle.gpt.forward_train(toks, port, aud, cond, mask, prev_first=prev)
        want = F.cross_entropy(logits.flatten(0, 2), toks.flatten())
        # the loss sums per-digit CEs (code_nll): the same value, another order of float32 sums
        assert float(gpt_loss(bundle, b)) == pytest.approx(float(want), rel=1e-6)
        # full corruption: the inputs are other tokens (a different loss), the targets are not
        noisy = gpt_loss(bundle, b, corrupt=1.0, gen=torch.Generator().manual_seed(1))
        assert abs(float(noisy) - float(want)) > 1e-4     # float32 reordering is ~1e-6
        # the same generator state gives the same corrupted loss (reproducible training)
        assert torch.equal(noisy, gpt_loss(bundle, b, corrupt=1.0, gen=torch.Generator().manual_seed(1)))


def test_corruption_range_gives_each_window_its_own_fraction():
    from eartalk.model.train_gpt import corrupt_inputs
    V, B, T, N = 512, 64, 12, 64
    g = torch.Generator().manual_seed(0)
    toks, prev = torch.randint(0, V, (B, T, N), generator=g), torch.randint(0, V, (B, N), generator=g)
    same = corrupt_inputs(toks, prev, 0.0, V, g)
    assert same[0] is toks and same[1] is prev
    fixed, _ = corrupt_inputs(toks, prev, 0.5, V, g)
    share = (fixed != toks).float().mean(dim=(1, 2))            # per window, ~0.5 * (1 - 1/V)
    assert float((share - 0.5).abs().max()) < 0.06
    spread, spread_prev = corrupt_inputs(toks, prev, (0.0, 0.9), V, g)
    share = (spread != toks).float().mean(dim=(1, 2))
    assert float(share.min()) < 0.15 and float(share.max()) > 0.75 and float(share.max()) < 0.95
    # a window's previous frame is corrupted at that window's rate
    share_prev = (spread_prev != prev).float().mean(dim=1)
    assert float(np.corrcoef(share.numpy(), share_prev.numpy())[0, 1]) > 0.8
    with pytest.raises(ValueError, match="corrupt must be"):
        corrupt_inputs(toks, prev, (0.5, 0.2), V, g)


def test_portrait_share_of_corruption_takes_the_portrait_code_at_its_position():
    from eartalk.model.train_gpt import corrupt_inputs
    V, B, T, N = 512, 8, 12, 64
    g = torch.Generator().manual_seed(0)
    toks, prev = torch.randint(0, V, (B, T, N), generator=g), torch.randint(0, V, (B, N), generator=g)
    port = torch.randint(0, V, (B, N), generator=g)
    inp, prev_in = corrupt_inputs(toks, prev, 1.0, V, g, port, portrait_share=0.5)
    is_port = inp == port[:, None]
    # every input token replaced; about half by the portrait's own code at that position, the rest random
    # (a random code equals the portrait's 1 time in V)
    assert 0.45 < float(is_port.float().mean()) < 0.55
    assert 0.45 < float((prev_in == port).float().mean()) < 0.55
    assert float((inp == toks).float().mean()) < 0.01
    all_port, _ = corrupt_inputs(toks, prev, 1.0, V, g, port, portrait_share=1.0)
    assert torch.equal(all_port, port[:, None].expand_as(toks))
    with pytest.raises(ValueError, match="portrait tokens of shape"):
        corrupt_inputs(toks, prev, 1.0, V, g, None, portrait_share=0.5)
    with pytest.raises(ValueError, match="portrait_share must be"):
        corrupt_inputs(toks, prev, 1.0, V, g, port, portrait_share=1.5)


def test_training_audio_tokens_equal_the_per_frame_step():
    from eartalk.model.train_gpt import _audio_tokens
    bundle = new_bundle(preset("test"))
    cfg, enc = bundle.cfg, bundle.audio
    mel = torch.randn(200, cfg.n_mels, generator=torch.Generator().manual_seed(0))
    from eartalk.model.audio import SILENCE_LOG_MEL
    mpf, la, R = cfg.mels_per_frame, cfg.lookahead_frames, enc.receptive_field
    silence = torch.full((R, cfg.n_mels), SILENCE_LOG_MEL)
    padded = torch.cat([silence, mel, silence])
    with torch.no_grad():
        for start, T in ((0, 5), (7, 12), (45, 6)):   # at the clip's start, inside, past its end
            got = _audio_tokens(bundle, mel, start, T)
            for i in range(T):
                end = (start + i + 1 + la) * mpf      # frame t reads mel < (t + 1 + la) * mpf
                want = enc.step(padded[None, end:end + R])[0]   # mel[end - R:end]
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_change_weight_weights_the_tokens_that_differ_from_the_previous_frame():
    from eartalk.model.train_gpt import gpt_loss
    bundle = new_bundle(preset("test"))
    toks, prev, port, aud, cond, mask = _batch(bundle.cfg, T=5)
    keep = torch.rand(toks.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    for t in range(toks.shape[1]):      # about half the tokens repeat their previous frame's
        toks[:, t] = torch.where(keep[:, t], prev if t == 0 else toks[:, t - 1], toks[:, t])
    b = toks, prev, port, aud, cond, mask
    with torch.no_grad():
        ce = F.cross_entropy(bundle.gpt.forward_train(toks, port, aud, cond, mask, prev_first=prev).flatten(0, 2),
                             toks.flatten(), reduction="none").view(toks.shape)
        # by hand: frame 0's previous frame is ``prev``, frame t's is frame t-1
        changed = np.zeros(toks.shape, dtype=bool)
        for i in range(toks.shape[0]):
            for t in range(toks.shape[1]):
                before = prev[i] if t == 0 else toks[i, t - 1]
                changed[i, t] = (toks[i, t] != before).numpy()
        assert 0 < changed.mean() < 1
        w = np.where(changed, 4.0, 1.0)
        want = float((ce.numpy() * w).sum() / w.sum())
        assert float(gpt_loss(bundle, b, change_weight=4.0)) == pytest.approx(want, rel=1e-6)
        assert float(gpt_loss(bundle, b, change_weight=1.0)) == pytest.approx(float(ce.mean()), rel=1e-6)


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
    assert tok["samples"] == str(out / "work/tokenizer_samples.png")
    assert Image.open(tok["samples"]).format == "PNG"
    assert json.loads((out / "work/tokenizer_report.json").read_text())["val_psnr"] == tok["val_psnr"]
    rep = gpt_stage("smoke", corpus, out, progress=False)
    assert rep["steps"] > 0 and np.isfinite(rep["train_loss"]) and np.isfinite(rep["mouth_loss"])
    assert np.isfinite(rep["readout_loss"]) and rep["readout"]["held_out"]   # the smoke recipe's read-out term
    bundle = load_bundle(out)                       # hash and config checked
    # the smoke recipe trains refinement, a frame code and a decoder without the warp, with a pixel tail
    assert bundle.cfg == preset("test", refine=True, frame_codes=1, warp=False, pixel_tail=4)
    assert not hasattr(bundle.tokenizer, "coarse_flow") and not hasattr(bundle.tokenizer, "fine_flow")
    card = json.loads((out / "model.json").read_text())
    assert card["recipe"] == "smoke" and card["training"]["tokenizer"]["val_psnr"] == tok["val_psnr"]
    assert rep["budget_minutes"] == 0.3 and tok["budget_minutes"] == 1
    # a second run resumes from the checkpoint: its step count continues
    again = gpt_stage("smoke", corpus, out, progress=False)
    assert again["steps"] >= rep["steps"] and again["minutes"] >= rep["minutes"]
    # a larger budget resumes the finished stage and trains on to it (--budget-scale)
    longer = gpt_stage("smoke", corpus, out, progress=False, budget_scale=1.5)
    assert longer["budget_minutes"] == pytest.approx(0.45) and longer["steps"] > again["steps"]
    assert json.loads((out / "model.json").read_text())["training"]["gpt"]["steps"] == longer["steps"]


def test_a_step_limited_run_checkpoints_its_last_step_and_resumes_from_it(tmp_path):
    from eartalk.model.train_gpt import train_gpt
    cfg = preset("test")
    data = _clips(cfg)
    kw = dict(minutes=10.0, batch=2, T=6, progress=False)
    first = train_gpt(new_bundle(cfg, seed=0), data, [], tmp_path, max_steps=3, **kw)
    assert first["steps"] == 3          # 3 is not a multiple of the checkpoint interval: saved all the same
    assert torch.load(tmp_path / "gpt_ckpt.pt", weights_only=True)["step"] == 3
    more = train_gpt(new_bundle(cfg, seed=1), data, [], tmp_path, max_steps=5, **kw)
    assert more["steps"] == 5 and more["minutes"] >= first["minutes"]
    # nothing left to train: the resumed run reports what the checkpoint holds, time included
    idle = train_gpt(new_bundle(cfg, seed=2), data, [], tmp_path, max_steps=5, **kw)
    assert idle["steps"] == 5 and idle["minutes"] == more["minutes"] and idle["train_loss"] == more["train_loss"]


def test_a_deadline_shortens_the_schedule_but_not_below_a_quarter_of_the_budget(tmp_path):
    import time

    from eartalk.model.train_gpt import train_gpt
    cfg = preset("test")
    kw = dict(minutes=10.0, batch=2, T=6, progress=False, max_steps=2, resume=False)
    far = train_gpt(new_bundle(cfg, seed=0), _clips(cfg), [], tmp_path / "a", deadline=time.time() + 3600, **kw)
    assert far["schedule_minutes"] == 10.0 and far["steps"] == 2
    none = train_gpt(new_bundle(cfg, seed=0), _clips(cfg), [], tmp_path / "b", **kw)
    assert none["schedule_minutes"] == 10.0
    past = train_gpt(new_bundle(cfg, seed=0), _clips(cfg), [], tmp_path / "c", deadline=time.time() - 3600, **kw)
    assert past["schedule_minutes"] == 2.5 and past["steps"] == 2       # a quarter of the budget, still trained
    soon = train_gpt(new_bundle(cfg, seed=0), _clips(cfg), [], tmp_path / "d", deadline=time.time() + 240, **kw)
    assert 2.5 < soon["schedule_minutes"] <= 4.0


def _clips(cfg, n=3, seed=0):
    from eartalk.model.train_gpt import ClipTokens
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 20 + 7 * i
        gt = {"yaw": rng.uniform(-30, 30, T).astype(np.float32), "blink": rng.uniform(0, 1, T).astype(np.float32),
              "emotion": rng.integers(0, 5, T), "mouth_open": rng.uniform(0, 1, T).astype(np.float32),
              "viseme": rng.integers(0, 11, T)}
        out.append(ClipTokens(f"c{i}", rng.integers(0, cfg.codebook_size, (T, cfg.tokens_per_frame)).astype(np.int16),
                              rng.integers(0, cfg.codebook_size, cfg.tokens_per_frame).astype(np.int16),
                              rng.standard_normal((4 * T + 3, cfg.n_mels)).astype(np.float32), gt if i != 1 else {}))
    return out


def test_token_cache_round_trips_and_refuses_another_tokenizer_or_other_clips(tmp_path):
    from eartalk.model.train_gpt import load_tokens, save_tokens
    cfg = preset("test")
    data = _clips(cfg)
    path = tmp_path / "tokens_train.npz"
    save_tokens(path, data, "abc")
    back = load_tokens(path, "abc", ["c0", "c1", "c2"])
    assert [c.clip_id for c in back] == ["c0", "c1", "c2"]
    for a, b in zip(data, back):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.portrait, b.portrait)
        assert np.array_equal(a.mel, b.mel)
        assert sorted(a.gt) == sorted(b.gt)
        for k in a.gt:
            assert np.array_equal(np.asarray(a.gt[k]), b.gt[k]) and b.gt[k].dtype == np.asarray(a.gt[k]).dtype
    assert load_tokens(path, "other tokenizer", ["c0", "c1", "c2"]) is None
    assert load_tokens(path, "abc", ["c0", "c1"]) is None
    assert load_tokens(tmp_path / "absent.npz", "abc", []) is None
    # a cache of the first format (no mouth ground truth) is stale: tokenize again
    old = {k: v for k, v in np.load(path, allow_pickle=False).items() if k != "version"}
    np.savez(tmp_path / "v1.npz", **old)
    assert load_tokens(tmp_path / "v1.npz", "abc", ["c0", "c1", "c2"]) is None


def test_windows_at_a_clips_start_read_the_portrait_as_their_previous_frame():
    from eartalk.model.train_gpt import make_batch
    bundle = new_bundle(preset("test"))
    data = _clips(bundle.cfg)
    toks, prev, port, *_ = make_batch(bundle, data, 6, 5, 0.0, np.random.default_rng(0), start_prob=1.0)
    for i in range(6):
        clip = next(c for c in data if np.array_equal(c.portrait, port[i].numpy()))
        assert np.array_equal(prev[i].numpy(), clip.portrait)
        assert np.array_equal(toks[i].numpy(), clip.tokens[:5])
    # uniform cuts read the frame before the window
    toks, prev, port, *_ = make_batch(bundle, data, 6, 5, 0.0, np.random.default_rng(1), start_prob=0.0)
    for i in range(6):
        clip = next(c for c in data if np.array_equal(c.portrait, port[i].numpy()))
        s = next(s for s in range(len(clip.tokens) - 4) if np.array_equal(clip.tokens[s:s + 5], toks[i].numpy()))
        assert np.array_equal(prev[i].numpy(), clip.tokens[s - 1] if s else clip.portrait)


def test_batches_carry_the_mouth_ground_truth_of_their_frames():
    from eartalk.model.train_gpt import MOUTH_GT, make_batch
    bundle = new_bundle(preset("test"))
    data = _clips(bundle.cfg)
    b = make_batch(bundle, data, 8, 5, 0.0, np.random.default_rng(0))
    assert b.mouth.shape == (8, 5, len(MOUTH_GT)) and b.viseme.shape == (8, 5)
    j = MOUTH_GT.index("mouth_open")
    seen_gt = seen_none = 0
    for i in range(8):
        clip = next(c for c in data if np.array_equal(c.portrait, b.portrait[i].numpy()))
        s = next(s for s in range(len(clip.tokens) - 4) if np.array_equal(clip.tokens[s:s + 5], b.tokens[i].numpy()))
        if clip.gt:
            seen_gt += 1
            assert np.array_equal(b.mouth[i, :, j].numpy(), clip.gt["mouth_open"][s:s + 5])
            assert np.array_equal(b.viseme[i].numpy(), clip.gt["viseme"][s:s + 5])
            others = [k for k in range(len(MOUTH_GT)) if k != j]   # not in this clip's ground truth
            assert torch.isnan(b.mouth[i][:, others]).all()
        else:
            seen_none += 1
            assert torch.isnan(b.mouth[i]).all() and (b.viseme[i] == -1).all()
    assert seen_gt and seen_none


def test_mouth_loss_is_scaled_mse_plus_viseme_cross_entropy_over_known_frames():
    from eartalk.model.train_gpt import MouthHead, make_batch, mouth_loss
    bundle = new_bundle(preset("test"))
    b = make_batch(bundle, _clips(bundle.cfg), 8, 5, 0.0, np.random.default_rng(0))
    head = MouthHead(bundle.cfg)
    with torch.no_grad():
        params, logits = head(b.audio)
        known, vk = ~torch.isnan(b.mouth), b.viseme >= 0
        want = 10 * ((params[known] - b.mouth[known]) ** 2).mean() + F.cross_entropy(logits[vk], b.viseme[vk])
        assert float(mouth_loss(head, b)) == pytest.approx(float(want), rel=1e-6)
        # no ground truth at all (the user's own videos): no loss, and no NaN
        bare = b._replace(mouth=torch.full_like(b.mouth, float("nan")), viseme=torch.full_like(b.viseme, -1))
        assert float(mouth_loss(head, bare)) == 0.0


def test_plausible_corruption_takes_same_position_codes_of_another_window():
    """With ``plausible``, every replaced token is the code at the same position of the next-rolled
    window (some frame of it), never a code that window does not hold there; without it, the
    replacements are uniform codes (outside the batch's codes here)."""
    from eartalk.model.train_gpt import corrupt_inputs
    B, T, N = 4, 6, 5
    toks = (torch.arange(B)[:, None, None] * 100 + torch.arange(T)[None, :, None] * 10
            + torch.arange(N)[None, None, :])                         # unique code per (window, frame, pos)
    prev = toks[:, 0] + 1000
    g = torch.Generator().manual_seed(0)
    inp, prev_in = corrupt_inputs(toks, prev, 1.0, 4096, g, plausible=True)
    other = toks.roll(1, dims=0)
    for b in range(B):
        for t in range(T):
            for i in range(N):
                assert int(inp[b, t, i]) in set(other[b, :, i].tolist())
    assert torch.equal(prev_in, prev.roll(1, dims=0))
    rnd, _ = corrupt_inputs(toks, prev, 1.0, 4096, torch.Generator().manual_seed(0))
    assert (rnd >= 400).float().mean() > 0.8                       # uniform codes of 4096


def test_stale_history_is_the_clips_own_frames_lagged_or_frozen():
    """Frame i of the toy clip holds code i everywhere and the portrait code -1, so a window's
    stale inputs spell out which frames they are: one frame s-1-k (frozen) or s+t-k (lagged)."""
    from eartalk.model.train_gpt import stale_history
    n, N, T, L = 40, 3, 5, 6
    tokens = np.repeat(np.arange(n)[:, None], N, axis=1)
    portrait = np.full(N, -1)
    at = lambda i: min(i, n - 1) if i >= 0 else -1   # noqa: E731
    rng = np.random.default_rng(0)
    modes = set()
    for _ in range(200):
        s = int(rng.integers(0, n - T + 1))
        inp, prev = stale_history(tokens, portrait, s, T, L, rng)
        assert inp.shape == (T, N) and prev.shape == (N,)
        assert (inp == inp[:, :1]).all() and (prev == prev[0]).all()   # whole frames, never mixed
        frames = inp[:, 0]
        if (frames == prev[0]).all():
            k = next(k for k in range(L + 1) if at(s - 1 - k) == prev[0])
            modes.add("frozen")
        else:
            k = next(k for k in range(1, L + 1) if [at(s + t - k) for t in range(T)] == frames.tolist())
            assert prev[0] == at(s - 1 - k)
            modes.add("lagged")
    assert modes == {"frozen", "lagged"}
    with pytest.raises(ValueError, match="max_lag"):
        stale_history(tokens, portrait, 3, T, 0, rng)


def test_stale_windows_read_the_stale_history_and_are_scored_on_their_own_frames():
    from eartalk.model.train_gpt import gpt_loss, make_batch
    bundle = new_bundle(preset("test"))
    b = make_batch(bundle, _clips(bundle.cfg), 4, 5, 0.0, np.random.default_rng(0), max_lag=3)
    assert b.stale.shape == b.tokens.shape and b.stale_prev.shape == b.prev.shape
    with torch.no_grad():
        logits = bundle.gpt.forward_train(b.stale, b.portrait, b.audio, b.cond, b.mask, prev_first=b.stale_prev)
        want = F.cross_entropy(logits.flatten(0, 2), b.tokens.flatten())
        assert float(gpt_loss(bundle, b, stale_prob=1.0)) == pytest.approx(float(want), rel=1e-6)
        assert torch.equal(gpt_loss(bundle, b, stale_prob=0.0), gpt_loss(bundle, b))


def test_draft_mask_drafts_a_share_of_windows_with_maskgit_hidden_fractions():
    from eartalk.model.train_gpt import draft_mask
    known = draft_mask(4000, 2, 64, 0.5, torch.Generator().manual_seed(0))
    drafted = known.any(dim=(1, 2))
    assert known.shape == (4000, 2, 64) and known.dtype == torch.bool
    assert abs(drafted.float().mean().item() - 0.5) < 0.03
    # hidden share r = cos(pi/2 u), u ~ U(0,1): mean 2/pi; frames draw their own r
    hidden = (~known[drafted]).float().mean(-1)
    assert abs(hidden.mean().item() - 2 / np.pi) < 0.02
    assert hidden.std().item() > 0.2
    assert not draft_mask(50, 2, 64, 0.0, torch.Generator().manual_seed(0)).any()
    with pytest.raises(ValueError, match="draft_prob must be in"):
        draft_mask(2, 2, 4, 1.5)


def test_drafted_windows_read_their_known_targets_and_are_scored_on_the_hidden_ones():
    from eartalk.model.train_gpt import draft_mask, gpt_loss
    bundle = new_bundle(preset("test", refine=True))
    with torch.no_grad():
        for p in bundle.gpt.parameters():          # an untrained head is ~0: make the inputs matter
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    toks, prev, port, aud, cond, mask = b = _batch(bundle.cfg, B=3, T=4)
    known = draft_mask(*toks.shape, 1.0, torch.Generator().manual_seed(7))   # the draw gpt_loss makes
    assert known.any() and (~known).any()
    with torch.no_grad():
        ce = F.cross_entropy(bundle.gpt.forward_train(toks, port, aud, cond, mask, prev_first=prev, draft=toks,
                                                      draft_known=known).flatten(0, 2),
                             toks.flatten(), reduction="none").view(toks.shape)
        before = torch.cat([prev[:, None], toks[:, :-1]], dim=1)
        w = torch.where(toks != before, 3.0, 1.0) * (~known)
        want = float((ce * w).sum() / w.sum())
        got = gpt_loss(bundle, b, gen=torch.Generator().manual_seed(7), change_weight=3.0, draft_prob=1.0)
        assert float(got) == pytest.approx(want, rel=1e-6)
        plain = float(gpt_loss(bundle, b, change_weight=3.0))
        assert abs(plain - want) > 1e-3                 # the draft and the scoring did change the loss
    with pytest.raises(ValueError, match="refine=True"):
        gpt_loss(new_bundle(preset("test")), b, draft_prob=0.5)


def test_the_readout_term_trains_the_transformer_through_its_expected_codes_and_resumes_with_its_readout(tmp_path):
    from eartalk.model.control_readout import digit_values, expected_digit_values, readout_loss
    from eartalk.model.train_gpt import gpt_loss, make_batch, train_gpt
    cfg = preset("test")
    data = _clips(cfg)
    kw = dict(minutes=10.0, batch=2, T=6, progress=False, readout_weight=1.0, readout_steps=20)
    first = train_gpt(new_bundle(cfg, seed=0), data, [], tmp_path, max_steps=3, **kw)
    ro = first["readout"]
    assert ro["steps"] == 20 and not ro["held_out"] and ro["train_frames"] == 20 + 34   # clip 1 has no ground truth
    assert np.isfinite(first["readout_loss"])
    st = torch.load(tmp_path / "gpt_ckpt.pt", weights_only=True)
    assert json.loads(st["readout_report"]) == ro
    # resumed: the same read-out from the checkpoint, not a new fit
    more = train_gpt(new_bundle(cfg, seed=1), data, [], tmp_path, max_steps=5, **kw)
    assert more["steps"] == 5 and more["readout"] == ro
    again = torch.load(tmp_path / "gpt_ckpt.pt", weights_only=True)
    assert all(torch.equal(again["readout"][k], v) for k, v in st["readout"].items())
    # the term reaches the transformer: its gradient on the output head is not zero
    from eartalk.model.control_readout import ControlReadout
    bundle, head = new_bundle(cfg, seed=0), ControlReadout(cfg)
    head.load_state_dict(st["readout"])
    b = make_batch(bundle, data, 2, 4, 0.0, np.random.default_rng(0))
    ce, digits = gpt_loss(bundle, b, return_digits=True)
    assert torch.allclose(ce, gpt_loss(bundle, b))
    loss = readout_loss(head, expected_digit_values(digits, head.levels), digit_values(b.portrait, head.levels),
                        b.cond, b.mask)
    loss.backward()
    assert bundle.gpt.ln_f.weight.grad.abs().sum() > 0


def test_without_control_ground_truth_the_readout_term_is_skipped_with_a_warning(tmp_path):
    from eartalk.model.train_gpt import train_gpt
    cfg = preset("test")
    data = [c for c in _clips(cfg) if not c.gt]          # a user's video: no ground truth at all
    with pytest.warns(UserWarning, match="no training clip has control ground truth"):
        rep = train_gpt(new_bundle(cfg), data, [], tmp_path, minutes=10.0, max_steps=2, batch=2, T=6,
                        progress=False, readout_weight=1.0)
    assert rep["steps"] == 2 and rep["readout"] is None and rep["readout_loss"] is None
    assert "readout" not in torch.load(tmp_path / "gpt_ckpt.pt", weights_only=True)


def test_a_readout_term_ramped_in_after_the_stage_ends_leaves_the_transformer_as_trained_without_it(tmp_path):
    from eartalk.model.train_gpt import train_gpt
    cfg = preset("test")
    data = _clips(cfg)
    # the learning rate follows the wall clock (cosine over the budget): a budget of ~2 years keeps
    # cos(pi * elapsed / budget) at 1 to float64 precision, so the two runs' steps see the same rate
    # however long each took (10 minutes let a loaded CPU's slower steps move the rate by ~1e-5)
    kw = dict(minutes=1e6, max_steps=3, batch=2, T=6, progress=False, readout_steps=20)
    plain, late = new_bundle(cfg, seed=0), new_bundle(cfg, seed=0)
    torch.manual_seed(0)
    train_gpt(plain, data, [], tmp_path / "plain", **kw)
    torch.manual_seed(0)
    rep = train_gpt(late, data, [], tmp_path / "late", readout_weight=1.0, readout_ramp=(1.0, 1.0), **kw)
    assert rep["readout"]["steps"] == 20 and rep["readout_loss"] is None      # fitted, never weighed in
    assert all(torch.equal(a, b) for a, b in zip(plain.gpt.state_dict().values(), late.gpt.state_dict().values()))
    on = new_bundle(cfg, seed=0)
    torch.manual_seed(0)
    rep = train_gpt(on, data, [], tmp_path / "on", readout_weight=1.0, readout_ramp=(0.0, 0.0), **kw)
    assert np.isfinite(rep["readout_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(plain.gpt.state_dict().values(), on.gpt.state_dict().values()))
