"""The control read-out: digit values, targets from the conditions, its loss, and that it learns
to read a control that the codes carry."""
import numpy as np
import pytest
import torch

from eartalk.model.conditions import encode_controls
from eartalk.model.config import preset
from eartalk.model.control_readout import (NUMERIC, NUMERIC_SCALE, ControlReadout, digit_values,
                                           expected_digit_values, readout_loss, readout_targets, train_readout)


def test_digit_values_map_each_digit_onto_minus_one_to_one():
    # levels (4, 4): code = d0 + 4 d1
    got = digit_values(torch.tensor([0, 1, 6, 15]), (4, 4))
    want = torch.tensor([[-1, -1], [-1 / 3, -1], [1 / 3, -1 / 3], [1, 1]])
    assert torch.allclose(got, want)


def test_expected_digit_values_of_a_peaked_softmax_are_its_codes_and_of_a_flat_one_the_middle():
    levels = (4, 2)
    codes = torch.tensor([0, 5, 7])                                   # digits (0,0) (1,1) (3,1)
    logits = torch.full((3, 6), -1e4)
    d = torch.stack([codes % 4, codes // 4], -1)
    logits[torch.arange(3), d[:, 0]] = 0.0
    logits[torch.arange(3), 4 + d[:, 1]] = 0.0
    assert torch.allclose(expected_digit_values(logits, levels), digit_values(codes, levels))
    assert torch.allclose(expected_digit_values(torch.zeros(2, 6), levels), torch.zeros(2, 2), atol=1e-6)
    # two equally likely neighbouring digits: their mean
    two = torch.full((1, 6), -1e4)
    two[0, [1, 2, 4]] = 0.0
    assert torch.allclose(expected_digit_values(two, levels), torch.tensor([[0.0, -1.0]]), atol=1e-6)


def test_targets_are_the_pinned_values_as_the_conditions_hold_them():
    cond, mask = encode_controls({"yaw": 15.0, "gaze_x": -0.5, "emotion": "happy"})
    values, pinned, emo = readout_targets(torch.from_numpy(cond), torch.from_numpy(mask))
    assert NUMERIC == ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink")
    assert values.tolist() == [0.5, 0.0, 0.0, -0.5, 0.0, 0.0]
    assert pinned.tolist() == [True, True, True, True, True, False]   # blink not given: free
    assert int(emo) == 1
    cond, mask = encode_controls({"blink": 0.25})
    values, pinned, emo = readout_targets(torch.from_numpy(cond), torch.from_numpy(mask))
    assert pinned.tolist() == [False] * 5 + [True] and values[5] == 0.25 and int(emo) == -1
    with pytest.raises(ValueError, match="expected cond"):
        readout_targets(torch.zeros(3, 16), torch.zeros(3, dtype=torch.bool))


def test_loss_counts_only_pinned_controls():
    cfg = preset("test")
    torch.manual_seed(0)
    head = ControlReadout(cfg)
    N, D = cfg.tokens_per_frame, len(head.levels)
    vals, port = torch.rand(1, 2, N, D) * 2 - 1, torch.rand(1, N, D) * 2 - 1
    cond0, _ = encode_controls({})
    free = torch.from_numpy(np.stack([cond0, cond0]))[None]
    none = torch.zeros(1, 2, cfg.cond_tokens, dtype=torch.bool)
    assert readout_loss(head, vals, port, free, none).item() == 0.0
    # yaw pinned on frame 0 only: the scaled squared error of that one output
    c, m = encode_controls({"yaw": 15.0})
    cond = torch.from_numpy(np.stack([c, cond0]))[None]
    mask = torch.zeros(1, 2, cfg.cond_tokens, dtype=torch.bool)
    mask[0, 0] = torch.from_numpy(m)
    y = head(vals[0], port.expand(2, -1, -1))
    want = NUMERIC_SCALE * ((y[0, :3] - torch.tensor([0.5, 0.0, 0.0])) ** 2).mean()
    assert torch.allclose(readout_loss(head, vals, port, cond, mask), want)
    with pytest.raises(ValueError, match="digit values"):
        head(torch.zeros(2, N + 1, D), torch.zeros(2, N + 1, D))


def _clips_carrying_yaw(cfg, n, seed):
    """Clips whose token 0 is the yaw bin (16 bins over -30..30) and every other token random."""
    from eartalk.model.train_gpt import ClipTokens
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 40
        yaw = rng.uniform(-30, 30, T).astype(np.float32)
        toks = rng.integers(0, cfg.codebook_size, (T, cfg.tokens_per_frame))
        toks[:, 0] = np.clip(((yaw + 30) / 60 * 16).astype(int), 0, 15)
        out.append(ClipTokens(f"c{i}", toks.astype(np.int16), rng.integers(0, 16, cfg.tokens_per_frame).astype(np.int16),
                              np.zeros((4, cfg.n_mels), np.float32), {"yaw": yaw}))
    out.append(ClipTokens("user", out[0].tokens, out[0].portrait, out[0].mel, {}))   # no ground truth: skipped
    return out


def test_the_readout_learns_a_control_the_codes_carry_and_is_frozen():
    cfg = preset("test")                      # 16 codes: digits (4, 4), a 2x2 grid
    head, rep = train_readout(cfg, _clips_carrying_yaw(cfg, 8, 0), _clips_carrying_yaw(cfg, 3, 1), steps=300,
                              batch=64, progress=False)
    assert rep["held_out"] and rep["train_frames"] == 8 * 40 and rep["frames"] == 3 * 40
    # the yaw bin is 3.75 degrees wide: read to within about a bin, where the mean is ~15 off
    assert rep["mae_of_the_mean"]["yaw"] > 12.0
    assert rep["mae"]["yaw"] < 4.0
    assert all(not p.requires_grad for p in head.parameters()) and not head.training
    with pytest.raises(ValueError, match="ground truth"):
        train_readout(cfg, _clips_carrying_yaw(cfg, 1, 0)[-1:], steps=1, progress=False)
