"""The expression critic: its features, its distance, its training, and its term in the tokenizer's loss."""
import numpy as np
import pytest
import torch

from eartalk.model.config import EMOTIONS, preset
from eartalk.model.expression_critic import (BLINK_COL, WIDTHS, ExpressionCritic, blink_values, critic_accuracy,
                                             emotion_labels, train_critic)
from eartalk.model.face_state import EMOTION_COLS, STATE_DIM
from eartalk.model.tokenizer import VQTokenizer


def coloured_frames(n, size=32, seed=0):
    """uint8 ``[n, 3, size, size]`` frames whose label is which of five colours a square patch has,
    on noise: a task any working classifier learns."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230]], np.uint8)
    labels = rng.integers(0, len(EMOTIONS), n)
    f = rng.integers(90, 160, (n, 3, size, size)).astype(np.uint8)
    for j, k in enumerate(labels):
        f[j, :, size // 4: size // 2, size // 4: size // 2] = colours[k][:, None, None]
    return f, labels


@pytest.mark.parametrize("read", [64, 32])
def test_features_are_unit_vectors_per_pixel_at_each_block_read_at_the_size_asked(read):
    torch.manual_seed(0)
    c = ExpressionCritic(128, read).eval()
    x = torch.rand(2, 3, 128, 128)
    fs = c.features(x)
    assert [tuple(f.shape) for f in fs] == [(2, w, read >> j, read >> j) for j, w in enumerate(WIDTHS)]
    for f in fs:
        torch.testing.assert_close(f.pow(2).sum(1), torch.ones(f.shape[0], *f.shape[2:]), atol=1e-4, rtol=0)
    assert tuple(c(x).shape) == (2, len(EMOTIONS))
    # reading at `read` is reading the frame average-pooled to it
    small = ExpressionCritic(read, read).eval()
    small.load_state_dict(c.state_dict())
    torch.testing.assert_close(c(x), small(torch.nn.functional.avg_pool2d(x, 128 // read)))


def test_distance_is_zero_for_the_same_frame_and_sends_gradients_to_the_reconstruction_only():
    torch.manual_seed(0)
    c = ExpressionCritic(32, 32).eval()
    x = torch.rand(3, 3, 32, 32)
    assert float(c.distance(x.clone(), x).detach()) == pytest.approx(0.0, abs=1e-9)
    r = (x + 0.2 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    t = x.clone().requires_grad_(True)
    d = c.distance(r, t)
    by_hand = sum((a - b).pow(2).sum(1).mean() for a, b in zip(c.features(r), c.features(x))) / len(WIDTHS)
    torch.testing.assert_close(d, by_hand)
    assert 0 < float(d.detach()) <= 4
    d.backward()
    assert r.grad is not None and r.grad.abs().sum() > 0 and t.grad is None
    # uint8 frames read as [0, 1]
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(c(u8), c(u8.float() / 255))


def test_bad_shapes_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="multiple of 16"):
        ExpressionCritic(128, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        ExpressionCritic(96, 64)
    c = ExpressionCritic(32, 32)
    with pytest.raises(ValueError, match=r"expected \[B, 3, 32, 32\]"):
        c(torch.rand(1, 3, 64, 64))
    f, lab = coloured_frames(8)
    with pytest.raises(ValueError, match="expected -1"):
        train_critic(f, np.full(8, 7), minutes=1, steps=1, read_size=32, progress=False)
    with pytest.raises(ValueError, match="no frame has a known emotion or blink"):
        train_critic(f, np.full(8, -1), np.full(8, np.nan), minutes=1, steps=1, read_size=32, progress=False)
    with pytest.raises(ValueError, match=r"expected \[M, 3, S, S\], \[M\] and \[M\]"):
        train_critic(f, lab[:4], minutes=1, steps=1, read_size=32, progress=False)
    with pytest.raises(ValueError, match=r"closures in \[0, 1\]"):
        train_critic(f, lab, np.full(8, 1.5), minutes=1, steps=1, read_size=32, progress=False)


def test_the_critic_learns_emotion_and_blink_and_leaves_unknown_labels_out():
    f, lab = coloured_frames(400)
    vf, vl = coloured_frames(100, seed=1)
    # the blink: a dark bar across the top rows, closure = its share of the width
    rng = np.random.default_rng(2)
    def bars(frames):
        b = rng.uniform(0, 1, len(frames)).astype(np.float32)
        for j, v in enumerate(b):
            frames[j, :, :4, : int(round(v * frames.shape[-1]))] = 0
        return b
    bl, vb = bars(f), bars(vf)
    lab_half, bl_half = lab.copy(), bl.copy()
    lab_half[::2] = -1                            # half the frames without an emotion,
    bl_half[1::4] = np.nan                        # a quarter without a blink
    critic, m = train_critic(f, lab_half, bl_half, minutes=5, steps=200, batch=32, read_size=32, val=(vf, vl, vb),
                             progress=False)
    assert m["steps"] == 200 and m["val_acc"] >= 0.95 and m["val_blink_acc"] >= 0.9
    assert (m["val_acc"], m["val_blink_acc"]) == critic_accuracy(critic, vf, vl, vb)
    assert not any(p.requires_grad for p in critic.parameters()) and not critic.training
    # an unknown label is left out of the accuracy; none known -> NaN
    vl2, vb2 = vl.copy(), vb.copy()
    vl2[:50], vb2[:30] = -1, np.nan
    emo, blink = critic.heads(torch.from_numpy(vf))
    acc, bacc = critic_accuracy(critic, vf, vl2, vb2)
    assert acc == pytest.approx((emo[50:].argmax(1).numpy() == vl[50:]).mean())
    assert bacc == pytest.approx(((blink[30:] > 0).numpy() == (vb[30:] > 0.5)).mean())
    assert all(np.isnan(critic_accuracy(critic, vf, np.full(100, -1))))


def test_emotion_labels_of_face_states():
    s = np.zeros((4, STATE_DIM), np.float32)
    s[0, EMOTION_COLS.start + 3] = 0.7
    s[1, EMOTION_COLS.start + 1] = 1.0
    s[2, EMOTION_COLS.start + 0] = 0.2
    s[3] = np.nan
    np.testing.assert_array_equal(emotion_labels(s), [3, 1, 0, -1])
    s[:3, BLINK_COL] = [0.0, 0.6, 1.0]
    np.testing.assert_array_equal(blink_values(s), np.array([0.0, 0.6, 1.0, np.nan], np.float32))
    assert emotion_labels(np.zeros((0, STATE_DIM))).shape == (0,)


def test_the_tokenizer_loss_adds_the_weighted_critic_distance():
    cfg = preset("test")
    torch.manual_seed(0)
    tok = VQTokenizer(cfg)
    critic = ExpressionCritic(cfg.image_size, cfg.image_size).eval()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    p = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    plain = tok.loss(x, p)
    assert "critic" not in plain
    assert torch.equal(tok.loss(x, p, critic=critic, critic_weight=0.0)["loss"].detach(), plain["loss"].detach())
    d = tok.loss(x, p, critic=critic, critic_weight=0.5)
    with torch.no_grad():
        recon = tok.reconstruct(x, p)
    torch.testing.assert_close(d["critic"], critic.distance(recon, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d["loss"], plain["loss"] + 0.5 * d["critic"], atol=1e-5, rtol=1e-5)


def test_blink_values_read_the_face_states_blink_column():
    from eartalk.model.face_state import MOUTH_GT, face_state
    n = 3
    gt = {k: np.zeros(n) for k in ("yaw", "pitch", "roll", "gaze_x", "gaze_y") + MOUTH_GT}
    gt.update(blink=np.array([0.0, 0.4, 1.0]), emotion=np.array([0, 1, 4]))
    np.testing.assert_array_equal(blink_values(face_state(gt, n)), np.array([0.0, 0.4, 1.0], np.float32))
    np.testing.assert_array_equal(emotion_labels(face_state(gt, n)), [0, 1, 4])
