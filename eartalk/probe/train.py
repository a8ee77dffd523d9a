"""Train the probe on rendered frames and their ground truth; write its accuracy report.

Held-out evaluation uses the corpus's test split, whose identities and voices never appear in
training, so the report says how well the probe measures faces and speech it has never seen.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eartalk.data.corpus import list_clips, load_clip
from eartalk.probe.net import GAZE, POSE, Probe, ProbeConfig, pose_scale, predict, save_probe

LABELS = ("viseme", "mouth_open", "yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink", "emotion", "identity")


def load_frames(corpus: Path, split: str, every: int = 1, max_clips: int | None = None,
                progress: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Frames (every ``every``-th) of a split with their labels, all in memory."""
    ids = list_clips(corpus, split)
    if max_clips:
        ids = ids[:max_clips]
    if not ids:
        raise ValueError(f"corpus {corpus} has no clips in split {split!r}")
    frames, labels = [], {k: [] for k in LABELS}
    for cid in tqdm(ids, desc=f"loading {split}", disable=not progress, unit="clip"):
        clip = load_clip(corpus, cid, frames=True)
        sel = slice(0, None, every)
        frames.append(np.asarray(clip.frames)[sel])
        n = len(frames[-1])
        for k in LABELS:
            if k == "identity":
                labels[k].append(np.full(n, int(clip.meta["identity_id"]), np.int64))
            else:
                labels[k].append(np.asarray(clip.gt[k])[sel][:n])
    return np.concatenate(frames), {k: np.concatenate(v) for k, v in labels.items()}


def _targets(lab: dict[str, np.ndarray], idx: np.ndarray, id_map: dict[int, int]) -> dict[str, torch.Tensor]:
    scale = pose_scale().numpy()
    pose = np.stack([lab[k][idx] for k in POSE], -1).astype(np.float32) / scale
    return {
        "viseme": torch.from_numpy(lab["viseme"][idx].astype(np.int64)),
        "emotion": torch.from_numpy(lab["emotion"][idx].astype(np.int64)),
        "blink": torch.from_numpy((lab["blink"][idx] >= 0.5).astype(np.float32)),
        "mouth_open": torch.from_numpy(lab["mouth_open"][idx].astype(np.float32)),
        "pose": torch.from_numpy(pose),
        "gaze": torch.from_numpy(np.stack([lab[k][idx] for k in GAZE], -1).astype(np.float32)),
        "identity": torch.tensor([id_map[int(i)] for i in lab["identity"][idx]], dtype=torch.long),
    }


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild blur and noise, so the probe also reads the softer frames a generator makes."""
    b = x.shape[0]
    blur = torch.rand(b, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.03
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def probe_loss(out: dict, t: dict) -> torch.Tensor:
    return (F.cross_entropy(out["viseme"], t["viseme"]) + F.cross_entropy(out["emotion"], t["emotion"])
            + F.binary_cross_entropy_with_logits(out["blink"], t["blink"])
            + 4 * F.smooth_l1_loss(out["mouth_open"], t["mouth_open"], beta=0.05)
            + 4 * F.smooth_l1_loss(out["pose"], t["pose"], beta=0.05)
            + 2 * F.smooth_l1_loss(out["gaze"], t["gaze"], beta=0.05)
            + 0.5 * F.cross_entropy(out["identity"], t["identity"]))


def evaluate(probe: Probe, frames: np.ndarray, lab: dict[str, np.ndarray],
             identities: np.ndarray | None = None) -> dict:
    """Held-out accuracy of the probe against exact ground truth."""
    p = predict(probe, frames)
    r = float(np.corrcoef(p["mouth_open"], lab["mouth_open"])[0, 1])
    pose_err = {k: float(np.mean(np.abs(p[k] - lab[k]))) for k in POSE}
    rep = {
        "frames": int(len(frames)),
        "mouth_open_pearson_r": r,
        "viseme_accuracy": float(np.mean(p["viseme"] == lab["viseme"])),
        "pose_mae_deg": float(np.mean(list(pose_err.values()))),
        "pose_mae_deg_per_axis": pose_err,
        "gaze_mae": float(np.mean([np.mean(np.abs(p[k] - lab[k])) for k in GAZE])),
        "blink_accuracy": float(np.mean(p["blink"] == (lab["blink"] >= 0.5))),
        "emotion_accuracy": float(np.mean(p["emotion"] == lab["emotion"])),
    }
    ids = lab["identity"]
    # Identity: nearest class-mean embedding among held-out identities (never trained on).
    uniq = np.unique(ids)
    means = np.stack([p["embedding"][ids == u].mean(0) for u in uniq])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    nearest = uniq[np.argmax(p["embedding"] @ means.T, axis=1)]
    rep["identity_nn_accuracy"] = float(np.mean(nearest == ids))
    rep["held_out_identities"] = int(len(uniq))
    return rep


TARGETS = {"mouth_open_pearson_r": (">=", 0.95), "viseme_accuracy": (">=", 0.85),
           "pose_mae_deg": ("<=", 2.0), "blink_accuracy": (">=", 0.97), "emotion_accuracy": (">=", 0.95)}


def report_markdown(rep: dict) -> str:
    lines = ["# Probe accuracy on held-out identities and voices", "",
             f"Test split: {rep['frames']} frames, {rep['held_out_identities']} identities never seen in training.", "",
             "| metric | value | target | met |", "|---|---|---|---|"]
    for k, (op, thr) in TARGETS.items():
        v = rep[k]
        ok = v >= thr if op == ">=" else v <= thr
        lines.append(f"| {k} | {v:.4f} | {op} {thr} | {'yes' if ok else 'NO'} |")
    lines += [f"| gaze_mae | {rep['gaze_mae']:.4f} | | |",
              f"| identity_nn_accuracy | {rep['identity_nn_accuracy']:.4f} | | |", ""]
    return "\n".join(lines)


def train_probe(corpus: Path, out_dir: Path, steps: int = 3000, batch: int = 96, lr: float = 2e-3,
                every: int = 3, seed: int = 0, progress: bool = True, max_clips: int | None = None) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    frames, lab = load_frames(corpus, "train", every=every, max_clips=max_clips, progress=progress)
    test_frames, test_lab = load_frames(corpus, "test", every=every, max_clips=max_clips, progress=progress)
    id_map = {int(u): i for i, u in enumerate(np.unique(lab["identity"]))}
    n_vis = int(max(lab["viseme"].max(), test_lab["viseme"].max())) + 1
    from eartalk.data.visemes import VISEMES
    cfg = ProbeConfig(image_size=frames.shape[1], n_visemes=len(VISEMES), n_identities=len(id_map))
    assert n_vis <= cfg.n_visemes
    probe = Probe(cfg)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="probe", disable=not progress)
    losses = []
    for step in bar:
        idx = rng.integers(0, len(frames), batch)
        x = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float() / 255.0
        probe.train()
        loss = probe_loss(probe(_augment(x, g)), _targets(lab, idx, id_map))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    rep = evaluate(probe, test_frames, test_lab)
    rep.update(train_frames=int(len(frames)), steps=steps, batch=batch,
               train_minutes=round((time.time() - t0) / 60, 2), corpus=str(corpus))
    rep["targets_met"] = all((rep[k] >= t) if op == ">=" else (rep[k] <= t) for k, (op, t) in TARGETS.items())
    save_probe(probe, out_dir, extra={"report": rep})
    (Path(out_dir) / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    (Path(out_dir) / "report.md").write_text(report_markdown(rep))
    _plot_loss(losses, Path(out_dir) / "loss.png")
    return rep


def _plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = max(1, len(losses) // 200)
    sm = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(sm)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("probe training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
