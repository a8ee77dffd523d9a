"""eartalk/generate.py + `eartalk generate` / `eartalk demo`: frame count, audio mux, timelines
reaching the step, bad inputs, bundles, the demo's model path."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from eartalk.cli import main
from eartalk.controls_timeline import load_timeline
from eartalk.data.video_io import read_video
from eartalk.model.bundle import new_bundle, save_bundle
from eartalk.model.conditions import decode_controls
from eartalk.model.config import preset
from eartalk.runtime.torch_backend import TorchBackend

torch.set_num_threads(1)
S = 32                          # the "test" preset's frame size
CFG = preset("test")


class Recording(TorchBackend):
    """Records the condition of every step (checked at the model's input, not in pixels)."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.conds = []

    def step_torch(self, prev, audio, cond, cond_mask, *rest):
        self.conds += [decode_controls(c, m) for c, m in zip(np.asarray(cond), np.asarray(cond_mask))]
        return super().step_torch(prev, audio, cond, cond_mask, *rest)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return save_bundle(new_bundle(CFG, seed=0), tmp_path_factory.mktemp("bundle") / "test-bundle")


def gen(files, *extra, audio="a.wav", portrait="p.png", out="o.mp4"):
    return main(["generate", "--portrait", str(files / portrait), "--audio", str(files / audio),
                 "--out", str(files / out), "--quiet", *extra])


def test_frame_count_and_muxed_audio(files, bundle_dir, capsys):
    # 1.3 s of a 440 Hz tone at 22.05 kHz: resampled to 16 kHz, ceil(1.3 * 25) = 33 frames
    sr, dur = 22050, 1.3
    t = np.arange(int(sr * dur)) / sr
    sf.write(files / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    assert gen(files, "--model", str(bundle_dir), audio="tone.wav") == 0
    assert "wrote" in capsys.readouterr().out
    frames, audio = read_video(files / "o.mp4")
    assert frames.shape == (math.ceil(dur * 25), S, S, 3)
    assert abs(audio.size - dur * 16000) < 0.02 * dur * 16000
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 440) < 5       # it is the input speech


def test_random_init_and_odd_portrait_notice(files, capsys):
    Image.fromarray(np.full((60, 44, 3), 90, np.uint8)).save(files / "tall.png")
    assert gen(files, "--model", "test", "--random-init", portrait="tall.png") == 0
    err = capsys.readouterr().err
    assert "tall.png is 44x60" in err and "centre-cropped" in err and "32x32" in err
    assert "randomly initialised" in err
    frames, audio = read_video(files / "o.mp4")
    assert frames.shape == (11, S, S, 3) and abs(audio.size - 7000) < 200    # ceil(7000 / 640)


def test_timeline_pins_reach_the_step_from_their_frame(files):
    from eartalk.generate import render
    (files / "c.json").write_text(json.dumps({"events": [
        {"t": 0.2, "yaw": 10}, {"frame": 8, "emotion": "happy", "blink": 1},
        {"frame": 10, "yaw": None}, {"t": 0.4, "blink": None}]}))
    timeline = load_timeline(files / "c.json", 25)
    rec = Recording(new_bundle(CFG, seed=0))
    audio = (np.random.default_rng(1).standard_normal(14 * 640) * 0.2).astype(np.float32)   # loud: no idle pins
    portrait = np.random.default_rng(2).integers(0, 256, (S, S, 3), dtype=np.uint8)
    res = render(rec, portrait, audio, files / "t.mp4", timeline, progress=False, guidance=1.0)   # a row per frame
    assert res.frames == 14 and len(rec.conds) == 14
    from eartalk.data.motion import controls_track
    from eartalk.runtime.session import IDLE_TRACK_FRAMES
    track = controls_track(IDLE_TRACK_FRAMES, np.random.default_rng(0), fps=25)     # render's seed 0
    for f, c in enumerate(rec.conds):
        assert ("yaw" in c) == (5 <= f < 10), f                     # t=0.2 s -> frame 5; null frees at 10
        if 5 <= f < 10:
            assert c["yaw"] == pytest.approx(10) and c["pitch"] == 0
        assert c.get("emotion") == ("happy" if f >= 8 else None), f
        # t=0.4 s -> frame 10 frees the blink; free, it follows the session's idle track (speech too)
        assert c["blink"] == (1.0 if 8 <= f < 10 else pytest.approx(float(track["blink"][f]), abs=1e-6)), f


@pytest.mark.parametrize("doc, message", [
    ({"events": [{"t": 0, "yew": 3}]}, "unknown control 'yew'; valid controls are ['blink', 'emotion', 'gaze_x'"),
    ({"events": [{"frame": 2, "yaw": 45}]}, "yaw=45 is outside its range [-30.0, 30.0]"),
    ({"events": [{"t": 1, "emotion": "bored"}]}, "expected one of ['neutral', 'happy'"),
    ({"events": [{"t": -1, "blink": 1}]}, "expected seconds >= 0"),
])
def test_bad_timeline_is_refused_before_any_frame(files, doc, message, capsys):
    (files / "c.json").write_text(json.dumps(doc))
    assert gen(files, "--model", "test", "--random-init", "--controls", str(files / "c.json")) == 2
    err = capsys.readouterr().err
    assert message in err and "c.json" in err
    assert not (files / "o.mp4").exists()


def test_bad_inputs_name_the_file(files, capsys):
    rnd = ["--model", "test", "--random-init"]
    (files / "notimage.png").write_text("hello")
    assert gen(files, *rnd, portrait="notimage.png") == 2
    assert "portrait" in (err := capsys.readouterr().err) and "notimage.png is not a readable image" in err
    (files / "noise.wav").write_bytes(b"RIFF????WAVEjunk" * 10)
    assert gen(files, *rnd, audio="noise.wav") == 2
    assert "cannot decode audio file" in (err := capsys.readouterr().err) and "noise.wav" in err
    sf.write(files / "empty.wav", np.zeros(0, np.float32), 16000)
    assert gen(files, *rnd, audio="empty.wav") == 2
    assert "empty.wav contains no audio samples" in capsys.readouterr().err
    assert gen(files, *rnd, audio="missing.mp3") == 2
    assert "audio file not found" in capsys.readouterr().err
    assert gen(files, *rnd, out="o.avi") == 2
    assert "expected an .mp4" in capsys.readouterr().err
    assert gen(files, *rnd, "--backend", "onnxruntime") == 2
    assert "onnx_dir" in capsys.readouterr().err
    assert gen(files, "--model", "small") == 2              # a preset not shipped trained
    assert "has not been trained yet" in capsys.readouterr().err
    assert not (files / "o.mp4").exists()


def test_tampered_bundle_is_refused(files, bundle_dir, tmp_path, capsys):
    import shutil
    bad = shutil.copytree(bundle_dir, tmp_path / "bad")
    card = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    assert gen(files, "--model", str(bad)) == 2
    assert "does not match model.json" in capsys.readouterr().err
    card["config"]["n_layer"] = 3                               # a config the weights do not fit
    (bad / "model.json").write_text(json.dumps(card))
    assert gen(files, "--model", str(bad)) == 2
    err = capsys.readouterr().err
    assert "weights do not fit its config" in err and str(bad) in err


def test_demo_uses_the_default_model_when_present(tmp_path, monkeypatch, capsys):
    from eartalk.commands import demo
    monkeypatch.setattr(demo, "_default_backend", lambda: TorchBackend(new_bundle(CFG, seed=0)))
    out = tmp_path / "d.mp4"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "default model made" in text and str(out.resolve()) in text
    _, speech, _ = demo.sample_inputs(1, S)
    frames, audio = read_video(out)
    assert frames.shape == (-(-speech.size // 640), S, S, 3) and abs(audio.size - speech.size) < 200


def test_demo_without_trained_model_says_so(tmp_path, monkeypatch, capsys):
    from eartalk.commands import demo
    from eartalk.runtime import ModelNotTrainedError

    def untrained():
        raise ModelNotTrainedError("no weights")
    monkeypatch.setattr(demo, "_default_backend", untrained)
    assert main(["demo", "--out", str(tmp_path / "d.mp4"), "--size", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("not trained yet") == 1 and (tmp_path / "d.mp4").exists()
