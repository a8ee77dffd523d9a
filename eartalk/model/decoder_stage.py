"""The recipe's third stage: the tokenizer's decoder trained on after the transformer, with the
encoder frozen, on the corpus's frames and on the same faces re-rendered with the eyes shut.

Why: a pinned blink was not shown when the decoder could not draw it. With the blink pinned shut
for 1-8 frames (``eartalk/blink_steps.py``), 8 test clips showed it on 76% of the pulses' first
frames, every miss a closing; the renders showed all of them. The codes carried it (a shut and an
open render of the same state differ in 25-44 of a frame's 64 tokens), but the decoder, which
warps the portrait and so starts from open eyes, drew the shut codes of some faces and poses
open: the corpus shows shut eyes on about 5% of its frames. The renderer can make the frames
that are missing: any training frame's state with the blink pinned shut (``synth.rerender``).

The decoder's loss also values the expression: a small emotion and blink classifier trained
first on the same frames (``expression_critic.py``) judges each decoded frame against the true one
by its features. The pixel terms alone never drew *happy* (its flush and folds are a few faint percent
of the frame).

With ``dec_mix``, some shut renders are decoded from codes part-mixed with those of the same state
rendered open (its twin): the transformer's codes of a pinned shut eye are such a mixture, and the
decoder trained with the critic drew them open more often than the one trained on pixels alone.

The encoder's weights are checked unchanged after training (``finetune.encoder_digest``): every
frame keeps the code the transformer was trained on, so the transformer needs no retraining.
The fine-tune on a person's videos (``finetune.py``) trains the same parts with no shut renders
(a user's clips have no identity to render).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eartalk.data.corpus import clip_frames_at, list_clips, load_clip, read_meta
from eartalk.data.expression_map import maps_of, neutral_frames
from eartalk.data.synth import rerender
from eartalk.model.bundle import load_bundle, save_bundle
from eartalk.model.expression_critic import blink_values, emotion_labels, train_critic
from eartalk.model.finetune import encoder_digest, train_decoder
from eartalk.model.recipe import _recipe, tokenizer_frames
from eartalk.model.schedule import by_deadline
from eartalk.model.tokenizer import VQTokenizer
from eartalk.model.train_gpt import fit_map_size, fit_size

__all__ = ["SHUT_VALUES", "shut_eye_frames", "merge_parts", "decoder_stage"]

SHUT_VALUES = (1.0, 1.0, 0.8, 0.6)      # blink values drawn for a shut render: mostly fully shut


def shut_eye_frames(corpus: Path, split: str, size: int, every: int, clip_every: int, max_clips, seed: int,
                    progress: bool, twins: bool = False, part: tuple[int, int] = (0, 1)) -> dict:
    """One clip in ``clip_every`` of ``split`` (the first ``max_clips``), every ``every``-th frame
    from a random offset, re-rendered with the blink drawn from :data:`SHUT_VALUES` and everything
    else as it was: ``frames`` uint8 ``[M, 3, S, S]``, ``index`` (the clip's position in
    ``list_clips(corpus, split)``, as :func:`tokenizer_frames` numbers its portraits), ``at`` (the
    frame's number in its clip), ``blink`` (the value drawn), ``emotion`` (the state's, unchanged) and
    ``exprs`` (their expression maps); with ``twins``, ``open`` too: each state's frame as the corpus
    holds it, the clip's own blink (open but on the frames that blink).

    ``part=(k, n)`` renders only the k-th of every n chosen clips, with the draws the whole would
    give them: :func:`merge_parts` of the n parts is the whole, bit for bit."""
    k, n_parts = part
    if clip_every < 1 or every < 1:
        raise ValueError(f"shut_eye_frames: every={every}, clip_every={clip_every}: expected both >= 1")
    if not 0 <= k < n_parts:
        raise ValueError(f"shut_eye_frames: part={part}: expected (k, n) with 0 <= k < n")
    rng = np.random.default_rng([seed, 29])
    frames, index, exprs, ats, blinks, emotions, opens = [], [], [], [], [], [], []
    ids = list_clips(corpus, split)[:max_clips]
    for i, cid in enumerate(tqdm(ids, desc=f"rendering {split} frames with the eyes shut", unit="clip",
                                 disable=not progress)):
        if i % clip_every:
            continue
        # the draws come from the clip's metadata alone, so every part makes all of them in order
        meta = read_meta(corpus, cid) or {}
        if meta.get("identity") is None or f"{cid}.gt.csv" not in meta.get("files", ()):
            continue                        # an imported video: no face to render
        n = int(meta["n_frames"])
        at = np.arange(int(rng.integers(0, every)), n, every)
        shut = rng.choice(SHUT_VALUES, len(at))
        if (i // clip_every) % n_parts != k:
            continue
        clip = load_clip(corpus, cid, frames=False)
        if len(clip.gt["blink"]) != n:
            raise ValueError(f"clip {cid!r}: {len(clip.gt['blink'])} rows of ground truth; its json says {n} frames")
        ident = clip.identity
        sub = {key: np.asarray(v)[at] for key, v in clip.gt.items()}
        own = int(clip.meta.get("size") or size)
        if twins:       # the clip's own frames: its truth rendered again gives them back bit for bit
            opens.append(np.moveaxis(fit_size(clip_frames_at(corpus, cid, at), size), -1, -3))
        sub["blink"] = shut
        f = rerender(ident, sub, own)
        m = maps_of(f, neutral_frames(ident, sub, np.arange(len(at)), own))
        frames.append(np.moveaxis(fit_size(f, size), -1, -3))
        exprs.append(fit_map_size(m, size))
        index.append(np.full(len(at), i))
        ats.append(at)
        blinks.append(sub["blink"])
        emotions.append(sub["emotion"].astype(np.int64))
    if not frames:
        return dict(frames=np.zeros((0, 3, size, size), np.uint8), index=np.zeros(0, np.int64),
                    at=np.zeros(0, np.int64), blink=np.zeros(0), emotion=np.zeros(0, np.int64),
                    exprs=np.zeros((0, size, size), np.uint8),
                    **({"open": np.zeros((0, 3, size, size), np.uint8)} if twins else {}))
    return dict(frames=np.ascontiguousarray(np.concatenate(frames)), index=np.concatenate(index),
                at=np.concatenate(ats), blink=np.concatenate(blinks), emotion=np.concatenate(emotions),
                exprs=np.concatenate(exprs), **({"open": np.ascontiguousarray(np.concatenate(opens))} if twins else {}))


def merge_parts(parts: list[dict]) -> dict:
    """The parts of :func:`shut_eye_frames` (``part=(k, n)`` for every k) as the whole gives them: clip
    by clip in ``index`` order, each clip's frames as they came."""
    order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
    return {key: np.ascontiguousarray(np.concatenate([p[key] for p in parts])[order]) for key in parts[0]}


def _stage_frames(corpus: Path, size: int, r: dict, seed: int, progress: bool) -> tuple[dict, dict]:
    """The stage's corpus frames (:func:`tokenizer_frames` with expression maps) and shut renders
    (:func:`shut_eye_frames`), the renders made meanwhile in two more processes, half the clips each:
    each loader is single-threaded, and the renders take longer than the corpus frames (2.8 minutes
    against 1.5 for tiny, every clip rendered shut, 2-core EPYC), so the parent's core would idle."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # fork: the children only render with numpy (no torch), and see the corpus as the parent does
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        parts = [pool.submit(shut_eye_frames, corpus, "train", size, r["dec_every"], r["dec_shut_clips"],
                             r["max_clips"], seed, False, r["dec_mix"] > 0, (k, 2)) for k in range(2)]
        d = tokenizer_frames(corpus, "train", size, r["dec_every"], r["max_clips"], progress, expr=True)
        if progress and not all(f.done() for f in parts):
            print("waiting for the shut-eye renders (two more processes)...", flush=True)
        return d, merge_parts([f.result() for f in parts])


def decoder_stage(name: str, corpus: Path, out: Path, progress: bool = True, seed: int = 0,
                  budget_scale: float = 1.0, until: float | None = None) -> dict:
    """Stage 3 (``eartalk train decoder``): the bundle of stage 2 (``out/model.safetensors``) with
    its tokenizer's decoder trained ``dec_minutes`` on the train split's frames plus
    :func:`shut_eye_frames` (with ``dec_critic > 0``, the first ``dec_critic_minutes`` of them
    training the expression critic on the train split's frames); rewrites the bundle, its card's
    training gaining ``decoder`` (with ``expression_critic``: the critic's own metrics; ``critic``:
    the decoder's last-tenth feature distance), and
    ``out/work/decoder/`` (curves, weights, ``tokenizer_report.json``). Run again, it trains again
    from the tokenizer stage's decoder (``out/work/tokenizer.safetensors``). ``until`` (a ``time.time()``,
    :func:`eartalk.model.recipe.run_recipe`): the decoder's training ends by then if that is sooner,
    though never under a quarter of ``dec_minutes``."""
    r = _recipe(name, budget_scale)
    out = Path(out)
    if not (out / "model.json").exists():
        raise FileNotFoundError(f"{out}: no model.json; the decoder stage follows the transformer's "
                                f"(`eartalk train gpt --recipe {name} --data {corpus} --out {out}`)")
    bundle = load_bundle(out)
    training = dict(bundle.meta.get("training") or {})
    if "decoder" in training:       # trained again from stage 1's decoder, not on top of its own
        first = out / "work" / "tokenizer.safetensors"
        if not first.exists():
            raise FileNotFoundError(f"{out}: its model has had its decoder stage, and the tokenizer stage's weights "
                                    f"({first}) to train it again from are not there")
        bundle.tokenizer = VQTokenizer.load(str(first), bundle.cfg)
        if encoder_digest(bundle.tokenizer) != training["decoder"].get("encoder_sha256"):
            raise ValueError(f"{first}: its encoder is not the one of the model in {out}; its decoder cannot be "
                             "trained again from it")
    cfg, tok = bundle.cfg, bundle.tokenizer
    work = out / "work" / "decoder"        # not work/tokenizer.safetensors: stage 2's token caches key on it
    work.mkdir(parents=True, exist_ok=True)
    d, s = _stage_frames(corpus, cfg.image_size, r, seed, progress)
    v = tokenizer_frames(corpus, "val", cfg.image_size, r["tok_every"] * 8, r["max_clips"], progress) \
        if list_clips(corpus, "val") else None
    val = (v["frames"], v["portraits"], v["index"]) if v else None
    frames = np.concatenate([d["frames"], s["frames"]])
    # each shut render's open twin, to mix its codes with (dec_mix): -1 for the corpus frames
    mix_of = np.concatenate([np.full(len(d["frames"]), -1), np.arange(len(s["frames"]))]) if "open" in s else None
    critic, crit_m, minutes = None, None, r["dec_minutes"]
    if r["dec_critic"] > 0:
        # the shut renders keep their state's emotion: only the blink was drawn again
        critic, crit_m = train_critic(
            frames,
            np.concatenate([emotion_labels(d["states"]), s["emotion"]]),
            np.concatenate([blink_values(d["states"]), s["blink"]]), minutes=r["dec_critic_minutes"],
            read_size=r["dec_critic_read"], batch=64, seed=seed, progress=progress,
            val=(v["frames"], emotion_labels(v["states"]), blink_values(v["states"])) if v else None)
        minutes = max(r["dec_minutes"] - crit_m["minutes"], r["dec_minutes"] / 4)   # the critic's time is the stage's
    if until is not None:           # the recipe's total
        minutes = min(minutes, by_deadline(r["dec_minutes"], until - time.time()))
    m = train_decoder(tok, cfg, frames, d["portraits"],
                      np.concatenate([d["index"], s["index"]]), np.concatenate([d["exprs"], s["exprs"]]), val=val,
                      lr=r["dec_lr"], batch=r["tok_batch"], minutes=minutes, expr_weight=r["tok_expr"],
                      out_dir=work, seed=seed, progress=progress, critic=critic, critic_weight=r["dec_critic"],
                      mix_frames=s.get("open"), mix_of=mix_of, mix_prob=r["dec_mix"], bf16=r["tok_bf16"])
    m.update(expression_critic=crit_m, critic_weight=r["dec_critic"], frames=int(len(d["frames"])),
             shut_frames=int(len(s["frames"])), mix_prob=r["dec_mix"], val_frames=len(val[0]) if val else 0, budget_minutes=r["dec_minutes"],
             schedule_minutes=round(minutes, 2))
    (work / "tokenizer_report.json").write_text(json.dumps(m, indent=1))
    save_bundle(bundle, out, training={**training, "decoder": m})
    return m
