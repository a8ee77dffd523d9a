"""The probe: the shipped instrument loads with its hash checked, reads the held-out renders as its
report says, and its metrics are computed right."""
import json

import numpy as np
import pytest
import torch

from eartalk.data import face, identity, visemes
from eartalk.probe.net import SHIPPED, Probe, ProbeConfig, load_probe, predict, save_probe


def test_save_load_round_trip_and_tamper_refusal(tmp_path):
    torch.manual_seed(0)
    p = Probe(ProbeConfig(image_size=64, n_identities=3))
    save_probe(p, tmp_path)
    q = load_probe(tmp_path)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    p.eval()
    assert torch.equal(p(x)["viseme"], q(x)["viseme"])
    w = tmp_path / "probe.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash"):
        load_probe(tmp_path)


def test_missing_probe_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="eartalk train probe"):
        load_probe(tmp_path / "nope")


def test_wrong_frame_size_is_refused():
    p = Probe(ProbeConfig(image_size=64))
    with pytest.raises(ValueError, match="64x64"):
        p(torch.zeros(1, 3, 32, 32))


@pytest.mark.skipif(not (SHIPPED / "probe.json").exists(), reason="no shipped probe in this checkout")
def test_shipped_probe_reads_fresh_renders():
    """Faces the probe never saw (new identities): pose, blink, mouth and emotion come back."""
    probe = load_probe()
    rng = np.random.default_rng(2026)
    frames, want = [], []
    for i in range(30):
        ident = identity.Identity.sample(rng)
        yaw = float(rng.uniform(-25, 25))
        blink = float(i % 2)
        emo = i % 5
        vis = int(rng.integers(len(visemes.VISEMES)))
        mouth = visemes.TARGETS[visemes.VISEMES[vis]]
        st = face.FaceState(mouth=mouth, yaw=yaw, blink=blink, emotion=emo)
        frames.append(face.render(ident, st, 128))
        want.append((yaw, blink, emo, mouth.open, vis))
    p = predict(probe, np.stack(frames))
    want = np.array(want)
    assert np.mean(np.abs(p["yaw"] - want[:, 0])) < 4.0
    assert np.mean(p["blink"] == want[:, 1]) >= 0.9
    assert np.mean(p["emotion"] == want[:, 2]) >= 0.8
    assert np.corrcoef(p["mouth_open"], want[:, 3])[0, 1] > 0.9
    assert np.mean(p["viseme"] == want[:, 4]) >= 0.7
    meta = json.loads((SHIPPED / "probe.json").read_text())
    assert meta["report"]["targets_met"] is True
