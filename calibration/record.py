"""Record real step and decoder inputs from the streaming runtime, for INT8/FP8 calibration.

Random calibration data hides attention quantization problems (shared/references.md): the ranges
that matter are those of real K/V caches at real stream positions. So the recorder runs the
actual runtime (``Engine`` over the torch backend, the reference the ONNX graphs are checked
against) on held-out clips and captures the exact arrays each ``step`` / ``decode`` call received.

Coverage, by construction:

- **positions**: every frame 0..W of each clip (empty, partly and just-full windows), then evenly
  spaced frames up to the clip's end (full windows, long after the sink);
- **controls**: each clip pins its ground-truth controls for one half of its frames and leaves
  them free for the other (even clips pin the first half, odd clips the second, so position and
  pinning are not confounded); free frames get the runtime's idle motion in silence;
- **speech and silence**: the clips' own pauses; the share is in the data card. Streams run
  unguided (``guidance=1``, one step row per frame): the silent row a guided frame adds
  (``runtime/guidance.py``) carries silence's audio tokens, which the pauses cover.

Output folder::

    step.npz              prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag
    tokenizer_decode.npz  codes, ref (what the decoder read: the expected codes of runtime/soft_decode.py)
    card.json, card.md    counts, positions, pinned/free and speech/silence shares, model hash/config

Arrays are keyed by the ONNX input names and concatenated along each input's batch axis (axis 1
for past_k/past_v, 0 otherwise), the layout ModelOpt's ``calibration_data`` also takes, so a
sample is one batch-1 feed. The card carries the model's weights sha256 and config:
:func:`load_calibration` with ``expect_*`` refuses data recorded from another model.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eartalk.runtime.backend import Backend

__all__ = ["STEP_INPUTS", "DECODER_INPUTS", "GRAPH_INPUTS", "batch_axis", "record", "load_calibration",
           "CalibrationSet", "CalibrationDataError", "CARD_FORMAT"]

STEP_INPUTS = ("prev_tokens", "audio", "cond", "cond_mask", "past_k", "past_v", "past_lag")
DECODER_INPUTS = ("codes", "ref")
GRAPH_INPUTS = {"step": STEP_INPUTS, "tokenizer_decode": DECODER_INPUTS}
CARD, CARD_MD = "card.json", "card.md"
CARD_FORMAT = 2   # 2: the decoder's inputs are codes float32 [B,N,d], not tokens (2026-12-06)


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used for this model/graph: the message says why."""


def batch_axis(name: str) -> int:
    """The batch axis of a graph input (K/V carry the layer first: [L, B, H, T, D])."""
    return 1 if name in ("past_k", "past_v") else 0


class _Recorder(Backend):
    """A backend proxy that records the inputs of chosen step/decode calls of one session.

    It deliberately has no ``step_torch``: the Engine then hands ``step`` the numpy arrays an
    ONNX backend receives, which are exactly what calibration must see.
    """

    name = "recorder"

    def __init__(self, inner: Backend):
        super().__init__(inner.cfg, inner.receptive_field)
        self.inner = inner
        self.keep: set[int] = set()
        self.frame = 0
        self.step_rec: list[dict] = []
        self.dec_rec: list[dict] = []
        self.cond_pinned: list[bool] = []

    def tokenize(self, images):
        return self.inner.tokenize(images)

    def reference(self, portrait):
        return self.inner.reference(portrait)

    def prefill(self, portrait_tokens):
        return self.inner.prefill(portrait_tokens)

    def encode_audio(self, mel_window):
        return self.inner.encode_audio(mel_window)

    def step(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag):
        if self.frame in self.keep:
            args = (prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)
            self.step_rec.append({n: np.array(a) for n, a in zip(STEP_INPUTS, args)})
        return self.inner.step(prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag)

    def decode_float(self, codes, ref):
        if self.frame in self.keep:
            self.dec_rec.append({"codes": np.array(codes, np.float32), "ref": np.array(ref, np.float32)})
        self.frame += 1      # one decode per step in a one-session engine: the frame counter
        return self.inner.decode_float(codes, ref)


def _positions(n: int, budget: int, window: int) -> list[int]:
    """Frames to keep in an ``n``-frame clip: half the budget over 0..W (the window filling up,
    always including frame 0 and the first full window W), the rest evenly over W+1..n-1."""
    budget = max(1, budget)
    early_n = min(window + 1, n, max(1, -(-budget // 2)) if n > window + 1 else budget)
    early = {int(x) for x in np.linspace(0, min(window, n - 1), early_n).round()}
    late_n = budget - len(early)
    late = set()
    if late_n > 0 and n > window + 1:
        late = {int(x) for x in np.linspace(window + 1, n - 1, late_n).round()}
    return sorted(early | late)


def _timeline(gt: dict, n: int, pin_first: bool) -> list[tuple[int, dict]]:
    """Ground-truth pins for one half of the clip, every control released for the other half."""
    from eartalk.evaluate import PINNED, pinned_timeline
    half = n // 2
    pins = pinned_timeline(gt, n)
    free = {k: None for k in PINNED}
    if pin_first:
        return pins[:half] + [(half, free)]
    return [(0, free)] + pins[half:]


def _frame_rms(audio: np.ndarray, spf: int, n: int) -> np.ndarray:
    x = np.zeros(n * spf, np.float64)
    a = audio[: n * spf]
    x[: a.size] = a
    return np.sqrt((x.reshape(n, spf) ** 2).mean(axis=1))


def record(model, data, out, *, split: str = "val", random_init: bool = False, seed: int = 0,
           max_clips: int | None = 8, max_frames: int | None = 250, samples: int = 64,
           backend: Backend | None = None, progress: bool = True) -> dict:
    """Run held-out clips of ``data``'s ``split`` through the runtime and save the inputs of about
    ``samples`` steps (spread as the module docstring says) to ``out``; -> the data card.

    ``model``: preset name or bundle directory (``random_init`` for an untrained preset);
    ``max_frames`` truncates long clips; ``backend``: a ready runtime backend (default torch).
    """
    import sys

    from tqdm import tqdm

    from eartalk.controls_timeline import apply_timeline
    from eartalk.data.corpus import list_clips, load_clip
    from eartalk.export.compare import bundle_hash
    from eartalk.export.metadata import file_sha256
    from eartalk.generate import stream_frames
    from eartalk.model.train_gpt import clip_portrait
    from eartalk.runtime import Engine
    from eartalk.runtime.model_loader import load_model
    from eartalk.runtime.session import SILENCE_RMS
    from eartalk.runtime.torch_backend import TorchBackend

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    ids = list_clips(data, split)
    if max_clips:
        ids = ids[:max_clips]
    if not ids:
        raise ValueError(f"corpus {data} has no clips in split {split!r} (calibrate on held-out clips: "
                         f"use a corpus with a {split!r} split, or pass --split)")
    bundle = load_model(model, random_init=random_init, seed=seed)
    inner = backend or TorchBackend(bundle)
    rec = _Recorder(inner)
    cfg, W, spf = rec.cfg, rec.cfg.window, rec.cfg.samples_per_frame
    per_clip = max(1, math.ceil(samples / len(ids)))
    meta_rows: list[dict] = []
    t0 = time.perf_counter()
    for ci, cid in enumerate(tqdm(ids, desc="record", unit="clip", disable=not progress, file=sys.stderr)):
        clip = load_clip(data, cid)
        audio = clip.audio.astype(np.float32)
        if max_frames:
            audio = audio[: max_frames * spf]
        n = -(-audio.size // spf)
        keep = _positions(n, per_clip, W)
        rec.keep, rec.frame = set(keep), 0
        pin_first = ci % 2 == 0
        timeline = _timeline(clip.gt, n, pin_first) if clip.gt is not None else []
        rms = _frame_rms(audio, spf, n)
        before = len(rec.step_rec)
        engine = Engine(rec, max_sessions=1)
        try:
            # unguided: one step row per frame. A guided frame's second row differs only in its
            # audio tokens, which are silence's, and the clips' own pauses already cover those.
            session = engine.open_session(clip_portrait(clip, cfg.image_size), seed=seed, guidance=1.0)
            apply_timeline(session, timeline)
            for _ in stream_frames(session, audio):
                pass
        finally:
            engine.close()
        for t, r in zip(keep, rec.step_rec[before:]):
            user_pinned = bool(timeline) and ((t < n // 2) == pin_first)
            meta_rows.append({"clip": cid, "frame": t, "window_pages": min(t, W), "full_window": t >= W,
                              "user_pinned": user_pinned, "cond_mask_any": bool(r["cond_mask"].any()),
                              "speech": bool(rms[t] >= SILENCE_RMS)})
    if not rec.step_rec:
        raise ValueError(f"no steps recorded from {len(ids)} clips of {data} [{split}] (empty audio?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, rows, names in (("step", rec.step_rec, STEP_INPUTS), ("tokenizer_decode", rec.dec_rec, DECODER_INPUTS)):
        arrays = {nm: np.concatenate([r[nm] for r in rows], axis=batch_axis(nm)) for nm in names}
        path = out / f"{kind}.npz"
        np.savez(path, **arrays)       # uncompressed: float K/V barely compress, loading stays fast
        files[kind] = {"file": path.name, "sha256": file_sha256(path),
                       "inputs": {nm: {"dtype": str(a.dtype), "shape": list(a.shape)} for nm, a in arrays.items()}}
    n_s = len(meta_rows)
    share = lambda key: round(sum(r[key] for r in meta_rows) / n_s, 4)   # noqa: E731
    hist: dict[str, int] = {}
    for r in meta_rows:
        hist[str(r["window_pages"])] = hist.get(str(r["window_pages"]), 0) + 1
    card = {
        "format": CARD_FORMAT, "model": str(model), "random_init": bool(random_init), "seed": seed,
        "config": cfg.to_dict(), "weights_sha256": bundle_hash(bundle), "data": str(data), "split": split,
        "clips": ids, "samples": n_s,
        "positions": {"min": min(r["frame"] for r in meta_rows), "max": max(r["frame"] for r in meta_rows),
                      "window_pages_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                      "full_window_share": share("full_window")},
        "user_pinned_share": share("user_pinned"), "free_share": round(1 - share("user_pinned"), 4),
        "cond_mask_any_share": share("cond_mask_any"),
        "speech_share": share("speech"), "silence_share": round(1 - share("speech"), 4),
        "samples_detail": meta_rows, "files": files, "seconds": round(time.perf_counter() - t0, 1),
        "notes": ["user_pinned: ground-truth controls pinned by the recorder's timeline; cond_mask_any also "
                  "counts the runtime's idle motion, which fills free controls in silence",
                  "random_init model: ranges of an untrained model" if random_init else "trained model"],
    }
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (out / CARD_MD).write_text(_card_md(card))
    return card


def _card_md(c: dict) -> str:
    p = c["positions"]
    rows = [("model", f"{c['model']}{' (random init)' if c['random_init'] else ''}"),
            ("weights sha256", c["weights_sha256"][:16] + "..."), ("data", f"{c['data']} [{c['split']}]"),
            ("clips", str(len(c["clips"]))), ("samples (steps)", str(c["samples"])),
            ("frames", f"{p['min']}..{p['max']}"), ("full window share", f"{p['full_window_share']:.0%}"),
            ("window pages histogram", ", ".join(f"{k}: {v}" for k, v in p["window_pages_hist"].items())),
            ("controls pinned / free", f"{c['user_pinned_share']:.0%} / {c['free_share']:.0%}"),
            ("speech / silence", f"{c['speech_share']:.0%} / {c['silence_share']:.0%}")]
    return "# Calibration data card\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


@dataclass
class CalibrationSet:
    """Recorded inputs of one graph: ``arrays`` keyed by input name (batch on ``batch_axis``)."""
    kind: str
    arrays: dict[str, np.ndarray]
    card: dict

    def __len__(self) -> int:
        return int(self.arrays[GRAPH_INPUTS[self.kind][0]].shape[0])

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as a batch-1 feed dict."""
        return {n: np.ascontiguousarray(np.take(a, [i], axis=batch_axis(n))) for n, a in self.arrays.items()}

    def feeds(self, idx=None) -> list[dict[str, np.ndarray]]:
        return [self.feed(i) for i in (range(len(self)) if idx is None else idx)]


def load_calibration(calib_dir, kind: str, *, expect_weights: str | None = None, expect_config: dict | None = None,
                     expect_inputs: dict | None = None) -> CalibrationSet:
    """Load ``<kind>.npz`` of a recorded folder, refusing stale or mismatching data.

    ``expect_weights`` / ``expect_config``: the model the graph was exported from (its manifest);
    ``expect_inputs``: ``{name: {"dtype", "shape"}}`` of the graph (manifest entry), ``"batch"``
    for the symbolic batch. Every mismatch raises :class:`CalibrationDataError` naming both sides.
    """
    d = Path(calib_dir)
    if kind not in GRAPH_INPUTS:
        raise CalibrationDataError(f"no calibration recording for graph {kind!r}; recorded graphs: {sorted(GRAPH_INPUTS)}")
    card_path = d / CARD
    if not card_path.is_file():
        raise CalibrationDataError(f"{d}: no {CARD}; is it the output of `eartalk calibrate record`?")
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise CalibrationDataError(f"{card_path}: format {card.get('format')!r}, this eartalk reads {CARD_FORMAT}; "
                                   f"record it again with `eartalk calibrate record`")
    if expect_weights is not None and card["weights_sha256"] != expect_weights:
        raise CalibrationDataError(
            f"{d}: recorded from weights {card['weights_sha256'][:16]}... but the ONNX graphs come from "
            f"{expect_weights[:16]}... (another model version): re-record with `eartalk calibrate record` "
            f"for this model")
    if expect_config is not None and card["config"] != expect_config:
        from eartalk.export.metadata import _config_diff
        raise CalibrationDataError(f"{d}: recorded for another model config: {_config_diff(card['config'], expect_config)}")
    path = d / card["files"][kind]["file"]
    if not path.is_file():
        raise CalibrationDataError(f"{path}: missing (the card lists it)")
    from eartalk.export.metadata import file_sha256
    if file_sha256(path) != card["files"][kind]["sha256"]:
        raise CalibrationDataError(f"{path}: sha256 differs from {CARD} (file changed after recording)")
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files}
    missing = [n for n in GRAPH_INPUTS[kind] if n not in arrays]
    if missing:
        raise CalibrationDataError(f"{path}: missing inputs {missing}; has {sorted(arrays)}")
    if expect_inputs is not None:
        for name, spec in expect_inputs.items():
            if name not in arrays:
                raise CalibrationDataError(f"{path}: the graph needs input {name!r}, not recorded (has {sorted(arrays)})")
            a, ax = arrays[name], batch_axis(name)
            want = [d_ for i, d_ in enumerate(spec["shape"]) if i != ax]
            got = [d_ for i, d_ in enumerate(a.shape) if i != ax]
            if len(a.shape) != len(spec["shape"]) or got != want:
                raise CalibrationDataError(f"{path}: input {name!r} recorded with shape {list(a.shape)}, the graph "
                                           f"takes {spec['shape']} (batch on axis {ax}); recorded for another model?")
            if str(a.dtype) != spec["dtype"]:
                raise CalibrationDataError(f"{path}: input {name!r} is {a.dtype}, the graph takes {spec['dtype']}")
    return CalibrationSet(kind, arrays, card)
