"""A model bundle: the tokenizer, the audio encoder and the transformer of one configuration,
stored as one safetensors file plus a JSON card carrying the config and the weights' sha256.

``load_bundle("tiny")`` finds the default model shipped in the package; a directory path loads a
user's own. The hash and the config are checked before any weight is used.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eartalk.model.audio import AudioEncoder
from eartalk.model.config import PRESETS, ModelConfig
from eartalk.model.gpt import EARTalkGPT
from eartalk.model.tokenizer import VQTokenizer

FORMAT = 1
MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
WEIGHTS, CARD = "model.safetensors", "model.json"


@dataclass
class ModelBundle:
    cfg: ModelConfig
    tokenizer: VQTokenizer
    audio: AudioEncoder
    gpt: EARTalkGPT
    meta: dict = field(default_factory=dict)

    def eval(self) -> "ModelBundle":
        for m in (self.tokenizer, self.audio, self.gpt):
            m.eval()
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"tokenizer": self.tokenizer, "audio": self.audio, "gpt": self.gpt}


def new_bundle(cfg: ModelConfig, seed: int = 0) -> ModelBundle:
    """A randomly initialised bundle (for tests, benchmarks and the start of training)."""
    torch.manual_seed(seed)
    return ModelBundle(cfg, VQTokenizer(cfg), AudioEncoder(cfg), EARTalkGPT(cfg),
                       meta={"random_init": True, "seed": seed}).eval()


def weights_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_bundle(bundle: ModelBundle, out_dir: str | Path, **extra) -> Path:
    from safetensors.torch import save_file
    import eartalk
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{k}": v.detach().contiguous() for name, m in bundle.modules().items()
             for k, v in m.state_dict().items()}
    tmp = out / (WEIGHTS + ".partial")
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS)
    # a loaded bundle's meta carries its old card: the new weights' hash, config and format win
    own = ("random_init", "format", "eartalk_version", "config", "sha256")
    card = {**{k: v for k, v in bundle.meta.items() if k not in own}, **extra,
            "format": FORMAT, "eartalk_version": eartalk.__version__, "config": bundle.cfg.to_dict(),
            "sha256": weights_digest(out / WEIGHTS)}
    (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


def resolve(model: str | Path) -> Path:
    """A preset name -> its shipped directory; anything else is taken as a directory."""
    if isinstance(model, str) and model in PRESETS:
        return MODELS_DIR / model
    return Path(model)


class ModelNotTrainedError(FileNotFoundError):
    """A preset was requested whose trained weights are not shipped in this install."""


def read_card(model: str | Path) -> dict:
    d = resolve(model)
    if not (d / CARD).exists() or not (d / WEIGHTS).exists():
        if isinstance(model, str) and model in PRESETS:
            raise ModelNotTrainedError(
                f"the default model {model!r} has not been trained yet: no weights in {d}. Train it "
                f"with `eartalk train --recipe {model}`, or open an untrained (random) model for "
                f"testing with open_session(model={model!r}, random_init=True, seed=0) "
                f"(command line: --random-init)")
        raise FileNotFoundError(f"{d} is not a model directory: expected {CARD} and {WEIGHTS}")
    return json.loads((d / CARD).read_text())


def load_bundle(model: str | Path, expect_config: ModelConfig | None = None) -> ModelBundle:
    """Load a bundle, refusing one whose hash, format or config does not match."""
    from safetensors.torch import load_file
    d = resolve(model)
    card = read_card(model)
    if card.get("format") != FORMAT:
        raise ValueError(f"{d / CARD}: bundle format {card.get('format')!r}; this eartalk reads format {FORMAT}")
    digest = weights_digest(d / WEIGHTS)
    if digest != card.get("sha256"):
        raise ValueError(f"{d / WEIGHTS}: sha256 {digest[:12]}… does not match {CARD} "
                         f"({str(card.get('sha256'))[:12]}…): the weights are stale or corrupt")
    cfg = ModelConfig.from_dict(card["config"])
    if expect_config is not None and cfg.to_dict() != expect_config.to_dict():
        diff = {k: (v, expect_config.to_dict()[k]) for k, v in cfg.to_dict().items() if expect_config.to_dict()[k] != v}
        raise ValueError(f"{d}: model config does not match the expected one: {diff} (found, expected)")
    bundle = new_bundle(cfg)
    state = load_file(str(d / WEIGHTS))
    for name, m in bundle.modules().items():
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        missing, unexpected = m.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"{d / WEIGHTS}: {name} weights do not fit the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    bundle.meta = {k: v for k, v in card.items() if k not in ("config",)}
    return bundle.eval()
