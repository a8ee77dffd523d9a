"""The synthetic talking-face corpus: speech from eSpeak NG, faces from the procedural renderer,
and exact per-frame ground truth.

Every clip is planned from ``(seed, clip index)`` alone, so the same seed gives the same clips
whatever the number of workers or the order they finish in, and an interrupted run resumes by
skipping the clips whose completion marker exists. Splits hold out whole identities and whole
voices: a test clip has a test identity and a test voice.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from eartalk.data import corpus, face, identity, motion, speech, texts, visemes
from eartalk.data.mouth import MOUTH_FIELDS, MouthShape
from eartalk.model.config import CONTROLS, EMOTIONS

SPLITS = ("train", "val", "test")
SPLIT_P = (0.8, 0.1, 0.1)
FPS = 25
SAMPLE_RATE = 16000


@dataclass
class ClipPlan:
    index: int
    clip_id: str
    split: str
    identity_id: int
    voice: str
    rate: int
    pitch: int
    sentences: list[str]
    lead_s: float
    gaps_s: list[float]
    tail_s: float
    pins: dict = field(default_factory=dict)


def default_identities(n_clips: int) -> int:
    """About four clips per identity, and at least one identity per split."""
    return max(len(SPLITS), math.ceil(n_clips / 4))


def _split_members(items: list, rng: np.random.Generator) -> dict[str, list]:
    """Partition items 80/10/10 with at least one in each split."""
    items = list(items)
    rng.shuffle(items)
    n = len(items)
    n_val = max(1, round(n * SPLIT_P[1]))
    n_test = max(1, round(n * SPLIT_P[2]))
    assert n - n_val - n_test >= 1, f"need at least {len(SPLITS)} items to split, got {n}"
    return {"test": sorted(items[:n_test]), "val": sorted(items[n_test:n_test + n_val]),
            "train": sorted(items[n_test + n_val:])}


def split_assignment(seed: int, n_identities: int, voices: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """Which identities and voices belong to which split (disjoint across splits)."""
    rng = np.random.default_rng([seed, 7])
    return {"identities": _split_members(range(n_identities), rng),
            "voices": _split_members(voices, rng)}


def _random_pins(n_frames: int, rng: np.random.Generator) -> dict:
    """A pinned timeline for some controls of some clips, so the corpus holds both regimes."""
    pins: dict[str, list] = {}
    if rng.random() < 0.35:
        for name in rng.choice(["yaw", "pitch", "roll", "gaze_x", "emotion", "blink"], size=2, replace=False):
            keys, f = [], 0
            while f < n_frames:
                if name == "emotion":
                    val = str(EMOTIONS[rng.integers(len(EMOTIONS))])
                elif name == "blink":
                    val = float(rng.choice([0.0, 1.0], p=[0.8, 0.2]))
                else:
                    lo, hi = CONTROLS[name][2]
                    val = round(float(rng.uniform(lo, hi)), 2)
                # sometimes hand the control back to idle motion
                keys.append((f, None if rng.random() < 0.15 else val))
                f += int(rng.integers(FPS, 4 * FPS))
            pins[str(name)] = keys
    return pins


def plan_clip(index: int, seed: int, assignment: dict, voices_rates=(120, 230), pitches=(25, 75)) -> ClipPlan:
    rng = np.random.default_rng([seed, 11, index])
    split = SPLITS[int(rng.choice(len(SPLITS), p=SPLIT_P))]
    ids = assignment["identities"][split]
    vs = assignment["voices"][split]
    n_sent = int(rng.integers(1, 4))
    return ClipPlan(
        index=index, clip_id=f"clip{index:06d}", split=split,
        identity_id=int(ids[rng.integers(len(ids))]), voice=str(vs[rng.integers(len(vs))]),
        rate=int(rng.integers(*voices_rates)), pitch=int(rng.integers(*pitches)),
        sentences=[texts.sentence(rng) for _ in range(n_sent)],
        lead_s=round(float(rng.uniform(0.2, 0.8)), 3),
        gaps_s=[round(float(rng.uniform(0.15, 0.6)), 3) for _ in range(n_sent - 1)],
        tail_s=round(float(rng.uniform(0.2, 0.6)), 3),
    )


def make_identity(seed: int, identity_id: int) -> identity.Identity:
    return identity.Identity.sample(np.random.default_rng([seed, 13, identity_id]))


def speak(plan: ClipPlan) -> speech.Utterance:
    """The clip's sentences joined with silences, phoneme times shifted to the joined audio."""
    pieces, phon, t = [], [], 0.0

    def silence(sec):
        nonlocal t
        n = int(round(sec * SAMPLE_RATE))
        pieces.append(np.zeros(n, np.float32))
        t += n / SAMPLE_RATE

    silence(plan.lead_s)
    for i, text in enumerate(plan.sentences):
        u = speech.synthesize(text, plan.voice, rate=plan.rate, pitch=plan.pitch)
        phon += [(s + t, e + t, p) for s, e, p in u.phonemes]
        pieces.append(u.audio.astype(np.float32))
        t += len(u.audio) / SAMPLE_RATE
        if i < len(plan.gaps_s):
            silence(plan.gaps_s[i])
    silence(plan.tail_s)
    audio = np.concatenate(pieces)
    return speech.Utterance(audio=audio, phonemes=phon, text=" ".join(plan.sentences),
                            voice=plan.voice, rate=plan.rate, pitch=plan.pitch)


def render_clip(plan: ClipPlan, seed: int, size: int):
    """Frames, audio, per-frame ground truth and metadata of one planned clip."""
    utt = speak(plan)
    n_frames = math.ceil(len(utt.audio) / (SAMPLE_RATE / FPS))
    track = visemes.frame_track(utt, fps=FPS, n_frames=n_frames)
    rng = np.random.default_rng([seed, 17, plan.index])
    plan.pins = _random_pins(n_frames, rng)
    ctl = motion.controls_track(n_frames, rng, fps=FPS, pins=plan.pins)
    ident = make_identity(seed, plan.identity_id)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        state = face.FaceState(
            mouth=MouthShape(*(float(v) for v in track.shape[t])),
            yaw=float(ctl["yaw"][t]), pitch=float(ctl["pitch"][t]), roll=float(ctl["roll"][t]),
            gaze_x=float(ctl["gaze_x"][t]), gaze_y=float(ctl["gaze_y"][t]), blink=float(ctl["blink"][t]),
            emotion=int(ctl["emotion"][t]), emotion_intensity=float(ctl["emotion_intensity"][t]))
        frames[t] = face.render(ident, state, size=size)
    gt = ground_truth(track, ctl, ident, plan, n_frames)
    meta = {
        "clip_id": plan.clip_id, "split": plan.split, "identity_id": plan.identity_id,
        "identity": ident.to_dict(), "plan": asdict(plan), "seed": seed, "size": size, "fps": FPS,
        "sample_rate": SAMPLE_RATE, "n_frames": n_frames, "duration_s": len(utt.audio) / SAMPLE_RATE,
        "voice": plan.voice, "text": utt.text, "summary": _summary(gt),
    }
    return frames, utt.audio, gt, meta


def ground_truth(track, ctl: dict, ident, plan: ClipPlan, n: int) -> dict[str, np.ndarray]:
    """One row per frame: what was said and shown, exactly."""
    gt: dict[str, np.ndarray] = {
        "frame": np.arange(n), "time_s": np.arange(n) / FPS,
        "phoneme": np.asarray(track.phoneme[:n], dtype=object),
        "viseme": np.asarray(track.viseme[:n], np.int64),
    }
    for j, name in enumerate(MOUTH_FIELDS):
        gt[gt_column(name)] = np.asarray(track.shape[:n, j], np.float32)
    for k in ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink", "emotion", "emotion_intensity"):
        gt[k] = np.asarray(ctl[k][:n])
    gt["identity"] = np.full(n, plan.identity_id, np.int64)
    for j, v in enumerate(ident.identity_vector()):
        gt[f"id_{j}"] = np.full(n, float(v), np.float32)
    return gt


def gt_column(mouth_field: str) -> str:
    """The ground-truth column of a :class:`MouthShape` field (``open`` -> ``mouth_open``)."""
    return "mouth_" + mouth_field if mouth_field in ("open", "width") else mouth_field


def rerender(identity_dict: dict, gt: dict, size: int) -> np.ndarray:
    """uint8 ``[T, size, size, 3]``: the frames that ground-truth columns ``gt`` (as
    :func:`ground_truth` names them) describe, rendered again. A clip's own ``gt`` gives its frames
    back bit for bit, so a changed column (eval's stepped blink) renders what its truth would be."""
    ident = identity.Identity.from_dict(identity_dict)
    n = len(gt["blink"])
    out = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        state = face.FaceState(
            mouth=MouthShape(*(float(gt[gt_column(f)][t]) for f in MOUTH_FIELDS)),
            **{k: float(gt[k][t]) for k in ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink")},
            emotion=int(gt["emotion"][t]), emotion_intensity=float(gt["emotion_intensity"][t]))
        out[t] = face.render(ident, state, size=size)
    return out


def _summary(gt: dict) -> dict:
    """What the data card aggregates, kept in each clip's metadata so resumes stay cheap."""
    n = len(gt["frame"])
    blink_onsets = int(np.sum(np.diff((np.asarray(gt["blink"]) >= 0.5).astype(int)) == 1))
    return {
        "frames": n,
        "viseme_counts": np.bincount(gt["viseme"], minlength=len(visemes.VISEMES)).tolist(),
        "emotion_counts": np.bincount(gt["emotion"].astype(int), minlength=len(EMOTIONS)).tolist(),
        "blinks": blink_onsets,
        "pose_sum": [float(np.sum(gt[k])) for k in ("yaw", "pitch", "roll")],
        "pose_sq": [float(np.sum(np.square(gt[k]))) for k in ("yaw", "pitch", "roll")],
        "pose_min": [float(np.min(gt[k])) for k in ("yaw", "pitch", "roll")],
        "pose_max": [float(np.max(gt[k])) for k in ("yaw", "pitch", "roll")],
        "speech_frames": int(np.sum(np.asarray(gt["viseme"]) != 0)),
    }


def _work(job) -> str:
    plan, seed, size, out = job
    frames, audio, gt, meta = render_clip(plan, seed, size)
    corpus.write_clip(out, plan.clip_id, frames, audio, gt, meta)
    return plan.clip_id


def synthesize_corpus(out: Path, clips: int, seed: int, size: int = 128, workers: int | None = None,
                      n_identities: int | None = None, voices: tuple[str, ...] | None = None,
                      progress: bool = True) -> dict:
    """Generate (or finish) a corpus; returns the data card."""
    validate_args(out, clips, size, voices)
    out = Path(out)
    voices = tuple(voices or speech.VOICES)
    n_identities = n_identities or default_identities(clips)
    assignment = split_assignment(seed, n_identities, voices)
    with _run_lock(out):
        return _synthesize(out, clips, seed, size, workers, assignment, progress)


def _synthesize(out: Path, clips: int, seed: int, size: int, workers, assignment: dict, progress: bool) -> dict:
    from tqdm import tqdm
    corpus.cleanup_partial(out)
    plans = [plan_clip(i, seed, assignment) for i in range(clips)]
    todo = [p for p in plans if not corpus.clip_done(out, p.clip_id)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    jobs = [(p, seed, size, out) for p in todo]
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc="synth", unit="clip", disable=not progress)
    if workers == 1:
        for j in jobs:
            _work(j)
            bar.update()
    else:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_work, jobs):
                bar.update()
    bar.close()
    splits = {s: [p.clip_id for p in plans if p.split == s] for s in SPLITS}
    corpus.write_splits(out, splits)
    card = data_card(out, plans, assignment, seed, size)
    return card


class _run_lock:
    """One synth per output folder at a time: a second run would delete the first's temp files."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".synth.lock"

    def __enter__(self):
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
                os.kill(pid, 0)
                alive = pid != os.getpid()
            except (ValueError, ProcessLookupError, PermissionError):
                alive = False
            if alive:
                raise RuntimeError(f"another `eartalk synth` (pid {pid}) is writing to {self.path.parent}; "
                                   f"wait for it or stop it (its lock: {self.path})")
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def validate_args(out, clips, size, voices) -> None:
    if not isinstance(clips, int) or clips <= 0:
        raise ValueError(f"--clips must be a positive integer, got {clips}")
    if size <= 0 or size % 16:
        raise ValueError(f"--size must be a positive multiple of 16, got {size}")
    if voices:
        bad = [v for v in voices if v not in speech.VOICES]
        if bad:
            raise ValueError(f"unknown voice(s) {bad}; expected some of {list(speech.VOICES)}")
        if len(set(voices)) < len(SPLITS):
            raise ValueError(f"--voices needs at least {len(SPLITS)} voices (one per split), got {len(set(voices))}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out {out} is not writable: {e}") from None


def data_card(out: Path, plans: list[ClipPlan], assignment: dict, seed: int, size: int) -> dict:
    """Counts, durations and distributions of the corpus, written beside it (JSON + markdown)."""
    per_split = {}
    vis_total = np.zeros(len(visemes.VISEMES), np.int64)
    emo_total = np.zeros(len(EMOTIONS), np.int64)
    frames_total = blinks = 0
    pose_sum, pose_sq = np.zeros(3), np.zeros(3)
    pose_min, pose_max = np.full(3, np.inf), np.full(3, -np.inf)
    durations = []
    for s in SPLITS:
        sp = [p for p in plans if p.split == s]
        metas = [json.loads((out / "clips" / f"{p.clip_id}.json").read_text()) for p in sp]
        per_split[s] = {"clips": len(sp), "seconds": round(sum(m["duration_s"] for m in metas), 2),
                        "identities": len({p.identity_id for p in sp}), "voices": sorted({p.voice for p in sp})}
        for m in metas:
            su = m["summary"]
            vis_total += su["viseme_counts"]
            emo_total += su["emotion_counts"]
            frames_total += su["frames"]
            blinks += su["blinks"]
            pose_sum += su["pose_sum"]
            pose_sq += su["pose_sq"]
            pose_min = np.minimum(pose_min, su["pose_min"])
            pose_max = np.maximum(pose_max, su["pose_max"])
            durations.append(m["duration_s"])
    mean = pose_sum / max(frames_total, 1)
    card = {
        "seed": seed, "size": size, "fps": FPS, "sample_rate": SAMPLE_RATE, "clips": len(plans),
        "hours": round(sum(durations) / 3600, 3), "frames": frames_total,
        "identities": len({p.identity_id for p in plans}), "voices": sorted({p.voice for p in plans}),
        "splits": per_split, "held_out": {k: v for k, v in assignment.items()},
        "clip_seconds": {"min": round(min(durations), 2), "mean": round(float(np.mean(durations)), 2),
                         "max": round(max(durations), 2)},
        "viseme_distribution": dict(zip(visemes.VISEMES, (vis_total / max(frames_total, 1)).round(4).tolist())),
        "emotion_distribution": dict(zip(EMOTIONS, (emo_total / max(frames_total, 1)).round(4).tolist())),
        "blinks_per_minute": round(blinks / max(frames_total / FPS / 60, 1e-9), 2),
        "pose_deg": {k: {"mean": round(float(mean[i]), 2),
                         "std": round(float(np.sqrt(max(pose_sq[i] / max(frames_total, 1) - mean[i] ** 2, 0))), 2),
                         "min": round(float(pose_min[i]), 2), "max": round(float(pose_max[i]), 2)}
                     for i, k in enumerate(("yaw", "pitch", "roll"))},
        "pinned_clips": sum(1 for p in plans if _pins_of(out, p)),
    }
    (out / "data_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "data_card.md").write_text(_card_md(card))
    return card


def _pins_of(out: Path, plan: ClipPlan) -> bool:
    return bool(json.loads((out / "clips" / f"{plan.clip_id}.json").read_text())["plan"]["pins"])


def _card_md(c: dict) -> str:
    rows = "\n".join(f"| {s} | {v['clips']} | {v['seconds'] / 60:.1f} | {v['identities']} | {', '.join(v['voices'])} |"
                     for s, v in c["splits"].items())
    vis = ", ".join(f"{k} {v:.1%}" for k, v in c["viseme_distribution"].items())
    emo = ", ".join(f"{k} {v:.1%}" for k, v in c["emotion_distribution"].items())
    pose = "; ".join(f"{k} mean {v['mean']} std {v['std']} range [{v['min']}, {v['max']}]" for k, v in c["pose_deg"].items())
    return f"""# Data card: synthetic talking faces

Generated by `eartalk synth` (seed {c['seed']}, {c['size']}x{c['size']} px, {c['fps']} fps, {c['sample_rate']} Hz).
Speech: eSpeak NG voices, phoneme timing from the synthesiser's own events. Faces: procedural renderer.
Splits hold out whole identities and whole voices.

- clips: {c['clips']}, hours: {c['hours']}, frames: {c['frames']}
- identities: {c['identities']}, voices: {len(c['voices'])}
- clip length (s): min {c['clip_seconds']['min']}, mean {c['clip_seconds']['mean']}, max {c['clip_seconds']['max']}
- clips with a pinned control timeline: {c['pinned_clips']}
- blinks per minute: {c['blinks_per_minute']}

| split | clips | minutes | identities | voices |
|---|---|---|---|---|
{rows}

Visemes (share of frames): {vis}

Emotions (share of frames): {emo}

Pose (degrees): {pose}
"""
