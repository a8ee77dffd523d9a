"""eartalk/commands/stream.py: file and stdin input, mp4 / raw RGB output, controls timeline."""
import io
import json
import sys

import numpy as np
import pytest
import torch

from eartalk.cli import main
from eartalk.commands.stream import load_timeline

torch.set_num_threads(1)
S = 32                         # the "test" preset's frame size


def test_file_to_raw_rgb_has_ceil_frames(files, capsys):
    out = files / "o.rgb"
    rc = main(["stream", "--portrait", str(files / "p.png"), "--audio", str(files / "a.wav"),
               "--out", str(out), "--model", "test", "--random-init", "--quiet"])
    assert rc == 0
    assert out.stat().st_size == 11 * S * S * 3              # ceil(7000 / 640) = 11 frames
    err = capsys.readouterr().err
    assert "11 frames" in err and "first frame" in err and "randomly initialised" in err


def test_file_to_mp4_with_audio_and_timeline(files):
    from eartalk.data.video_io import read_video
    (files / "c.json").write_text(json.dumps({"events": [{"t": 0.1, "yaw": 10}, {"frame": 5, "yaw": None}]}))
    out = files / "o.mp4"
    rc = main(["stream", "--portrait", str(files / "p.png"), "--audio", str(files / "a.wav"), "--out", str(out),
               "--controls", str(files / "c.json"), "--model", "test", "--random-init", "--quiet"])
    assert rc == 0
    frames, audio = read_video(out)
    assert frames.shape == (11, S, S, 3) and abs(audio.size - 7000) < 200


def test_stdin_pcm(files, monkeypatch, capsys):
    pcm = (np.random.default_rng(1).standard_normal(3000) * 3000).astype("<i2").tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm)))
    out = files / "s.rgb"
    assert main(["stream", "--portrait", str(files / "p.png"), "--audio", "-", "--out", str(out),
                 "--model", "test", "--random-init", "--quiet"]) == 0
    assert out.stat().st_size == 5 * S * S * 3                 # ceil(3000 / 640)


def test_errors_are_clear(files, capsys):
    base = ["stream", "--portrait", str(files / "p.png"), "--model", "test", "--random-init"]
    assert main(base + ["--audio", str(files / "missing.wav")]) == 2
    assert "audio file not found" in capsys.readouterr().err
    assert main(base + ["--audio", str(files / "a.wav"), "--out", str(files / "o.avi")]) == 2
    assert "expected a .mp4 or .rgb" in capsys.readouterr().err
    assert main(["stream", "--portrait", str(files / "p.png"), "--audio", str(files / "a.wav"),
                 "--model", "small"]) == 2                 # a preset not shipped trained
    assert "has not been trained yet" in capsys.readouterr().err


def test_timeline_parsing_and_validation(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"events": [{"frame": 30, "blink": None}, {"t": 0.5, "yaw": 10, "emotion": "happy"}]}))
    assert load_timeline(p, 25) == [(12, {"yaw": 10, "emotion": "happy"}), (30, {"blink": None})]
    p.write_text(json.dumps({"events": [{"t": 1, "yaw": 100}]}))
    with pytest.raises(ValueError, match="event 0: control yaw=100 is outside"):
        load_timeline(p, 25)
    p.write_text(json.dumps({"events": [{"yaw": 1}]}))
    with pytest.raises(ValueError, match="exactly one of"):
        load_timeline(p, 25)
    p.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_timeline(p, 25)
