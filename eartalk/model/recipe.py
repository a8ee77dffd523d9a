"""Training recipes: the exact steps that reproduce a shipped model from a corpus.

``tiny``: tokenizer (reference-conditioned VQ) on corpus frames against each clip's portrait, then
the frozen tokenizer tokenizes the corpus, then the transformer and the audio encoder train
together under the SFA mask. Each stage has a time budget, so the whole recipe fits the stated
wall-clock limit on a 2-core CPU.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eartalk.data.corpus import list_clips, load_clip
from eartalk.data.expression_map import expression_maps
from eartalk.model.bundle import new_bundle, save_bundle, weights_digest
from eartalk.model.config import preset
from eartalk.model.face_state import face_state
from eartalk.model.tokenizer import VQTokenizer, state_token_accuracy, train_tokenizer
from eartalk.model.train_gpt import cached_tokens, clip_portrait, fit_map_size, fit_size, stage_tokenizer, train_gpt

# processes that load a stage's frames (tokenizer_frames): the loading is single-threaded numpy
LOAD_WORKERS = min(4, os.cpu_count() or 1)

RECIPES = {
    # minutes per stage (budgets: tokenizer 25 or 10,000 steps, GPT 45, decoder 9, the whole 89); 2026-12-04 on the 2-core AMX Xeon (bf16): tokenizer 25 (9,711 steps) + ~2.5 loading, tokenizing 5.6, GPT 45 (6,337 steps with refinement drafts; 78 end to end). 2026-12-07 on a 2-core EPYC without AVX-512: loading 1.9 (two processes; 4.1 in one), tokenizing 6.8 (encode_clip; about 9.4 before), the decoder stage 9 + ~3 loading: the total then ends the transformer stage early, by about 2 minutes. 2026-12-07 on a slower 2-core AMX Xeon (Emerald Rapids): a tokenizer step 0.27 s in bf16, 0.37 in float32 (tok_bf16)
    # gpt_corrupt: range of the fraction of input tokens replaced by random codes (each window draws
    # its own); gpt_lr/gpt_warmup: peak learning rate and its warm-up steps; gpt_start: fraction of
    # training windows that start at a clip's first frame (see train_gpt.gpt_loss / make_batch);
    # gpt_mouth: weight of the audio encoder's mouth/viseme probe loss (train_gpt.mouth_loss);
    # gpt_change: weight of the tokens that differ from the previous frame's in the token CE.
    # gpt_portrait: share of the corrupted input tokens that take the portrait's code (a frozen
    # stream's history) rather than a random one (train_gpt.corrupt_inputs). gpt_plausible: the other
    # replacements are same-position codes of another window, not uniform random codes.
    # gpt_stale: share of training windows that read a stale history of their own clip (lagged or
    # frozen frames, train_gpt.stale_history) instead of their true previous frames.
    # gpt_refine: share of training windows with a known draft of part of their own tokens (few-step
    # refinement, ModelConfig.refine; train_gpt.draft_mask); 0: a one-pass model (refine=False).
    # tok_self: one tokenizer sample in that many is the portrait against itself (0: none; every
    # frame sample then goes to corpus frames, which is what the transformer's targets are).
    # tok_pair: weight of the tokenizer's frame-to-frame latent term (VQTokenizer.loss pair_weight;
    # batches are then pairs of consecutive frames); 0: frames drawn alone.
    # tok_state: weight pulling the tokenizer's latents towards a function of the face state
    # (VQTokenizer.loss state_weight; eartalk.model.face_state); 0: codes untied. tok_state_ramp:
    # the fractions of the stage over which that pull rises from 0 (train_tokenizer state_ramp).
    # tok_expr: extra loss weight of the pixels that show the frame's expression (lips, eyes, brows;
    # eartalk.data.expression_map, VQTokenizer.loss expr_weight); 0: whole-frame weighting only.
    # frame_codes: token cells given to whole-frame codes (ModelConfig.frame_codes; 0: none).
    # tok_emotion: weight of the frame codes naming the frame's emotion (VQTokenizer.loss
    # emotion_weight; needs frame_codes > 0).
    # warp: the tokenizer's decoder warps the portrait by a learned flow (ModelConfig.warp).
    # pixel_tail: channels of the decoder's tail after its blend (ModelConfig.pixel_tail; 0: none).
    # tok_bf16: the tokenizer's training (stages 1 and 3) under bf16 autocast; None: where the CPU has
    # native bf16 (precision.bf16_native), False: float32. False in tiny: on a 2-core AMX Xeon (Emerald
    # Rapids, 2026-12-07) a step in float32 took 0.37 s against 0.27 in bf16, but was worth more:
    # held-out PSNR after 1,500 steps 22.43 dB against 21.91 (docs/model-history.md, session 38).
    # tok_lr: the tokenizer stage's peak learning rate. 1e-3 in tiny since session 41: two pairs of
    # stages on the same steps and batches, 2e-3 against 1e-3, ended at 23.75 / 24.31 and 24.23 /
    # 24.38 dB held-out (4,442 steps, float32); at 2e-3 one run in the five measured lost codes and
    # 0.6 dB. The shipped tokenizer was trained at 2e-3 (bf16, 9,711 steps on a faster Xeon).
    # gpt_readout: weight of the control read-out term on the predicted codes (train_gpt readout_weight,
    # eartalk.model.control_readout); 0 in tiny, which must reproduce the shipped weights: at 1 the
    # transformer stage gained gaze and emotion but lost 0.28 dB on the same machine and minutes
    # (docs/model-history.md, session 27). gpt_readout_ramp: the fractions of the stage over which
    # that weight rises from 0 (train_gpt readout_ramp).
    # dec_*: stage 3 (eartalk.model.decoder_stage), the decoder trained on with the encoder frozen:
    # its minutes (0: no stage), peak learning rate, every dec_every-th frame of each training clip,
    # and one clip in dec_shut_clips also re-rendered with the eyes shut (as many frames again).
    # dec_critic: weight of the expression critic's feature distance in the decoder's loss
    # (eartalk.model.expression_critic; 0: pixel terms only), the critic trained first for
    # dec_critic_minutes of the stage's dec_minutes on the same frames' emotions and blinks, reading
    # them at dec_critic_read pixels a side.
    # dec_mix: the share of shut renders decoded from codes part-mixed with their open twin's
    # (train_tokenizer mix_prob), as the transformer's codes of a pinned shut eye are; 0: none.
    # total_minutes: the whole recipe's wall clock when its stages run together (run_recipe, `eartalk
    # train --recipe`): the transformer stage's training ends dec_minutes + dec_load_minutes (the
    # decoder stage's loading: 3.0 on a 2-core EPYC) before it, and the decoder stage's by it, so
    # a slower CPU trains them shorter rather than running over (each keeps at least a quarter).
    # tiny's stage (session 36): the critic at 0.3 with every shut render mixed and every clip
    # re-rendered shut. Alone, the critic traded pinned blinks for emotion (sessions 33-34); with the
    # mix and twice the shut renders the whole model keeps them (0.875 of first shut frames against
    # 0.866) and reads emotion on 51.0% of frames against 41.9%, for 0.13 dB (docs/model-history.md).
    "tiny": dict(preset="tiny", tok_steps=10000, tok_batch=16, tok_lr=1e-3, tok_minutes=25, tok_every=6,
                 tok_self=0, tok_pair=0.0, tok_state=0.0, tok_state_ramp=(0.25, 0.5), tok_expr=6.0, tok_bf16=False,
                 frame_codes=0, tok_emotion=0.0, warp=True, pixel_tail=0, gpt_minutes=45, gpt_batch=4, gpt_corrupt=(0.0, 1.0), gpt_plausible=True, gpt_stale=1.0, gpt_lr=2e-3, gpt_warmup=100,
                 gpt_start=0.25, gpt_mouth=1.0, gpt_change=3.0, gpt_portrait=0.5, gpt_refine=0.5, gpt_readout=0.0, gpt_readout_ramp=(0.0, 0.0), max_clips=None, val_clips=24,
                 dec_minutes=9, dec_lr=5e-4, dec_every=12, dec_shut_clips=1, dec_critic=0.3, dec_critic_minutes=3.2, dec_critic_read=64,
                 dec_mix=1.0, total_minutes=89, dec_load_minutes=3.0),
    # a smoke test of the whole pipeline (seconds)
    "smoke": dict(preset="test", tok_steps=30, tok_batch=4, tok_lr=2e-3, tok_minutes=1, tok_every=4, tok_self=8,
                  tok_pair=0.0, tok_state=0.1, tok_state_ramp=(0.0, 0.0), tok_expr=6.0, tok_bf16=None,
                  frame_codes=1, tok_emotion=0.05, warp=False, pixel_tail=4, gpt_minutes=0.3, gpt_batch=2, gpt_corrupt=(0.0, 0.9), gpt_plausible=True, gpt_stale=0.5, gpt_lr=2e-3, gpt_warmup=100,
                  gpt_start=0.25, gpt_mouth=1.0, gpt_change=3.0, gpt_portrait=0.5, gpt_refine=0.5, gpt_readout=1.0, gpt_readout_ramp=(0.0, 0.0), max_clips=4, val_clips=4,
                  dec_minutes=0.1, dec_lr=5e-4, dec_every=4, dec_shut_clips=2, dec_critic=1.0, dec_critic_minutes=0.03, dec_critic_read=32,
                  dec_mix=0.5, total_minutes=30, dec_load_minutes=0.5),
}


def tokenizer_frames(corpus: Path, split: str, size: int, every: int, max_clips, progress: bool,
                    successors: bool = False, expr: bool = False, workers: int = 1) -> dict:
    """Every ``every``-th frame of each clip of ``split`` with its clip's portrait, channels first,
    uint8, and each frame's face state (``face_state``, NaN rows for clips without ground truth):
    a dict of ``frames``, ``portraits``, ``index`` (frame -> portrait), ``states``; with
    ``successors`` also ``next_frames`` and ``next_states`` (frames then stop one before the
    clip's end). With ``expr`` also ``exprs`` (and ``next_exprs``): each frame's expression map
    (``expression_map.expression_maps``; zeros for clips without ground truth).

    ``workers`` > 1 loads the clips in that many forked processes (numpy only), the same arrays:
    the expression maps re-render every frame's face and are most of the loading (tiny's
    tokenizer stage: 4.1 minutes in one process on a 2-core EPYC)."""
    import functools
    ids = list_clips(corpus, split)[:max_clips]
    job = functools.partial(_clip_frames, corpus, size=size, every=every, successors=successors, expr=expr)
    bar = functools.partial(tqdm, total=len(ids), desc=f"loading {split} frames", disable=not progress, unit="clip")
    if workers > 1 and len(ids) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(workers, len(ids)), mp_context=mp.get_context("fork")) as pool:
            clips = list(bar(pool.map(job, ids, chunksize=4)))
    else:
        clips = [job(cid) for cid in bar(ids)]
    cat = lambda key: np.concatenate([c[key] for c in clips])   # noqa: E731
    to_chw = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, -3))  # noqa: E731
    out = dict(frames=to_chw(cat("frames")), portraits=to_chw(np.stack([c["portrait"] for c in clips])),
               index=np.concatenate([np.full(len(c["frames"]), i) for i, c in enumerate(clips)]), states=cat("states"))
    out.update({key: to_chw(cat(key)) if key == "next_frames" else cat(key)
                for key in ("next_frames", "next_states", "exprs", "next_exprs") if key in clips[0]})
    return out


def _clip_frames(corpus: Path, cid: str, size: int, every: int, successors: bool, expr: bool) -> dict:
    """One clip's part of :func:`tokenizer_frames`, frames channels last; ``portrait`` its sink frame."""
    clip = load_clip(corpus, cid)
    all_frames = np.asarray(clip.frames)
    at = np.arange(0, len(all_frames) - int(successors), every)
    st = face_state(clip.gt, len(all_frames))
    out = dict(frames=fit_size(all_frames[at], size), states=st[at], portrait=clip_portrait(clip, size))
    if successors:
        out.update(next_frames=fit_size(all_frames[at + 1], size), next_states=st[at + 1])
    if expr:
        out["exprs"] = _expr_maps(clip, at, size)
        if successors:
            out["next_exprs"] = _expr_maps(clip, at + 1, size)
    return out


def _expr_maps(clip, at: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[len(at), size, size]`` expression maps of frames ``at`` (zeros without ground truth)."""
    m = expression_maps(clip, at)
    if m is None:
        return np.zeros((len(at), size, size), np.uint8)
    return fit_map_size(m, size)


def _tokenizer_sheet(tok, v: dict, path: Path, n: int = 6) -> Path:
    """``n`` held-out frames spread over ``v`` (``tokenizer_frames``): portrait, frame, the
    tokenizer's reconstruction and its error, one row each (:mod:`eartalk.frame_sheet`)."""
    import torch

    from eartalk.frame_sheet import error_frame, save_frame_sheet
    from eartalk.runtime.backend import to_uint8_frames
    at = np.unique(np.linspace(0, len(v["frames"]) - 1, n).round().astype(int))
    x, p = torch.from_numpy(v["frames"][at]), torch.from_numpy(v["portraits"][v["index"][at]])
    with torch.no_grad():
        rec = to_uint8_frames(tok.reconstruct(x, p).numpy())
    hwc = lambda a: np.ascontiguousarray(np.moveaxis(a.numpy(), 0, -1))   # noqa: E731
    rows = [[hwc(p[i]), hwc(x[i]), rec[i], error_frame(hwc(x[i]), rec[i])] for i in range(len(at))]
    return save_frame_sheet(path, rows, ["portrait", "frame", "reconstruction", "|error| x 4"],
                            [f"val frame {i}" for i in at], title="tokenizer on held-out frames")


def check_budget_scale(budget_scale, whose: str) -> float:
    """``budget_scale`` when it is a positive finite number, else a ValueError naming ``whose`` minutes
    it multiplies (the recipe's, the fine-tune's)."""
    if not (isinstance(budget_scale, (int, float)) and math.isfinite(budget_scale) and budget_scale > 0):
        raise ValueError(f"budget scale {budget_scale!r}: expected a positive number, the factor on the {whose} "
                         f"minutes (2.5 on a CPU 2.5x slower than the one that made the shipped model)")
    return budget_scale


def _recipe(name: str, budget_scale: float = 1.0) -> dict:
    """Recipe ``name`` with its minutes (the stages' ``tok_minutes``, ``gpt_minutes``, ``dec_minutes``,
    ``dec_critic_minutes``, and ``total_minutes``, ``dec_load_minutes``) times ``budget_scale``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    check_budget_scale(budget_scale, "recipe's")
    r = dict(RECIPES[name])
    r["tok_minutes"] *= budget_scale
    r["gpt_minutes"] *= budget_scale
    r["dec_minutes"] *= budget_scale
    r["dec_critic_minutes"] *= budget_scale
    r["total_minutes"] *= budget_scale
    r["dec_load_minutes"] *= budget_scale
    return r


def _model_config(r: dict, **extra):
    """The model config that recipe ``r`` (:func:`_recipe`) trains: its preset with the recipe's
    tokenizer keys (``frame_codes``, ``warp``, ``pixel_tail``), the same for every stage."""
    return preset(r["preset"], frame_codes=r["frame_codes"], warp=r["warp"], pixel_tail=r["pixel_tail"], **extra)


def step_shortfall(name: str, stage: str, steps: int, budget_scale: float = 1.0,
                   trained_minutes: float | None = None, bf16: bool | None = None,
                   held_out: float | None = None) -> str | None:
    """A notice when a stage of recipe ``name`` trained under 90% of the steps its shipped model's
    did (the stages stop on time, so a slower CPU trains fewer), naming the ``--budget-scale`` that
    gives about the shipped count; None when it did not, or no shipped model came from ``name``.
    ``trained_minutes``: what the stage trained when the recipe's total cut its minutes short
    (:func:`run_recipe`); the scale then counts from those minutes' steps.

    ``bf16``: whether this stage trained under bf16 autocast (its report's ``bf16``). A tokenizer or
    decoder stage trained in another precision than the shipped one's is judged by ``held_out``, its
    held-out PSNR on the validation frames, instead of its steps: a float32 tokenizer step was worth
    more than a bf16 one (docs/model-history.md, session 38). It gets a notice when that PSNR is over
    0.1 dB below the shipped stage's (none when either is unknown), whose scale, the shipped step
    count's, is then only a bound. The transformer's steps compare across precisions (float32 and
    bf16 were 0.03 nats apart after 1,000 steps, session 38), and its validation loss would not:
    it depends on the tokenizer's codes."""
    from eartalk.model.bundle import read_card
    r = _recipe(name, budget_scale)
    try:
        card = read_card(r["preset"])
    except FileNotFoundError:
        return None
    if card.get("recipe") != name:
        return None
    ref = card.get("training", {}).get(stage, {})
    shipped = int(ref.get("steps") or 0)
    other = stage != "gpt" and None not in (bf16, ref.get("bf16")) and bool(bf16) != bool(ref["bf16"])
    if not shipped:
        return None
    if other:
        if held_out is None or ref.get("val_psnr") is None or held_out >= ref["val_psnr"] - 0.1:
            return None
    elif steps >= 0.9 * shipped:
        return None
    minutes = r[{"tokenizer": "tok_minutes", "gpt": "gpt_minutes", "decoder": "dec_minutes"}[stage]]
    short = trained_minutes is not None and trained_minutes < minutes - 0.01
    rate = max(steps, 1) / (trained_minutes if short else minutes)        # steps a minute on this CPU
    scale = math.ceil(budget_scale * shipped / (rate * minutes) * 10) / 10
    where = (f"in {trained_minutes:.4g} of its {minutes:g} minutes (the recipe's total cut it short)" if short
             else f"in its {minutes:g} minutes")
    # the transformer resumes from its checkpoint; the tokenizer has none and trains again
    again = {"gpt": "the stage resumes from its checkpoint", "tokenizer": "the stage trains again from its start",
             "decoder": "the stage trains again from the tokenizer stage's decoder"}[stage]
    if not other:
        return (f"the {stage} stage trained {steps:,} steps {where}; the shipped {r['preset']!r} "
                f"model's had {shipped:,}: this CPU is slower than the one that made it, so this model will measure "
                f"below the model card. `eartalk train {stage} --recipe {name} ... --budget-scale {scale:g}` trains "
                f"about the shipped count ({again})")
    ours, theirs = ("bf16", "float32") if bf16 else ("float32", "bf16")
    bound = ("fewer steps may do, as a float32 step was worth more than a bf16 one" if not bf16 else
             "more may be needed, as a bf16 step was worth less than a float32 one")
    advice = (f"`eartalk train {stage} --recipe {name} ... --budget-scale {scale:g}` trains the shipped step count "
              f"({again}); {bound}" if steps < shipped else
              f"it trained the shipped step count already: a larger `--budget-scale` trains longer ({again})")
    return (f"the {stage} stage trained {steps:,} steps in {ours} {where}, to a held-out PSNR of {held_out:.2f} dB; "
            f"the shipped {r['preset']!r} model's trained {shipped:,} in {theirs}, to {ref['val_psnr']:.2f} dB: this "
            f"model will measure below the model card. {advice}")


def tokenizer_stage(name: str, corpus: Path, out: Path, progress: bool = True, seed: int = 0,
                    budget_scale: float = 1.0) -> dict:
    """Stage 1 (``eartalk train tokenizer``): train the tokenizer on the train split, measure its
    held-out PSNR on the validation split; writes ``out/work/tokenizer.safetensors`` and curves.
    ``budget_scale`` multiplies the stage's minutes (:func:`_recipe`)."""
    r = _recipe(name, budget_scale)
    cfg = _model_config(r)
    work = Path(out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    pairs = r["tok_pair"] > 0
    d = tokenizer_frames(corpus, "train", cfg.image_size, r["tok_every"], r["max_clips"], progress, successors=pairs,
                        expr=r["tok_expr"] > 0, workers=LOAD_WORKERS)
    # held-out PSNR on the validation split (a small corpus may have none: then no validation)
    v = tokenizer_frames(corpus, "val", cfg.image_size, r["tok_every"] * 8, r["max_clips"], progress) \
        if list_clips(corpus, "val") else None
    val = (v["frames"], v["portraits"], v["index"]) if v else None
    m = train_tokenizer(d["frames"], d["portraits"], cfg, steps=r["tok_steps"], batch=r["tok_batch"], lr=r["tok_lr"],
                        out_dir=str(work), progress=progress, portrait_index=d["index"], seed=seed,
                        max_minutes=r["tok_minutes"], val=val, val_every=500, self_every=r["tok_self"],
                        next_frames=d.get("next_frames"), pair_weight=r["tok_pair"], states=d["states"],
                        next_states=d.get("next_states"), state_weight=r["tok_state"],
                        state_ramp=r["tok_state_ramp"], exprs=d.get("exprs"), next_exprs=d.get("next_exprs"),
                        expr_weight=r["tok_expr"], emotion_weight=r["tok_emotion"], bf16=r["tok_bf16"])
    tok = m.pop("model")
    if v and r["tok_state"] > 0:
        m["val_state_acc"] = state_token_accuracy(tok, v["frames"], v["portraits"], v["index"], v["states"])
    m.update(frames=int(len(d["frames"])), val_frames=int(len(v["frames"])) if v else 0,
             budget_minutes=r["tok_minutes"])
    if v:
        m["samples"] = str(_tokenizer_sheet(tok, v, work / "tokenizer_samples.png"))
    (work / "tokenizer_report.json").write_text(json.dumps(m, indent=1))
    return m


def gpt_stage(name: str, corpus: Path, out: Path, progress: bool = True, seed: int = 0,
              budget_scale: float = 1.0, until: float | None = None) -> dict:
    """Stage 2 (``eartalk train gpt``): with the frozen tokenizer of stage 1, tokenize the corpus and
    train the audio encoder and the transformer (resumable from ``out/work/gpt_ckpt.pt``); then
    write the bundle ``out/model.safetensors`` + ``out/model.json``. ``budget_scale`` multiplies
    the stage's minutes (:func:`_recipe`); a finished stage run again with a larger one resumes to
    the new budget, its learning-rate schedule stretched to it. ``until`` (a ``time.time()``): the
    training ends by then if that is sooner (``train_gpt`` ``deadline``; :func:`run_recipe`)."""
    r = _recipe(name, budget_scale)
    cfg = _model_config(r, refine=r["gpt_refine"] > 0)
    out = Path(out)
    work = out / "work"
    tok_path = stage_tokenizer(out, f"train the tokenizer first (`eartalk train tokenizer --recipe {name} "
                                    f"--data {corpus} --out {out}`)")
    t0 = time.time()
    bundle = new_bundle(cfg, seed)
    bundle.tokenizer = VQTokenizer.load(str(tok_path), cfg)
    for p in bundle.tokenizer.parameters():
        p.requires_grad_(False)
    tok_sha = weights_digest(tok_path)
    splits = {}
    # validation needs only a few windows (its loss is measured on 4 batches): tokenize a few clips
    limit = {"train": r["max_clips"], "val": r["val_clips"]}
    for split in ("train", "val"):   # cached: a resumed stage does not tokenize the corpus again
        splits[split] = cached_tokens(bundle, corpus, split, limit[split], work / f"tokens_{split}.npz", tok_sha,
                                      progress)
    train, val = splits["train"], splits["val"]
    report = {"tokenize_minutes": round((time.time() - t0) / 60, 2), "budget_minutes": r["gpt_minutes"]}
    report.update(train_gpt(bundle, train, val, work, minutes=r["gpt_minutes"], batch=r["gpt_batch"],
                            corrupt=r["gpt_corrupt"], lr=r["gpt_lr"], warmup=r["gpt_warmup"],
                            start_prob=r["gpt_start"], mouth_weight=r["gpt_mouth"], change_weight=r["gpt_change"],
                            portrait_share=r["gpt_portrait"], plausible=r["gpt_plausible"], stale_prob=r["gpt_stale"],
                            draft_prob=r["gpt_refine"], readout_weight=r["gpt_readout"],
                            readout_ramp=r["gpt_readout_ramp"], seed=seed, deadline=until,
                            progress=progress))
    rep_path = work / "tokenizer_report.json"
    tok_report = json.loads(rep_path.read_text()) if rep_path.exists() else {}
    card = json.loads((corpus / "data_card.json").read_text()) if (corpus / "data_card.json").exists() else {}
    save_bundle(bundle, out, recipe=name, training={"tokenizer": tok_report, "gpt": report},
                trained_on={"corpus_hours": card.get("hours"), "identities": card.get("identities"),
                            "voices": len(card.get("voices", [])), "seed": card.get("seed")})
    return report


def run_recipe(name: str, corpus: Path, out: Path, progress: bool = True, seed: int = 0,
               budget_scale: float = 1.0) -> dict:
    """The three stages within the recipe's ``total_minutes``: the transformer stage's training ends
    in time for the decoder stage's loading and minutes, and the decoder stage's by the total. A
    finished tokenizer (``out/work/tokenizer.safetensors``) is kept, not redone, and the transformer
    resumes from its checkpoint (the total then counts from this run's start). The stages' reports
    and the minutes are also written to ``out/work/recipe_report.json``."""
    from eartalk.model.decoder_stage import decoder_stage
    r = _recipe(name, budget_scale)
    t0 = time.time()
    end = t0 + r["total_minutes"] * 60
    report = {"recipe": name, "corpus": str(corpus), "total_budget_minutes": r["total_minutes"]}
    if not (Path(out) / "work" / "tokenizer.safetensors").exists():
        report["tokenizer"] = tokenizer_stage(name, corpus, out, progress, seed, budget_scale)
    report["tokenizer_minutes"] = round((time.time() - t0) / 60, 2)
    decoder = r["dec_minutes"] > 0
    gpt_end = end - (r["dec_minutes"] + r["dec_load_minutes"]) * 60 if decoder else end
    report["gpt"] = gpt_stage(name, corpus, out, progress, seed, budget_scale, until=gpt_end)
    if decoder:
        report["decoder"] = decoder_stage(name, corpus, out, progress, seed, budget_scale, until=end)
    report["total_minutes"] = round((time.time() - t0) / 60, 2)
    (Path(out) / "work" / "recipe_report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
