"""calibration/record.py: real runtime inputs are recorded with the coverage the card claims, and
stale or mismatching recordings are refused with a clear error."""

import numpy as np
import pytest

from eartalk.calibration.record import (CalibrationDataError, STEP_INPUTS, _positions, load_calibration, record)
from eartalk.data.synth import synthesize_corpus
from eartalk.export.compare import bundle_hash
from eartalk.runtime.model_loader import load_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib_corpus")
    synthesize_corpus(d, clips=3, seed=0, size=128, workers=1, progress=False)
    return d


@pytest.fixture(scope="module")
def recorded(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib_rec")
    # a 3-clip corpus puts every clip in train: that is the only split with clips here
    card = record("test", corpus, out, split="train", random_init=True, max_clips=2, max_frames=40,
                  samples=12, progress=False)
    return out, card


def test_positions_cover_filling_and_full_windows():
    pos = _positions(200, 16, 8)
    assert pos[0] == 0 and 8 in pos                 # empty cache and the first full window
    assert max(pos) == 199 and sum(p > 8 for p in pos) >= 6   # long after the window filled
    assert _positions(3, 10, 8) == [0, 1, 2]           # a short clip: every frame, nothing invented


def test_record_writes_real_step_inputs_and_a_card(recorded):
    out, card = recorded
    cfg = load_model("test", random_init=True).cfg
    step = load_calibration(out, "step")
    n = len(step)
    assert n == card["samples"] >= 10
    assert set(step.arrays) == set(STEP_INPUTS)
    assert step.arrays["past_k"].shape == (cfg.n_layer, n, cfg.n_head, cfg.cache_tokens, cfg.head_dim)
    lag = step.arrays["past_lag"]
    # real caches: the sink page is always there (-1), empty slots (-2) only before the window fills,
    # and at least one sample has a full window (no empty slot at all)
    assert np.all(lag[:, :cfg.page_tokens] == -1)
    assert (lag == -2).any(axis=1).any() and (~(lag == -2).any(axis=1)).any()
    assert np.abs(step.arrays["past_k"][:, :, :, cfg.page_tokens:]).max() > 0
    dec = load_calibration(out, "tokenizer_decode")
    # the decoder's real inputs: expected codes (runtime/soft_decode.py), inside the codes' range,
    # and mostly between codes (a rounded code would mean the recorder saw tokens)
    codes = dec.arrays["codes"]
    assert len(dec) == n and codes.shape[1:] == (cfg.tokens_per_frame, 2) and np.abs(codes).max() <= 1 + 1e-6
    assert not np.allclose(codes, np.round((codes + 1) / 2 * 3) / 3 * 2 - 1)
    # the card's claims match the samples
    assert 0 < card["positions"]["full_window_share"] < 1
    assert 0 < card["user_pinned_share"] < 1                 # pinned and free both present
    assert abs(card["speech_share"] + card["silence_share"] - 1) < 1e-6
    assert card["weights_sha256"] == bundle_hash(load_model("test", random_init=True))
    assert (out / "card.md").read_text().startswith("# Calibration data card")


def test_pinned_samples_carry_pinned_controls(recorded):
    out, card = recorded
    step = load_calibration(out, "step")
    pinned = np.array([r["user_pinned"] for r in card["samples_detail"]])
    assert step.arrays["cond_mask"][pinned].all()            # every control kind pinned to ground truth


def test_stale_or_mismatching_data_is_refused(recorded, tmp_path):
    out, card = recorded
    with pytest.raises(CalibrationDataError, match="another model version"):
        load_calibration(out, "step", expect_weights="0" * 64)
    with pytest.raises(CalibrationDataError, match="another model config"):
        load_calibration(out, "step", expect_config={**card["config"], "window": 99})
    spec = card["files"]["step"]["inputs"]
    wrong = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in spec.items()}
    wrong["past_k"]["shape"][-1] += 1
    with pytest.raises(CalibrationDataError, match="past_k.*recorded with shape"):
        load_calibration(out, "step", expect_inputs=wrong)
    # a file changed after recording is caught by its hash
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with np.load(copy / "step.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["audio"] = arrays["audio"] * 2
    np.savez(copy / "step.npz", **arrays)
    with pytest.raises(CalibrationDataError, match="sha256"):
        load_calibration(copy, "step")
    with pytest.raises(CalibrationDataError, match="no card.json"):
        load_calibration(tmp_path, "step")


def test_empty_split_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="no clips in split 'val'"):
        record("test", corpus, tmp_path, split="val", random_init=True, progress=False)
