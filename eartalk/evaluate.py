"""Evaluate a model on held-out synthetic clips, measured by the shipped probe (``load_probe()``).

Per held-out clip (the clip's neutral portrait via ``train_gpt.clip_portrait`` + its speech),
through the streaming runtime:

- **pinned run**: every non-audio control (yaw, pitch, roll, gaze_x, gaze_y, blink, emotion) is
  pinned to the clip's ground truth at every frame (``session.control(at_frame=t, ...)``).
  Gives PSNR / SSIM against the renderer's own frames, and control fidelity read by the probe:
  yaw/pitch/roll MAE (degrees; every frame's pin is a change, measured on the frame it applies to),
  gaze MAE (mean over gaze_x and gaze_y, in the controls' own units: the eye's free travel is -1..1),
  blink (probe's eyes-closed == pinned blink >= 0.5) on every frame and on the first frame after
  each open/closed switch, emotion recognised (target: >= 90 % of frames). Where the pinned frames
  lose their PSNR is drawn as a map (``<report>.error.png``: mean squared error per pixel, the model
  beside its tokenizer and their difference).
- **blink-step run**: the same pins, but the blink pinned as a user pins it, shut for 1-8 frames
  then open (``eartalk/blink_steps.py``): the share of pulses whose first frame reads shut, whose
  first open frame reads open, and of all shut frames. Its ceilings are the renderer's frames of the
  same pins (``synth.rerender``) and those frames through the tokenizer.
- **free run**: no controls (the runtime's idle motion in silence, as in the product). Gives
  lip-sync: Pearson r of the probe's mouth openness with the ground truth, viseme accuracy.
- **drift**: one clip's audio looped to ``frames_drift`` frames, controls free; cosine distance of
  the probe's identity embedding from frame 1 at frames 100, 1000, ..., a PNG plot of distance vs
  frame, the slope of a linear fit (per 1000 frames) and the ratio of the distance at the last
  frame to the distance at frame 100, each read as the mean over one loop of the clip
  (:func:`drift_windows`). Why a loop and not one frame: the embedding moves with the mouth, eyes and
  pose of the moment (one frame's distance ranges 0.02 to 0.25 on the ground-truth renders, whose
  identity never changes: their one-frame ratio read 0.77); over a whole loop the ground truth's
  means are equal by construction, so what differs in ours is drift. The one-frame ratio is
  reported beside it (``ratio_single_frame``).

The **ceiling** is the same metrics computed by the probe on the ground-truth renders themselves
(PSNR/SSIM of the renders against themselves are inf / 1; for drift, the clip's own frames looped):
what a perfect model would score with this instrument.

The **tokenizer ceiling** (torch backend only: it needs the tokenizer's encoder, which the runtime's
graphs do not carry) is the probe on the ground-truth frames passed through the model's own
tokenizer (encoded against the clip's portrait, decoded): what a transformer that predicted every
token right would score. Model close to it: the tokenizer limits; far below it: the transformer.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from eartalk.blink_steps import blink_steps, step_metrics
from eartalk.frame_sheet import save_frame_sheet
from eartalk.model.config import EMOTIONS

__all__ = ["psnr", "ssim", "pearson", "pinned_timeline", "evaluate", "format_table", "drift_checkpoints", "drift_windows",
           "emotion_confusion"]

PINNED = ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink", "emotion")
EMOTION_TARGET = 0.90
SHEET_CLIPS = 4          # rows of the frame sheet (<report>.frames.png)
DRIFT_SAMPLES = 100          # evenly spaced frames (plus checkpoints) probed for the drift curve


# ----------------------------------------------------------------------------- image metrics
def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"images must have the same shape [H, W] or [H, W, C], got {a.shape} and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    a, b = _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004): gaussian window sigma 1.5 (11 taps),
    K1 = 0.01, K2 = 0.03, per channel, borders reflected; 1.0 for identical images."""
    from scipy.ndimage import gaussian_filter
    a, b = _check_pair(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    win = dict(sigma=(sigma, sigma, 0), truncate=3.5, mode="reflect")
    mu_a, mu_b = gaussian_filter(a, **win), gaussian_filter(b, **win)
    var_a = gaussian_filter(a * a, **win) - mu_a ** 2
    var_b = gaussian_filter(b * b, **win) - mu_b ** 2
    cov = gaussian_filter(a * b, **win) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(np.mean(s))


def pearson(x, y) -> float:
    """Pearson r; NaN when either side is constant (e.g. a model that never moves the mouth)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


# ----------------------------------------------------------------------------- controls
def pinned_timeline(gt: dict[str, np.ndarray], n_frames: int) -> list[tuple[int, dict]]:
    """Ground truth -> one event per frame pinning every non-audio control to its true value."""
    from eartalk.model.config import CONTROLS
    events = []
    for t in range(n_frames):
        values = {}
        for name in PINNED:
            if name == "emotion":
                values[name] = EMOTIONS[int(gt[name][t])]
            else:
                lo, hi = CONTROLS[name][2]
                values[name] = float(np.clip(float(gt[name][t]), lo, hi))
        events.append((t, values))
    return events


def emotion_confusion(read, truth) -> np.ndarray:
    """int64 ``[K, K]`` over ``config.EMOTIONS``: how many frames of true emotion ``i`` (row) the probe
    read as ``j`` (column)."""
    read, truth = np.asarray(read, np.int64), np.asarray(truth, np.int64)
    if read.shape != truth.shape:
        raise ValueError(f"emotion_confusion: {read.shape[0] if read.ndim else read} readings for "
                         f"{truth.shape[0] if truth.ndim else truth} frames; expected one each")
    k = len(EMOTIONS)
    if len(truth) and (min(read.min(), truth.min()) < 0 or max(read.max(), truth.max()) >= k):
        raise ValueError(f"emotion_confusion: indices outside 0..{k - 1} ({EMOTIONS})")
    return np.bincount(truth * k + read, minlength=k * k).reshape(k, k)


def _control_metrics(pred: dict, lab: dict, conf: np.ndarray | None = None) -> dict:
    """Pinned-control fidelity of the probe's readings ``pred`` against ``lab``; ``conf``: their
    :func:`emotion_confusion` when the caller has it already."""
    closed = np.asarray(lab["blink"]) >= 0.5
    switch = np.zeros_like(closed)
    switch[1:] = closed[1:] != closed[:-1]
    switch &= np.asarray(lab["first"]) == 0            # not across a clip boundary
    ok_blink = pred["blink"].astype(bool) == closed
    mae = lambda k: float(np.mean(np.abs(pred[k] - lab[k])))        # noqa: E731
    emo = float(np.mean(pred["emotion"] == lab["emotion"]))
    conf = emotion_confusion(pred["emotion"], lab["emotion"]) if conf is None else conf
    # per emotion: a user pins one at a time, and one the model cannot show hides in the mean
    recall = {f"emotion_recall_{name}": float(conf[i, i] / conf[i].sum()) if conf[i].sum() else math.nan
              for i, name in enumerate(EMOTIONS)}
    return {
        "yaw_mae_deg": mae("yaw"), "pitch_mae_deg": mae("pitch"), "roll_mae_deg": mae("roll"),
        "gaze_mae": (mae("gaze_x") + mae("gaze_y")) / 2,
        "blink_accuracy": float(np.mean(ok_blink)),
        "blink_next_frame_accuracy": float(np.mean(ok_blink[switch])) if switch.any() else math.nan,
        "blink_switches": int(switch.sum()),
        "emotion_accuracy": emo, "emotion_target_met": bool(emo >= EMOTION_TARGET), **recall,
    }


def _lipsync_metrics(pred: dict, lab: dict) -> dict:
    return {"mouth_open_pearson_r": pearson(pred["mouth_open"], lab["mouth_open"]),
            "viseme_accuracy": float(np.mean(pred["viseme"] == lab["viseme"]))}


# ----------------------------------------------------------------------------- running the model
def _frames_of(backend, portrait, audio, timeline=(), seed=0, keep=None, on_frame=None, refine=0, guidance=None,
               decode=None):
    """Run one session; -> list of the kept frames' images (all when ``keep`` is None)."""
    from eartalk.controls_timeline import apply_timeline
    from eartalk.generate import stream_frames
    from eartalk.runtime import Engine
    engine = Engine(backend, max_sessions=1)
    kept = []
    try:
        session = engine.open_session(portrait, seed=seed, refine=refine, guidance=guidance, decode=decode)
        apply_timeline(session, timeline)
        for f in stream_frames(session, audio):
            if keep is None or f.index in keep:
                kept.append(f.image)
            if on_frame is not None:
                on_frame(f)
    finally:
        engine.close()
    return kept


def pixel_mse(frames: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` against the truth -> the sum over frames of each pixel's squared
    error, averaged over RGB: float64 ``[H, W]`` (divide by n for the mean)."""
    frames, truth = np.asarray(frames), np.asarray(truth)
    if frames.shape != truth.shape or frames.ndim != 4:
        raise ValueError(f"frames and truth must both be [n, H, W, C], got {frames.shape} and {truth.shape}")
    return ((frames.astype(np.float64) - truth) ** 2).mean(-1).sum(0)


def _plot_error_map(path: Path, model: np.ndarray, tok: np.ndarray | None, n: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(model, "model, controls pinned")]
    if tok is not None:
        panels += [(tok, "tokenizer (the truth encoded, decoded)"), (model - tok, "model - tokenizer")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    top = float(np.quantile(model, 0.99)) or 1.0
    for ax, (img, name) in zip(axes[0], panels):
        diff = name.startswith("model -")
        im = ax.imshow(img, cmap="RdBu_r" if diff else "magma", vmin=-top if diff else 0, vmax=top)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: mean squared error per pixel over {n} frames (0-255 scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _probe(probe, frames) -> dict:
    from eartalk.model.train_gpt import fit_size
    from eartalk.probe.net import predict
    return predict(probe, fit_size(np.asarray(frames), probe.cfg.image_size), batch=64)


def _reconstruct(tokenizer, frames: np.ndarray, portrait: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 frames [T,S,S,3] through ``tokenizer`` against ``portrait`` [S,S,3] -> uint8 [T,S,S,3]."""
    import torch
    from eartalk.runtime.backend import to_uint8_frames
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))  # noqa: E731
    p = chw(portrait)[None]
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = chw(frames[i:i + batch])
            pp = p.expand(len(x), -1, -1, -1)
            out.append(to_uint8_frames(tokenizer.reconstruct(x, pp).numpy()))
    return np.concatenate(out) if out else np.zeros_like(frames)


def _rerender(clip, gt: dict) -> np.ndarray:
    """The renderer's frames of ``gt`` for ``clip``'s face, at the clip's own size."""
    from eartalk.data.synth import rerender
    ident = clip.identity
    if ident is None:
        raise ValueError(f"clip {clip.clip_id} has no identity in its metadata (.json); eval re-renders its face "
                         "with the blink pinned in steps and needs a synthetic clip's identity")
    return rerender(ident, gt, np.asarray(clip.frames).shape[1])


def _cat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def drift_checkpoints(n: int) -> tuple[list[int], int]:
    """(1-based frame numbers 100, 1000, ... up to ``n``, plus ``n``; the ratio's reference frame).

    The reference is frame 100 (frame n // 10, at least 2, for runs shorter than 100 frames)."""
    if n < 2:
        raise ValueError(f"--frames-drift must be >= 2, got {n}")
    ref = 100 if n >= 100 else max(2, n // 10)
    cps, c = {ref, n}, 100
    while c <= n:
        cps.add(c)
        c *= 10
    return sorted(cps), ref


def drift_windows(n: int, period: int) -> tuple[range, range]:
    """1-based frames over which the drift ratio's two distances are averaged: one loop of the
    clip (``period`` frames, at most ``n - 1``) centred on the reference frame (kept clear of frame
    1, the distances' origin) and the last loop, ending at frame ``n``. -> ``(reference, last)``."""
    if period < 1:
        raise ValueError(f"period must be >= 1 frame, got {period}")
    _, ref = drift_checkpoints(n)
    w = min(period, n - 1)
    start = min(max(2, ref - w // 2), n - w + 1)
    return range(start, start + w), range(n - w + 1, n + 1)


def looped_timeline(gt: dict[str, np.ndarray], n_frames: int) -> list[tuple[int, dict]]:
    """:func:`pinned_timeline` of the ground truth looped to ``n_frames`` (frame t pins the truth of
    frame t mod the clip's length), the controls the looped renders themselves were drawn with."""
    lengths = {len(np.asarray(v)) for v in gt.values()}
    if not lengths or min(lengths) < 1:
        raise ValueError("gt has no frames to loop")
    return pinned_timeline({k: np.resize(np.asarray(v), n_frames) for k, v in gt.items()}, n_frames)


def looped_audio(audio: np.ndarray, period: int, n_frames: int, samples_per_frame: int) -> np.ndarray:
    """The clip's speech looped in step with its frames: fitted to exactly ``period`` frames
    (zero-padded or trimmed at the end), then tiled to ``n_frames``. Why: a clip's audio is rarely a
    whole number of frames long (clip000005: 262 samples short), and looping the raw samples slid
    the speech 0.4 frame a loop against the looped ground truth, 21 frames out of step by frame
    10,000, so the pinned drift stream's mouth and its pinned motion parted as the stream ran."""
    if period < 1 or samples_per_frame < 1:
        raise ValueError(f"period ({period}) and samples_per_frame ({samples_per_frame}) must be >= 1")
    a = np.asarray(audio, np.float32).reshape(-1)
    one = np.zeros(period * samples_per_frame, np.float32)
    one[: a.size] = a[: one.size]           # slices stop at either end: pads or trims
    return np.resize(one, n_frames * samples_per_frame)


def _drift(backend, probe, clip, portrait, gt_frames, n: int, seed: int, progress: bool, refine: int = 0,
           guidance: float | None = None, controls: tuple[str, ...] = ("free",),
           decode: str | None = None) -> dict[str, dict]:
    """The identity-drift streams: ``n`` frames of the clip's looped speech, for each of
    ``controls``: ``"free"`` (the model's own motion) or ``"pinned"`` to the looped ground truth (the
    renders' own motion, so a change in distance is the identity's and not a change in how the face
    moves). -> {controls: result}; the ground truth's curve (the ceiling) is probed once for all."""
    from tqdm import tqdm
    cps, ref = drift_checkpoints(n)
    win_ref, win_last = drift_windows(n, len(gt_frames))
    grid = np.unique(np.linspace(1, n, min(n, DRIFT_SAMPLES)).round().astype(int))
    curve_1b = sorted(set(grid.tolist()) | set(cps) | {1})
    frames_1b = sorted(set(curve_1b) | set(win_ref) | set(win_last))
    keep = {f - 1 for f in frames_1b}
    spf = backend.cfg.samples_per_frame
    audio = looped_audio(clip.audio, len(gt_frames), n, spf)     # in step with the looped truth
    pick = np.searchsorted(frames_1b, curve_1b)      # the curve's frames among those probed

    def curve(images):
        emb = _probe(probe, images)["embedding"].astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return 1.0 - emb @ emb[0]

    def summary(d):
        at = dict(zip(frames_1b, d.tolist()))
        slope = float(np.polyfit(curve_1b, d[pick], 1)[0] * 1000) if len(curve_1b) > 1 else math.nan
        m_ref, m_last = (float(np.mean([at[f] for f in w])) for w in (win_ref, win_last))
        return {"distance_at": {str(c): at[c] for c in cps}, "slope_per_1000_frames": slope,
                "window_mean": {str(ref): m_ref, str(n): m_last},
                "ratio": m_last / m_ref if m_ref > 0 else math.nan,
                "ratio_single_frame": at[n] / at[ref] if at[ref] > 0 else math.nan}

    ceil = curve(gt_frames[[(f - 1) % len(gt_frames) for f in frames_1b]])
    ceiling = summary(ceil)
    runs = {}
    for mode in controls:
        if mode not in ("free", "pinned"):
            raise ValueError(f"drift controls {mode!r}: expected 'free' or 'pinned'")
        timeline = looped_timeline(clip.gt, n) if mode == "pinned" else ()
        bar = tqdm(total=n, desc=f"drift, controls {mode}", unit="frame", disable=not progress, file=sys.stderr)
        t0 = time.perf_counter()
        kept = _frames_of(backend, portrait, audio, timeline, seed=seed, keep=keep, on_frame=lambda f: bar.update(),
                          refine=refine, guidance=guidance, decode=decode)
        bar.close()
        secs = time.perf_counter() - t0
        ours = curve(kept)
        runs[mode] = {"clip": clip.clip_id, "frames": n, "controls": mode,
                      "ratio_frames": [n, ref], "fps": n / secs if secs else math.nan,
                      "ratio_windows": [[win_ref[0], win_ref[-1]], [win_last[0], win_last[-1]]],
                      "curve_frames": curve_1b, "curve": ours[pick].tolist(), "ceiling_curve": ceil[pick].tolist(),
                      **summary(ours), "ceiling": ceiling}
    return runs


def _plot_drift(d: dict, path: Path, pinned: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(d["curve_frames"], d["curve"], label=f"model, controls free (ratio {d['ratio']:.3f}, "
                                                 f"slope {d['slope_per_1000_frames']:.2g}/1000 frames)")
    if pinned is not None:
        ax.plot(pinned["curve_frames"], pinned["curve"], label=f"model, controls pinned to the truth "
                                                             f"(ratio {pinned['ratio']:.3f})")
    ax.plot(d["curve_frames"], d["ceiling_curve"], label="ground-truth renders (ceiling)", alpha=0.7)
    for i, (a, b) in enumerate(d.get("ratio_windows", ())):
        ax.axvspan(a, b, color="grey", alpha=0.2, label="ratio windows (one loop each)" if not i else None)
    ax.set_xlabel("frame")
    ax.set_ylabel("identity distance from frame 1 (1 - cos)")
    ax.set_title(f"identity drift, clip {d['clip']}, looped audio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the evaluation
def evaluate(model, data, out, *, split: str = "test", frames_drift: int = 10000, max_clips: int | None = None,
             random_init: bool = False, seed: int = 0, probe=None, backend=None, progress: bool = True,
             refine: int = 0, guidance: float | None = None, decode: str | None = None) -> dict:
    """Evaluate ``model`` (preset name or bundle directory) on ``data``'s ``split``; write the
    report JSON to ``out`` and the drift plot beside it (``<out stem>.drift.png``); -> the report.

    ``probe``: a loaded probe (default: the shipped one); ``backend``: a ready runtime backend
    (default: ``make_backend(model, "torch", random_init, seed)``); ``refine``: extra refinement
    passes per frame (``runtime/refine.py``), 0 = one pass; ``guidance``: audio guidance scale
    (``runtime/guidance.py``; None = its default, 1 = off); ``decode``: ``"expected"`` (None, the
    default) or ``"tokens"`` (``runtime/soft_decode.py``).
    """
    from tqdm import tqdm

    from eartalk.data.corpus import list_clips, load_clip
    from eartalk.model.train_gpt import clip_portrait, fit_size
    from eartalk.probe.net import load_probe
    from eartalk.generate import open_backend
    from eartalk.runtime.guidance import resolve_guidance
    from eartalk.runtime.soft_decode import check_decode
    guidance = resolve_guidance(guidance)
    decode = check_decode(decode)
    out = Path(out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {out}: expected a .json file name for the report")
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"--max-clips must be >= 1, got {max_clips}")
    drift_checkpoints(frames_drift)                      # validates
    ids = list_clips(data, split)                        # unknown split: lists the known ones
    if max_clips:
        ids = ids[:max_clips]
    if not ids:
        raise ValueError(f"corpus {data} has no clips in split {split!r}")
    probe = probe or load_probe()
    own_backend = backend is None
    backend = backend or open_backend(model, "torch", random_init=random_init, seed=seed)
    cfg = backend.cfg
    t0 = time.perf_counter()
    pinned, free, truth, labels, per_clip = [], [], [], [], []
    steps, step_ours, step_truth, step_recon = [], [], [], []    # the blink-step run's pins and readings
    psnrs, ssims = [], []
    tokenizer = getattr(getattr(backend, "bundle", None), "tokenizer", None)
    recon, r_psnrs, r_ssims = [], [], []
    first = None
    sheet_rows, sheet_at = [], []          # the middle frame of the first clips, to look at
    err_model, err_tok, err_n = 0.0, 0.0, 0   # per-pixel squared error of the pinned run / tokenizer
    try:
        for cid in tqdm(ids, desc=f"eval {split}", unit="clip", disable=not progress, file=sys.stderr):
            clip = load_clip(data, cid)
            if clip.gt is None:
                raise ValueError(f"clip {cid} of {data} has no ground truth (.gt.csv); eval needs synthetic clips")
            gt_frames = fit_size(np.asarray(clip.frames), cfg.image_size)
            portrait = clip_portrait(clip, cfg.image_size)
            n = len(gt_frames)
            c_psnr, c_ssim = [], []

            def score(f):
                if f.index < n:
                    c_psnr.append(psnr(f.image, gt_frames[f.index]))
                    c_ssim.append(ssim(f.image, gt_frames[f.index]))
            gen_pinned = _frames_of(backend, portrait, clip.audio, pinned_timeline(clip.gt, n), seed, on_frame=score,
                                    refine=refine, guidance=guidance, decode=decode)
            gen_free = _frames_of(backend, portrait, clip.audio, (), seed, refine=refine, guidance=guidance,
                                  decode=decode)
            step_gt = {**clip.gt, "blink": blink_steps(n)}
            gen_step = _frames_of(backend, portrait, clip.audio, pinned_timeline(step_gt, n), seed, refine=refine,
                                  guidance=guidance, decode=decode)
            m = min(n, len(gen_pinned), len(gen_free), len(gen_step))
            step_renders = fit_size(_rerender(clip, step_gt), cfg.image_size)[:m]
            lab = {k: np.asarray(clip.gt[k])[:m] for k in ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink",
                                                           "emotion", "mouth_open", "viseme")}
            lab["first"] = (np.arange(m) == 0).astype(np.int64)
            p_pin, p_free, p_gt = _probe(probe, gen_pinned[:m]), _probe(probe, gen_free[:m]), _probe(probe, gt_frames[:m])
            pinned.append(p_pin), free.append(p_free), truth.append(p_gt), labels.append(lab)
            steps.append(step_gt["blink"][:m])
            step_ours.append(_probe(probe, gen_step[:m])["blink"]), step_truth.append(_probe(probe, step_renders)["blink"])
            rec = None
            if tokenizer is not None:
                rec = _reconstruct(tokenizer, gt_frames[:m], portrait)
                recon.append(_probe(probe, rec))
                r_psnrs += [psnr(a, b) for a, b in zip(rec, gt_frames)]
                r_ssims += [ssim(a, b) for a, b in zip(rec, gt_frames)]
                err_tok = err_tok + pixel_mse(rec[:m], gt_frames[:m])
                step_recon.append(_probe(probe, _reconstruct(tokenizer, step_renders, portrait))["blink"])
            err_model = err_model + pixel_mse(np.stack(gen_pinned[:m]), gt_frames[:m])
            err_n += m
            psnrs += c_psnr[:m]
            ssims += c_ssim[:m]
            per_clip.append({"clip": cid, "frames": m, "psnr_db": _mean_psnr(c_psnr[:m]), "ssim": float(np.mean(c_ssim[:m])),
                             **_lipsync_metrics(p_free, lab), **_control_metrics(p_pin, lab),
                             **step_metrics(step_ours[-1], steps[-1])})
            if first is None:
                first = (clip, portrait, gt_frames)
            if len(sheet_rows) < SHEET_CLIPS and m:
                t = m // 2
                sheet_rows.append([portrait, gt_frames[t], gen_pinned[t], gen_free[t]] + ([rec[t]] if rec is not None else []))
                sheet_at.append({"clip": cid, "frame": t})
        runs = _drift(backend, probe, *first, frames_drift, seed, progress, refine, guidance, ("free", "pinned"),
                      decode)
        drift, drift_pinned = runs["free"], runs["pinned"]
    finally:
        if own_backend:
            backend.close()
    lab = _cat(labels)
    P, F, G = _cat(pinned), _cat(free), _cat(truth)
    R = _cat(recon) if recon else None      # same lab: pinned and free metrics alike from the reconstructed truth
    confusion = {k: emotion_confusion(X["emotion"], lab["emotion"]) if X is not None else None
                 for k, X in (("model", P), ("tokenizer", R), ("ceiling", G))}
    ref_frame = first[2][0]                     # the renders against themselves: inf / 1.0
    metrics = {"psnr_db": _mean_psnr(psnrs), "ssim": float(np.mean(ssims)),
               **_lipsync_metrics(F, lab), **_control_metrics(P, lab, confusion["model"]),
               **step_metrics(np.concatenate(step_ours), np.concatenate(steps)),
               "drift_slope_per_1000_frames": drift["slope_per_1000_frames"], "drift_ratio": drift["ratio"],
               "drift_ratio_single_frame": drift["ratio_single_frame"],
               "drift_slope_pinned_per_1000_frames": drift_pinned["slope_per_1000_frames"],
               "drift_ratio_pinned": drift_pinned["ratio"]}
    ceiling = {"psnr_db": psnr(ref_frame, ref_frame), "ssim": ssim(ref_frame, ref_frame),
               **_lipsync_metrics(G, lab), **_control_metrics(G, lab, confusion["ceiling"]),
               **step_metrics(np.concatenate(step_truth), np.concatenate(steps)),
               "drift_slope_per_1000_frames": drift["ceiling"]["slope_per_1000_frames"],
               "drift_ratio": drift["ceiling"]["ratio"], "drift_ratio_single_frame": drift["ceiling"]["ratio_single_frame"],
               "drift_slope_pinned_per_1000_frames": drift["ceiling"]["slope_per_1000_frames"],
               "drift_ratio_pinned": drift["ceiling"]["ratio"]}
    tok_ceiling = None
    if recon:
        tok_ceiling = {"psnr_db": _mean_psnr(r_psnrs), "ssim": float(np.mean(r_ssims)),
                       **_lipsync_metrics(R, lab), **_control_metrics(R, lab, confusion["tokenizer"]),
                       **step_metrics(np.concatenate(step_recon), np.concatenate(steps))}
    plot = out.with_name(out.stem + ".drift.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot_drift(drift, plot, drift_pinned)
    error_plot = out.with_name(out.stem + ".error.png")
    _plot_error_map(error_plot, err_model / err_n, err_tok / err_n if recon else None, err_n, f"{model}, {split} split")
    sheet = out.with_name(out.stem + ".frames.png")
    columns = ["portrait", "ground truth", "controls pinned", "controls free", "tokenizer"][:len(sheet_rows[0])]
    save_frame_sheet(sheet, sheet_rows, columns, [f"{a['clip']}\nframe {a['frame']}" for a in sheet_at],
                     title=f"{model}, {split} split: each clip's middle frame" +
                     (" (tokenizer: the truth encoded and decoded)" if tokenizer is not None else ""))
    info = getattr(getattr(backend, "bundle", None), "meta", {}) or {}
    report = {
        "model": str(model), "random_init": bool(random_init), "model_sha256": info.get("sha256"),
        "backend": type(backend).__name__, "precision": getattr(backend, "precision", "fp32"), "refine": int(refine),
        "guidance": guidance, "decode": decode,
        "config": cfg.to_dict(), "data": str(data), "split": split, "clips": [c["clip"] for c in per_clip],
        "frames": int(len(lab["viseme"])), "metrics": metrics, "ceiling": ceiling,
        "tokenizer_ceiling": tok_ceiling, "per_clip": per_clip,
        "emotion_confusion": {"rows": "the emotion pinned (the truth's)", "columns": "the emotion the probe read",
                              "labels": list(EMOTIONS),
                              **{k: c.tolist() if c is not None else None for k, c in confusion.items()}},
        "frames_sheet": {"plot": sheet.name, "columns": columns,
                         "rows": sheet_at},
        "error_map": {"plot": error_plot.name, "frames": int(err_n), "model_mse": float(np.mean(err_model) / err_n),
                      "tokenizer_mse": float(np.mean(err_tok) / err_n) if recon else None},
        "drift": {**drift, "plot": plot.name}, "drift_pinned": {**drift_pinned, "plot": plot.name}, "probe": _probe_info(), "seconds": time.perf_counter() - t0,
        "notes": ["ceiling = the same probe on the ground-truth renders (psnr/ssim of the renders with "
                  "themselves: inf / 1); control metrics from the pinned run, lip-sync from the free run",
                  "plots are named relative to this report: they are written beside it",
                  "non-finite numbers are stored as null (NaN: undefined, e.g. a constant prediction) "
                  "or the string \"inf\""],
    }
    out.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    return report


def _mean_psnr(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if values and not finite:
        return math.inf
    return float(np.mean(finite)) if finite else math.nan


def _probe_info() -> dict:
    from eartalk.probe.net import SHIPPED
    try:
        meta = json.loads((SHIPPED / "probe.json").read_text())
        return {"sha256": meta.get("sha256"), "report": meta.get("report", {})}
    except (OSError, ValueError):
        return {}


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        v = float(o)
        return v if math.isfinite(v) else ("inf" if v == math.inf else None)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


ROWS = (("psnr_db", "PSNR (dB), pinned", ".2f"), ("ssim", "SSIM, pinned", ".4f"),
        ("mouth_open_pearson_r", "mouth openness r, free", ".3f"), ("viseme_accuracy", "viseme accuracy, free", ".3f"),
        ("yaw_mae_deg", "yaw MAE (deg), pinned", ".2f"), ("pitch_mae_deg", "pitch MAE (deg), pinned", ".2f"),
        ("roll_mae_deg", "roll MAE (deg), pinned", ".2f"), ("gaze_mae", "gaze MAE (travel -1..1), pinned", ".3f"),
        ("blink_accuracy", "blink obeyed, all frames", ".3f"),
        ("blink_next_frame_accuracy", "blink obeyed, frame after a switch", ".3f"),
        ("blink_step_shut_accuracy", "blink pinned shut in a step, that frame", ".3f"),
        ("blink_step_open_accuracy", "blink pinned open in a step, that frame", ".3f"),
        ("blink_step_shut_frames", "blink pinned shut in a step, every frame", ".3f"),
        ("emotion_accuracy", f"emotion recognised (target >= {EMOTION_TARGET:.0%})", ".3f"),
        *((f"emotion_recall_{e}", f"  of the frames pinned {e}", ".3f") for e in EMOTIONS),
        ("drift_slope_per_1000_frames", "identity drift slope / 1000 frames", ".2e"),
        ("drift_ratio", "identity drift dist(last)/dist(ref), loop means", ".3f"),
        ("drift_ratio_single_frame", "identity drift dist(last)/dist(ref), one frame", ".2f"),
        ("drift_slope_pinned_per_1000_frames", "drift slope / 1000 frames, controls pinned", ".2e"),
        ("drift_ratio_pinned", "drift ratio, loop means, controls pinned", ".3f"))


def _span(drift: dict, i: int) -> str:
    w = drift.get("ratio_windows")       # absent from reports written before the loop means
    return f"{w[i][0]}-{w[i][1]}" if w else "n/a"


def format_table(report: dict) -> str:
    """The metrics beside their ceiling, as a plain-text table."""
    def fmt(v, spec):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if v == "inf" or v == math.inf:
            return "inf"
        return format(v, spec)
    d = report["drift"]
    lines = [f"eval of {report['model']} on {report['data']} [{report['split']}]: {len(report['clips'])} clips, "
             f"{report['frames']} frames; drift on {d['clip']} over {d['frames']} frames "
             f"(ratio = dist({d['ratio_frames'][0]}) / dist({d['ratio_frames'][1]}), each the mean over one loop: "
             f"frames {_span(d, 1)} / {_span(d, 0)})",
             f"{'metric':<44} {'model':>10} {'tokenizer':>10} {'ceiling':>10}"]
    tok = report.get("tokenizer_ceiling") or {}
    for key, label, spec in ROWS:
        lines.append(f"{label:<44} {fmt(report['metrics'].get(key), spec):>10} {fmt(tok.get(key), spec):>10} "
                     f"{fmt(report['ceiling'].get(key), spec):>10}")
    return "\n".join(lines)
