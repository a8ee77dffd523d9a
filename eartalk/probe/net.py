"""The probe network: from one frame, predict viseme, mouth openness, pose, gaze, blink, emotion
and an identity embedding.

It is trained only on rendered frames and their exact ground truth (``train.py``), never on model
output, so that it can measure generated video without being fooled by it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eartalk.model.config import CONTROLS, EMOTIONS

# Regression targets, each normalised to about [-1, 1] by its range for training.
POSE = ("yaw", "pitch", "roll")
GAZE = ("gaze_x", "gaze_y")
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "probe"


@dataclass
class ProbeConfig:
    image_size: int = 128
    n_visemes: int = 10
    n_identities: int = 160       # training identities (classification head, for the embedding)
    embed_dim: int = 64
    width: int = 16


def _block(cin, cout, stride, double=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]
    if double:
        layers += [nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]
    return nn.Sequential(*layers)


class Probe(nn.Module):
    """A small CNN with one head per quantity. Input: uint8 or [0,1] float frames [B,3,H,W]."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # 128 -> 64 -> 32 -> 16 -> 8 -> 4; full resolution gets one cheap conv (CPU training budget)
        self.trunk = nn.Sequential(_block(3, w, 2, double=False), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                   _block(4 * w, 8 * w, 2), _block(8 * w, 16 * w, 2, double=False))
        feat = 16 * w * 4 * 4
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(feat, 256), nn.SiLU())
        self.viseme = nn.Linear(256, cfg.n_visemes)
        self.emotion = nn.Linear(256, len(EMOTIONS))
        self.blink = nn.Linear(256, 1)          # logit of "eyes closed" (blink >= 0.5)
        self.reg = nn.Linear(256, 1 + len(POSE) + len(GAZE))  # mouth_open, pose, gaze (normalised)
        self.embed = nn.Linear(256, cfg.embed_dim)
        self.id_head = nn.Linear(cfg.embed_dim, cfg.n_identities, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
            raise ValueError(f"probe expects {self.cfg.image_size}x{self.cfg.image_size} frames, "
                             f"got {tuple(x.shape[-2:])}")
        h = self.fc(self.trunk(x * 2 - 1))
        reg = self.reg(h)
        emb = F.normalize(self.embed(h), dim=-1)
        return {
            "viseme": self.viseme(h), "emotion": self.emotion(h), "blink": self.blink(h)[:, 0],
            "mouth_open": reg[:, 0], "pose": reg[:, 1:4], "gaze": reg[:, 4:6],
            "embedding": emb, "identity": self.id_head(emb) * 16.0,  # cosine softmax scale
        }


def pose_scale() -> torch.Tensor:
    """Degrees per unit of the normalised pose output (half of each control's range)."""
    return torch.tensor([CONTROLS[k][2][1] for k in POSE], dtype=torch.float32)


@torch.no_grad()
def predict(probe: Probe, frames: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Run the probe over uint8 frames [T,H,W,3]; returns per-frame predictions in real units."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got shape {frames.shape}")
    probe.eval()
    outs: dict[str, list] = {}
    scale = pose_scale()
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])).permute(0, 3, 1, 2)
        o = probe(x)
        res = {
            "viseme": o["viseme"].argmax(-1), "emotion": o["emotion"].argmax(-1),
            "blink": (o["blink"] > 0).long(), "mouth_open": o["mouth_open"],
            "yaw": o["pose"][:, 0] * scale[0], "pitch": o["pose"][:, 1] * scale[1],
            "roll": o["pose"][:, 2] * scale[2], "gaze_x": o["gaze"][:, 0], "gaze_y": o["gaze"][:, 1],
            "embedding": o["embedding"],
        }
        for k, v in res.items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def save_probe(probe: Probe, out_dir: Path, extra: dict | None = None) -> Path:
    """Weights as safetensors plus a config JSON carrying the weights' sha256."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wpath = out_dir / "probe.safetensors"
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(wpath))
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    meta = {"config": asdict(probe.cfg), "sha256": digest, **(extra or {})}
    (out_dir / "probe.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return wpath


def load_probe(path: str | Path | None = None) -> Probe:
    """Load a probe directory (default: the one shipped in the package); the hash is checked."""
    from safetensors.torch import load_file
    d = Path(path) if path is not None else SHIPPED
    cfg_path, wpath = d / "probe.json", d / "probe.safetensors"
    if not cfg_path.exists() or not wpath.exists():
        raise FileNotFoundError(f"no probe at {d}: expected probe.json and probe.safetensors "
                                f"(train one with `eartalk train probe`)")
    meta = json.loads(cfg_path.read_text())
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    if digest != meta.get("sha256"):
        raise ValueError(f"{wpath}: weights hash {digest[:12]} does not match probe.json "
                         f"({str(meta.get('sha256'))[:12]}); the file is stale or corrupt")
    probe = Probe(ProbeConfig(**meta["config"]))
    probe.load_state_dict(load_file(str(wpath)))
    probe.eval()
    return probe
