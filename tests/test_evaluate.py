"""eartalk/evaluate.py + `eartalk eval`: image metrics against known values, the drift checkpoints,
the ground-truth pins, and an end-to-end run on a 2-clip corpus with a random test-preset bundle
(its numbers are meaningless; the structure and the ceiling are checked)."""
import json
import math

import numpy as np
import pytest
import torch

from eartalk.cli import main
from eartalk.data.corpus import list_clips, load_clip
import eartalk.evaluate as evaluate_mod
from eartalk.evaluate import (drift_checkpoints, drift_windows, emotion_confusion, looped_audio, looped_timeline,
                              pearson, pinned_timeline, pixel_mse, psnr, ssim)
from eartalk.model.bundle import new_bundle, save_bundle
from eartalk.model.config import CONTROLS, EMOTIONS, preset

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- metrics
def test_psnr_and_ssim_of_identical_images():
    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level():
    a = np.full((32, 32, 3), 128.0)
    signs = np.where(np.indices((32, 32)).sum(0) % 2 == 0, 1.0, -1.0)[..., None]
    assert psnr(a, a + 10 * signs) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)    # mse = 100
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 5, a.shape), 0, 255)
    assert psnr(a, noisy) == pytest.approx(20 * math.log10(255 / 5), abs=0.15)


def test_ssim_known_values_and_ordering():
    # flat images: only the luminance term remains, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    c1 = (0.01 * 255) ** 2
    expect = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert ssim(np.full((16, 16), 100.0), np.full((16, 16), 110.0)) == pytest.approx(expect, rel=1e-9)
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    scores = [ssim(img, np.clip(img + rng.normal(0, s, img.shape), 0, 255)) for s in (2, 10, 40)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    assert ssim(img, 255 - img) < 0                              # anti-correlated structure
    with pytest.raises(ValueError, match="same shape"):
        ssim(img, img[:8])


def test_pearson_is_undefined_for_a_constant_side():
    assert math.isnan(pearson(np.ones(5), np.arange(5)))
    assert pearson(np.arange(5), 2 * np.arange(5) + 1) == pytest.approx(1.0)


def test_drift_windows_are_one_loop_each_so_a_looped_clip_reads_ratio_one():
    assert drift_windows(10000, 190) == (range(5, 195), range(9811, 10001))     # centred on frame 100
    assert drift_windows(10000, 400) == (range(2, 402), range(9601, 10001))     # clear of frame 1
    assert drift_windows(300, 190) == (range(5, 195), range(111, 301))
    assert drift_windows(40, 100) == (range(2, 41), range(2, 41))               # shorter than a loop
    rng = np.random.default_rng(0)
    for n, period in ((10000, 190), (10000, 400), (300, 190), (250, 37)):
        loop = rng.random(period)                 # one value per frame of the clip, repeated
        a, b = drift_windows(n, period)
        assert len(a) == len(b) == period
        assert np.mean(loop[[(f - 1) % period for f in a]]) == pytest.approx(np.mean(loop[[(f - 1) % period for f in b]]))
    with pytest.raises(ValueError, match="period must be >= 1"):
        drift_windows(100, 0)


def test_drift_checkpoints():
    assert drift_checkpoints(10000) == ([100, 1000, 10000], 100)
    assert drift_checkpoints(2500) == ([100, 1000, 2500], 100)
    assert drift_checkpoints(40) == ([4, 40], 4)
    with pytest.raises(ValueError, match="--frames-drift must be >= 2"):
        drift_checkpoints(1)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from eartalk.data.synth import synthesize_corpus
    d = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(d, 2, seed=3, size=32, workers=1, progress=False)
    split = next(s for s in ("test", "val", "train") if list_clips(d, s))
    return d, split


def test_pinned_timeline_pins_every_control_to_the_truth(corpus):
    d, split = corpus
    clip = load_clip(d, list_clips(d, split)[0], frames=False)
    n = len(clip.gt["yaw"])
    tl = pinned_timeline(clip.gt, n)
    assert [f for f, _ in tl] == list(range(n))
    for f in (0, n // 2, n - 1):
        v = tl[f][1]
        assert set(v) == {"yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink", "emotion"}
        assert v["emotion"] == EMOTIONS[int(clip.gt["emotion"][f])]
        assert v["yaw"] == pytest.approx(float(clip.gt["yaw"][f]))
        assert all(CONTROLS[k][2][0] <= v[k] <= CONTROLS[k][2][1] for k in v if k != "emotion")


def test_looped_timeline_pins_frame_t_to_the_truth_of_t_mod_the_clip_length():
    gt = {"yaw": np.array([1.0, 2.0, 3.0]), "pitch": np.zeros(3), "roll": np.zeros(3), "gaze_x": np.zeros(3),
          "gaze_y": np.zeros(3), "blink": np.array([0.0, 1.0, 0.0]), "emotion": np.array([0, 2, 1])}
    tl = looped_timeline(gt, 7)
    assert [f for f, _ in tl] == list(range(7))
    assert [v["yaw"] for _, v in tl] == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]
    assert [v["blink"] for _, v in tl] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert [v["emotion"] for _, v in tl] == [EMOTIONS[i] for i in (0, 2, 1, 0, 2, 1, 0)]
    assert looped_timeline(gt, 2) == pinned_timeline(gt, 2)          # shorter than a loop: the truth itself
    with pytest.raises(ValueError, match="no frames"):
        looped_timeline({k: v[:0] for k, v in gt.items()}, 4)


def test_looped_audio_keeps_each_loop_on_the_frame_grid():
    # 2 frames of 3 samples: a clip 1 sample short is padded with silence, one 1 sample long trimmed
    short = looped_audio(np.array([1, 2, 3, 4, 5], np.float32), 2, 5, 3)
    assert short.tolist() == [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    long = looped_audio(np.array([1, 2, 3, 4, 5, 6, 7], np.float32), 2, 3, 3)
    assert long.tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    # loop k starts at frame k * period exactly (a raw np.resize would slide 1 sample a loop)
    a = np.arange(1, 6, dtype=np.float32)
    out = looped_audio(a, 2, 40, 3)
    assert all(out[k * 6] == 1 for k in range(20)) and not all(np.resize(a, 120)[k * 6] == 1 for k in range(20))
    with pytest.raises(ValueError, match="period"):
        looped_audio(a, 0, 4, 3)


def test_eval_end_to_end(corpus, tmp_path, capsys):
    from eartalk.model.train_gpt import fit_size
    from eartalk.probe.net import load_probe, predict
    d, split = corpus
    bundle = save_bundle(new_bundle(preset("test"), seed=0), tmp_path / "bundle")
    out = tmp_path / "ev" / "report.json"
    assert main(["eval", "--model", str(bundle), "--data", str(d), "--split", split, "--out", str(out),
                 "--frames-drift", "40", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ceiling" in printed and "PSNR" in printed and "report.drift.png" in printed
    rep = json.loads(out.read_text())                            # strict JSON: no NaN/Infinity tokens
    ids = list_clips(d, split)
    assert rep["clips"] == ids and len(rep["per_clip"]) == len(ids)
    keys = {"psnr_db", "ssim", "mouth_open_pearson_r", "viseme_accuracy", "yaw_mae_deg", "pitch_mae_deg",
            "roll_mae_deg", "gaze_mae", "blink_accuracy", "blink_next_frame_accuracy", "emotion_accuracy", "emotion_target_met",
            "blink_step_shut_accuracy", "blink_step_open_accuracy", "blink_step_shut_frames",
            "drift_slope_per_1000_frames", "drift_ratio"}
    assert keys <= set(rep["metrics"]) and keys <= set(rep["ceiling"])
    assert 0 < rep["metrics"]["psnr_db"] < 100 and -1 <= rep["metrics"]["ssim"] < 1
    assert rep["ceiling"]["psnr_db"] == "inf" and rep["ceiling"]["ssim"] == 1.0
    drift = rep["drift"]
    assert drift["frames"] == 40 and set(drift["distance_at"]) == {"4", "40"} and drift["ratio_frames"] == [40, 4]
    assert (tmp_path / "ev" / "report.drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = rep["frames_sheet"]        # the middle frame of the first clips, to look at
    assert sheet["plot"] == "report.frames.png" and str(tmp_path / "ev" / "report.frames.png") in printed
    assert (tmp_path / "ev" / "report.frames.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = rep["error_map"]             # where the pinned frames lose: per-pixel squared error
    assert err["plot"] == "report.error.png" and str(tmp_path / "ev" / "report.error.png") in printed
    assert rep["drift"]["plot"] == rep["drift_pinned"]["plot"] == "report.drift.png"    # beside the report
    assert (tmp_path / "ev" / "report.error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert err["frames"] == rep["frames"] and err["model_mse"] > 0 and err["tokenizer_mse"] > 0
    # a frame's pooled MSE is what its PSNR was made from: the map's mean over frames agrees
    per_frame_mse = [255.0 ** 2 / 10 ** (c["psnr_db"] / 10) for c in rep["per_clip"]]
    assert min(per_frame_mse) * 0.5 < err["model_mse"] < max(per_frame_mse) * 2
    assert sheet["columns"] == ["portrait", "ground truth", "controls pinned", "controls free", "tokenizer"]
    assert sheet["rows"] == [{"clip": c["clip"], "frame": c["frames"] // 2} for c in rep["per_clip"][:4]]
    assert drift["curve_frames"][0] == 1 and drift["curve"][0] == pytest.approx(0, abs=1e-6)
    first = load_clip(d, ids[0], frames=False)
    a, b = drift_windows(40, len(first.gt["viseme"]))
    assert drift["ratio_windows"] == [[a[0], a[-1]], [b[0], b[-1]]]
    for r in (drift, drift["ceiling"]):     # a zero reference distance has no ratio (null in the JSON)
        ratio = lambda a, b: pytest.approx(a / b) if b > 0 else None   # noqa: E731
        assert r["ratio"] == ratio(r["window_mean"]["40"], r["window_mean"]["4"])
        assert r["ratio_single_frame"] == ratio(r["distance_at"]["40"], r["distance_at"]["4"])
    assert rep["metrics"]["drift_ratio"] == drift["ratio"] and rep["ceiling"]["drift_ratio"] == drift["ceiling"]["ratio"]
    pin = rep["drift_pinned"]           # the same stream with the controls pinned to the looped truth
    assert drift["controls"] == "free" and pin["controls"] == "pinned"
    assert pin["ratio_windows"] == drift["ratio_windows"] and pin["curve_frames"] == drift["curve_frames"]
    assert pin["ceiling"] == drift["ceiling"]                       # the same renders
    if pin["window_mean"]["4"] > 0:
        assert pin["ratio"] == pytest.approx(pin["window_mean"]["40"] / pin["window_mean"]["4"])
    assert rep["metrics"]["drift_ratio_pinned"] == pin["ratio"]
    assert rep["metrics"]["drift_slope_pinned_per_1000_frames"] == pin["slope_per_1000_frames"]
    assert "controls pinned" in printed

    # the ceiling is the probe on the ground-truth frames, scored against the ground truth
    probe = load_probe()
    frames = np.concatenate([load_clip(d, c).frames for c in ids])
    gt = {k: np.concatenate([load_clip(d, c, frames=False).gt[k] for c in ids]) for k in ("viseme", "mouth_open", "yaw", "emotion")}
    p = predict(probe, fit_size(frames, probe.cfg.image_size))
    assert rep["frames"] == len(frames)
    assert rep["ceiling"]["viseme_accuracy"] == pytest.approx(np.mean(p["viseme"] == gt["viseme"]))
    assert rep["ceiling"]["mouth_open_pearson_r"] == pytest.approx(pearson(p["mouth_open"], gt["mouth_open"]))
    assert rep["ceiling"]["yaw_mae_deg"] == pytest.approx(np.mean(np.abs(p["yaw"] - gt["yaw"])), rel=1e-5)
    gl = {k: np.concatenate([load_clip(d, c, frames=False).gt[k] for c in ids]) for k in ("roll", "gaze_x", "gaze_y")}
    assert rep["ceiling"]["roll_mae_deg"] == pytest.approx(np.mean(np.abs(p["roll"] - gl["roll"])), rel=1e-5)
    assert rep["ceiling"]["gaze_mae"] == pytest.approx(
        (np.mean(np.abs(p["gaze_x"] - gl["gaze_x"])) + np.mean(np.abs(p["gaze_y"] - gl["gaze_y"]))) / 2, rel=1e-5)
    assert rep["ceiling"]["emotion_accuracy"] == pytest.approx(np.mean(p["emotion"] == gt["emotion"]))
    # per emotion: the confusion of the probe's readings against the truth, and each emotion's recall
    conf = rep["emotion_confusion"]
    assert conf["labels"] == list(EMOTIONS)
    assert np.array_equal(conf["ceiling"], emotion_confusion(p["emotion"], gt["emotion"]))
    assert np.sum(conf["model"]) == np.sum(conf["tokenizer"]) == len(frames)
    assert np.array_equal(np.sum(conf["model"], 1), np.bincount(gt["emotion"], minlength=len(EMOTIONS)))
    for i, e in enumerate(EMOTIONS):
        shown = gt["emotion"] == i
        want_r = np.mean(p["emotion"][shown] == i) if shown.any() else None
        assert rep["ceiling"][f"emotion_recall_{e}"] == (pytest.approx(want_r) if shown.any() else None)
        if shown.any():
            assert rep["metrics"][f"emotion_recall_{e}"] == pytest.approx(conf["model"][i][i] / shown.sum())
    assert f"of the frames pinned {EMOTIONS[int(gt['emotion'][0])]}" in printed

    # the blink-step run: its ceiling is the probe on the renderer's frames of the stepped pins
    from eartalk.blink_steps import blink_steps, step_metrics
    from eartalk.data.synth import rerender
    steps, shut = [], []
    for c in ids:
        clip = load_clip(d, c)
        st = blink_steps(len(clip.gt["blink"]))
        steps.append(st)
        shut.append(predict(probe, fit_size(rerender(clip.meta["identity"], {**clip.gt, "blink": st}, 32),
                                            probe.cfg.image_size))["blink"])
    want = step_metrics(np.concatenate(shut), np.concatenate(steps))
    for k, v in want.items():
        assert rep["ceiling"][k] == (pytest.approx(v) if v == v else None)
    assert rep["metrics"]["blink_step_pulses"] == want["blink_step_pulses"] == sum(c["blink_step_pulses"] for c in rep["per_clip"])
    assert want["blink_step_pulses"] > 0 and "blink pinned shut in a step" in printed

    # the tokenizer ceiling: the same probe on the truth encoded and decoded by the bundle's tokenizer
    from eartalk.model.bundle import load_bundle
    from eartalk.model.train_gpt import clip_portrait
    tok = load_bundle(bundle).tokenizer.eval()
    S = tok.S
    rec, ps = [], []
    with torch.no_grad():
        for c in ids:
            clip = load_clip(d, c)
            f = fit_size(np.asarray(clip.frames), S)
            x = torch.from_numpy(f).permute(0, 3, 1, 2)
            pp = torch.from_numpy(clip_portrait(clip, S)).permute(2, 0, 1)[None].expand(len(x), -1, -1, -1)
            y = tok.decode(tok.encode(x, pp), tok.reference(pp)).numpy()
            y = np.floor(np.clip(y, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8).transpose(0, 2, 3, 1)
            rec.append(y)
            ps += [psnr(a, b) for a, b in zip(y, f)]
    q = predict(probe, fit_size(np.concatenate(rec), probe.cfg.image_size))
    tc = rep["tokenizer_ceiling"]
    assert keys - {"drift_slope_per_1000_frames", "drift_ratio"} <= set(tc) and not any("drift" in k for k in tc)
    assert tc["psnr_db"] == pytest.approx(np.mean(ps), rel=1e-6)
    assert tc["viseme_accuracy"] == pytest.approx(np.mean(q["viseme"] == gt["viseme"]))
    assert tc["emotion_accuracy"] == pytest.approx(np.mean(q["emotion"] == gt["emotion"]))
    assert "tokenizer" in printed


def test_eval_errors_are_clear(corpus, tmp_path, capsys):
    d, _ = corpus
    base = ["eval", "--model", "test", "--random-init", "--data", str(d)]
    assert main(base + ["--split", "holdout", "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown split 'holdout'" in (err := capsys.readouterr().err) and "known splits" in err
    assert main(base + ["--out", str(tmp_path / "r.txt")]) == 2
    assert "expected a .json" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "r.json"), "--frames-drift", "1"]) == 2
    assert "--frames-drift must be >= 2" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json"),
                 "--model", "test", "--random-init"]) == 2
    assert "corpus directory not found" in capsys.readouterr().err


def test_emotion_confusion_counts_each_truth_read_pair():
    conf = emotion_confusion([0, 1, 1, 2, 4], [0, 0, 1, 4, 4])
    want = np.zeros((len(EMOTIONS), len(EMOTIONS)), np.int64)
    want[0, 0] = want[0, 1] = want[1, 1] = want[4, 2] = want[4, 4] = 1
    assert np.array_equal(conf, want)
    m = evaluate_mod._control_metrics(
        {"yaw": np.zeros(5), "pitch": np.zeros(5), "roll": np.zeros(5), "gaze_x": np.zeros(5), "gaze_y": np.zeros(5),
         "blink": np.zeros(5, np.int64), "emotion": np.array([0, 1, 1, 2, 4])},
        {"yaw": np.zeros(5), "pitch": np.zeros(5), "roll": np.zeros(5), "gaze_x": np.zeros(5), "gaze_y": np.zeros(5),
         "blink": np.zeros(5), "emotion": np.array([0, 0, 1, 4, 4]), "first": np.eye(1, 5, dtype=np.int64)[0]})
    assert m["emotion_recall_neutral"] == 0.5 and m["emotion_recall_happy"] == 1.0
    assert m["emotion_recall_surprised"] == 0.5 and m["emotion_accuracy"] == 0.6
    assert np.isnan(m["emotion_recall_sad"]) and np.isnan(m["emotion_recall_angry"])   # never pinned: undefined
    with pytest.raises(ValueError, match="3 readings for 2 frames"):
        emotion_confusion([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="outside 0..4"):
        emotion_confusion([0, 5], [0, 1])


def test_pixel_mse_sums_each_pixels_squared_error_over_frames():
    truth = np.zeros((2, 2, 2, 3), np.uint8)      # 2 frames of 2x2 RGB
    frames = truth.copy()
    frames[0, 0, 1] = (3, 0, 0)              # frame 0, pixel (0, 1): squared errors 9, 0, 0 -> 3
    frames[1, 0, 1] = (0, 6, 0)              # frame 1, same pixel: 36 / 3 = 12
    frames[1, 1, 0] = 255                    # frame 1, pixel (1, 0): 255^2
    np.testing.assert_array_equal(pixel_mse(frames, truth), [[0, 15], [255.0 ** 2, 0]])
    with pytest.raises(ValueError, match=r"\[n, H, W, C\]"):
        pixel_mse(frames[:, :1], truth)
