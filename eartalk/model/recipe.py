"""Training recipes: the exact steps that reproduce a shipped model from a corpus.

``tiny``: tokenizer (reference-conditioned VQ) on corpus frames against each clip's portrait, then
the frozen tokenizer tokenizes the corpus, then the transformer and the audio encoder train
together under the SFA mask. Each stage has a time budget, so the whole recipe fits the stated
wall-clock limit on a 2-core CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eartalk.data.corpus import list_clips, load_clip
from eartalk.model.bundle import new_bundle, save_bundle
from eartalk.model.config import preset
from eartalk.model.tokenizer import VQTokenizer, train_tokenizer
from eartalk.model.train_gpt import clip_portrait, fit_size, tokenize_corpus, train_gpt

RECIPES = {
    # minutes per stage on the 2-core reference machine; total <= 90
    "tiny": dict(preset="tiny", tok_steps=2500, tok_batch=16, tok_minutes=25, tok_every=6,
                 gpt_minutes=50, gpt_batch=4, max_clips=None),
    # a smoke test of the whole pipeline (seconds)
    "smoke": dict(preset="test", tok_steps=30, tok_batch=4, tok_minutes=1, tok_every=4,
                  gpt_minutes=0.3, gpt_batch=2, max_clips=4),
}


def _tokenizer_data(corpus: Path, size: int, every: int, max_clips, progress: bool):
    frames, portraits, index = [], [], []
    for i, cid in enumerate(tqdm(list_clips(corpus, "train")[:max_clips], desc="loading frames",
                                 disable=not progress, unit="clip")):
        clip = load_clip(corpus, cid)
        frames.append(fit_size(np.asarray(clip.frames)[::every], size))
        portraits.append(clip_portrait(clip, size))
        index.append(np.full(len(frames[-1]), i))
    to_chw = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, -3))
    return to_chw(np.concatenate(frames)), to_chw(np.stack(portraits)), np.concatenate(index)


def run_recipe(name: str, corpus: Path, out: Path, progress: bool = True, seed: int = 0) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    r = RECIPES[name]
    cfg = preset(r["preset"])
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"recipe": name, "corpus": str(corpus)}
    bundle = new_bundle(cfg, seed)
    tok_path = work / "tokenizer.safetensors"
    if tok_path.exists():  # resumable: a finished stage is not redone
        bundle.tokenizer = VQTokenizer.load(str(tok_path), cfg)
    else:
        frames, portraits, index = _tokenizer_data(corpus, cfg.image_size, r["tok_every"], r["max_clips"], progress)
        report["tokenizer_frames"] = int(len(frames))
        m = train_tokenizer(frames, portraits, cfg, steps=r["tok_steps"], batch=r["tok_batch"],
                            out_dir=str(work), progress=progress, portrait_index=index, seed=seed,
                            tokenizer=bundle.tokenizer, max_minutes=r["tok_minutes"])
        bundle.tokenizer = m.pop("model")
        report["tokenizer"] = m
    report["tokenizer_minutes"] = round((time.time() - t0) / 60, 2)
    bundle.tokenizer.eval()
    for p in bundle.tokenizer.parameters():
        p.requires_grad_(False)
    train = tokenize_corpus(bundle, corpus, "train", r["max_clips"], progress)
    val = tokenize_corpus(bundle, corpus, "val", r["max_clips"], progress)
    report["tokenize_minutes"] = round((time.time() - t0) / 60, 2) - report["tokenizer_minutes"]
    report["gpt"] = train_gpt(bundle, train, val, work, minutes=r["gpt_minutes"], batch=r["gpt_batch"],
                              seed=seed, progress=progress)
    report["total_minutes"] = round((time.time() - t0) / 60, 2)
    card = json.loads((corpus / "data_card.json").read_text()) if (corpus / "data_card.json").exists() else {}
    save_bundle(bundle, out, recipe=name, training=report,
                trained_on={"corpus_hours": card.get("hours"), "identities": card.get("identities"),
                            "voices": len(card.get("voices", [])), "seed": card.get("seed")})
    return report
