"""Fine-tuning a trained model on one person's videos (``eartalk train --from tiny --data data/mine``).

Training a model from scratch on a few minutes of someone's videos gives a poor model, and one
that knows no controls: the videos carry no ground truth for pose, gaze, blink or emotion. A
fine-tune starts from a trained bundle instead and keeps what it learnt:

1. **Decoder stage** (``eartalk train --from M``, or ``eartalk train tokenizer --from M``): the
   tokenizer's *encoder stays frozen*, so every frame's code keeps the meaning the base model's
   transformer learnt; the decoder and the reference encoder train on the person's frames (plus a
   share of synthetic frames from ``--mix``, so that codes their videos never show, an emotion or a
   closed eye, still decode) to paint that face. The bundle it writes is the base transformer with
   this decoder: a complete model.
2. **Transformer stage**, optional (``eartalk train gpt --from M``, after the first): the base
   model's transformer and audio encoder train on the person's clips, tokenized by that unchanged
   encoder, mixed with clips of the synthetic corpus (``--mix``), whose ground truth keeps pinned
   controls trained. Why optional: on a new synthetic face (docs/model-history.md, session 30) it
   cut the token cross-entropy on that face's held-out clips from 4.48 to 3.90 but left the frames
   where the decoder stage had put them (PSNR 24.46 -> 24.35, visemes 0.592 -> 0.604, pinned pitch
   0.71 -> 0.86 deg) for 17 more minutes; a person whose motion differs from the renderer's may
   gain more from it (unmeasured: no real video here).

Both stages write where the recipe's do (``OUT/work``), resume the same way, and end in a bundle
``OUT/model.safetensors`` + ``model.json`` whose card names the base model it came from.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np

from eartalk.data.corpus import list_clips
from eartalk.model.bundle import load_bundle, save_bundle
from eartalk.model.recipe import RECIPES, check_budget_scale, tokenizer_frames
from eartalk.model.tokenizer import VQTokenizer, held_out_scores, train_tokenizer
from eartalk.model.train_gpt import ClipTokens, cached_tokens, stage_tokenizer, train_gpt

# dec_*: the decoder stage (frames every dec_every-th of each user clip; dec_mix of each batch, on
# average, synthetic frames from mix_clips clips every mix_every-th). gpt_*: the transformer stage,
# gpt_mix of its windows from the synthetic clips. Learning rates are a quarter of the recipe's or
# lower: the weights start trained. Minutes are for the 2-core CPUs this project runs on.
FINETUNE = dict(dec_minutes=8.0, dec_lr=5e-4, dec_batch=16, dec_every=2, dec_mix=0.25, mix_every=6,
                gpt_minutes=15.0, gpt_lr=3e-4, gpt_warmup=50, gpt_mix=0.5, mix_clips=200)

# tokenizer parts the decoder stage trains: everything that turns codes (and the portrait) into a frame
DECODER_PARTS = ("ref_encoder", "dec_in", "attn_q", "attn_kv", "attn_out", "dec_top", "coarse_flow",
                 "ref_proj", "fuse_norm", "fuse", "refine", "up", "head_norm", "fine_flow", "head", "frame_in", "tail")


def _settings(budget_scale: float) -> dict:
    """:data:`FINETUNE` with both stages' minutes times ``budget_scale``."""
    check_budget_scale(budget_scale, "fine-tune's")
    s = dict(FINETUNE)
    s["dec_minutes"] *= budget_scale
    s["gpt_minutes"] *= budget_scale
    return s


def encoder_digest(tok: VQTokenizer) -> str:
    """sha256 of every weight that decides a frame's code (the encoder, and the frame-code head when
    there is one): equal digests, equal tokens for every frame, whatever the decoder became."""
    h = hashlib.sha256()
    for name, t in sorted(tok.state_dict().items()):
        if name.startswith(("encoder.", "frame_head.")):
            h.update(name.encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _freeze_encoder(tok: VQTokenizer) -> list[str]:
    """Freeze every tokenizer weight but the decoder's; -> the names left trainable."""
    trainable = []
    for name, p in tok.named_parameters():
        keep = name.split(".")[0] in DECODER_PARTS
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def _base_recipe(meta: dict) -> dict:
    """The loss settings of the recipe that made the base model (or its own base, for a fine-tune of a
    fine-tune; ``tiny``'s for a model made otherwise)."""
    name = meta.get("recipe")
    if name not in RECIPES:
        name = (meta.get("finetuned_from") or {}).get("recipe")
    return RECIPES.get(name, RECIPES["tiny"])


def _check_user_corpus(data: Path, mix: Path | None) -> None:
    if not list_clips(data, "train"):
        raise ValueError(f"--data {data}: no training clips (import your videos with `eartalk import "
                         f"--videos DIR --out {data}`)")
    if mix is not None and not list_clips(mix, "train"):
        raise ValueError(f"--mix {mix}: no training clips; expected a corpus from `eartalk synth`")


def _concat_sets(a: dict, b: dict) -> dict:
    """Two ``tokenizer_frames`` sets as one: ``b``'s portrait indices shifted past ``a``'s portraits."""
    return dict(frames=np.concatenate([a["frames"], b["frames"]]),
                portraits=np.concatenate([a["portraits"], b["portraits"]]),
                index=np.concatenate([a["index"], b["index"] + len(a["portraits"])]),
                exprs=np.concatenate([a["exprs"], b["exprs"]]))


def _subsample(d: dict, n: int, rng: np.random.Generator) -> dict:
    """``n`` frames of a set, drawn without replacement (all of them when it has no more)."""
    if n >= len(d["frames"]):
        return d
    at = np.sort(rng.choice(len(d["frames"]), n, replace=False))
    return {**d, "frames": d["frames"][at], "index": d["index"][at], "exprs": d["exprs"][at]}


def decoder_stage(base: str | Path, data: Path, out: Path, mix: Path | None = None, progress: bool = True,
                  seed: int = 0, budget_scale: float = 1.0) -> dict:
    """Stage 1: the base model's tokenizer with its encoder frozen, its decoder trained on ``data``'s
    frames (and ``mix``'s); writes ``out/work/tokenizer.safetensors`` and ``tokenizer_report.json``
    with the held-out PSNR on ``data``'s validation clips before and after, and the bundle
    ``out/model.safetensors`` (the base transformer and audio encoder with this tokenizer)."""
    s = _settings(budget_scale)
    _check_user_corpus(data, mix)
    bundle = load_bundle(base)
    cfg, tok = bundle.cfg, bundle.tokenizer
    work = Path(out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    d = tokenizer_frames(data, "train", cfg.image_size, s["dec_every"], None, progress, expr=True)
    n_user = len(d["frames"])
    if mix is not None:
        want = int(round(n_user * s["dec_mix"] / (1 - s["dec_mix"])))
        m = tokenizer_frames(mix, "train", cfg.image_size, s["mix_every"], s["mix_clips"], progress, expr=True)
        d = _concat_sets(d, _subsample(m, want, np.random.default_rng(seed)))
    v = tokenizer_frames(data, "val", cfg.image_size, s["dec_every"] * 4, None, progress) \
        if list_clips(data, "val") else None
    val = (v["frames"], v["portraits"], v["index"]) if v else None
    # bf16 where the CPU has it (train_tokenizer's default): unlike the recipe's tokenizer trained from
    # scratch, these 8 minutes from trained weights measured level in bf16 and float32 on an AMX Xeon
    # (docs/model-history.md, session 39)
    m = train_decoder(tok, cfg, d["frames"], d["portraits"], d["index"], d["exprs"], val=val, lr=s["dec_lr"],
                      batch=s["dec_batch"], minutes=s["dec_minutes"], expr_weight=_base_recipe(bundle.meta)["tok_expr"],
                      out_dir=work, seed=seed, progress=progress)
    m.update(stage="decoder", base_model=str(base), base_sha256=bundle.meta.get("sha256"), frames=n_user,
             mix_frames=len(d["frames"]) - n_user, val_frames=len(val[0]) if val else 0,
             budget_minutes=s["dec_minutes"])
    (work / "tokenizer_report.json").write_text(json.dumps(m, indent=1))
    _save(bundle, base, bundle.meta, data, out, mix, {"decoder": m}, n_clips=len(list_clips(data, "train")))
    return m


def train_decoder(tok: VQTokenizer, cfg, frames, portraits, index, exprs, *, val, lr: float, batch: int,
                  minutes: float, expr_weight: float, out_dir: Path, seed: int, progress: bool, critic=None,
                  critic_weight: float = 0.0, mix_frames=None, mix_of=None, mix_prob: float = 0.0,
                  bf16: bool | None = None) -> dict:
    """Train ``tok``'s :data:`DECODER_PARTS` on ``frames`` (against ``portraits[index]``, their
    expression maps ``exprs`` weighted by ``expr_weight``; the expression ``critic``'s feature distance
    by ``critic_weight``; codes mixed with twins' by ``mix_prob``; ``bf16`` as ``train_tokenizer``'s)
    for ``minutes``, its encoder frozen; the stage of the fine-tune and the recipe's third.
    -> ``train_tokenizer``'s metrics without the model, plus ``val_psnr_before`` (on ``val``),
    ``encoder_sha256`` and ``trainable_tensors``. A RuntimeError if the encoder's digest moved: the
    transformer was trained on its codes."""
    before = held_out_scores(tok, *val)[0] if val else None
    digest = encoder_digest(tok)
    trainable = _freeze_encoder(tok)
    m = train_tokenizer(frames, portraits, cfg, steps=10 ** 6, batch=batch, lr=lr, out_dir=str(out_dir),
                        progress=progress, portrait_index=index, tokenizer=tok, seed=seed, max_minutes=minutes,
                        val=val, val_every=250, self_every=0, exprs=exprs, expr_weight=expr_weight, critic=critic,
                        critic_weight=critic_weight, mix_frames=mix_frames, mix_of=mix_of, mix_prob=mix_prob,
                        bf16=bf16)
    m.pop("model")
    tok.eval()
    if encoder_digest(tok) != digest:
        raise RuntimeError("the decoder stage changed the tokenizer's encoder; its codes no longer match the "
                           "transformer's")
    m.update(val_psnr_before=before, encoder_sha256=digest, trainable_tensors=len(trainable))
    return m


def _save(bundle, base, base_card: dict, data: Path, out: Path, mix: Path | None, training: dict,
          n_clips: int) -> None:
    """The fine-tuned bundle, its card naming the base model (``base_card``: its card as loaded; hash,
    recipe, training) it came from."""
    save_bundle(bundle, out, recipe="finetune", training=training,
                finetuned_from={"model": str(base), "sha256": base_card.get("sha256"),
                                "recipe": base_card.get("recipe"), "training": base_card.get("training")},
                trained_on={**(base_card.get("trained_on") or {}), "user_data": str(data),
                            "user_clips": n_clips, "mix": str(mix) if mix else None})


def _stage_tokenizer_of(path: Path, digest: str, base, cfg=None) -> VQTokenizer:
    """The decoder stage's tokenizer at ``path``, refused unless its encoder's digest is ``digest``
    (the base model's): otherwise its codes are not the ones the base transformer was trained on."""
    tok = VQTokenizer.load(str(path), cfg)
    if encoder_digest(tok) != digest:
        raise ValueError(f"{path}: its encoder is not the one of {base!r} (a decoder stage of another model), so "
                         f"its codes are not the ones the transformer was trained on; fine-tune into a new --out")
    return tok


def mix_clips(user: list[ClipTokens], synthetic: list[ClipTokens], share: float) -> list[ClipTokens]:
    """One list to draw training windows from uniformly, in which ``synthetic`` clips are about
    ``share`` of the draws: each user clip appears ``r`` times, ``r`` the whole number that comes
    closest (at least 1). The same objects repeated, not copies."""
    if not 0 <= share < 1:
        raise ValueError(f"mix share {share!r}: expected 0 <= share < 1")
    if not synthetic or share == 0:
        return list(user)
    r = max(1, round(len(synthetic) * (1 - share) / (share * len(user))))
    return list(user) * r + list(synthetic)


def gpt_stage(base: str | Path, data: Path, out: Path, mix: Path | None = None, progress: bool = True,
              seed: int = 0, budget_scale: float = 1.0) -> dict:
    """Stage 2: the base model's transformer and audio encoder trained on ``data``'s clips (mixed with
    ``mix``'s) on the decoder stage's tokenizer, resumable from ``out/work/gpt_ckpt.pt``; writes the
    bundle ``out/model.safetensors`` + ``out/model.json``."""
    s = _settings(budget_scale)
    _check_user_corpus(data, mix)
    out = Path(out)
    work = out / "work"
    tok_path = stage_tokenizer(out, f"run the decoder stage first (`eartalk train --from {base} --data {data} "
                                    f"--out {out}`)")
    t0 = time.time()
    bundle = load_bundle(base)
    base_meta = dict(bundle.meta)
    digest = encoder_digest(bundle.tokenizer)
    bundle.tokenizer = _stage_tokenizer_of(tok_path, digest, base, bundle.cfg)
    for p in bundle.tokenizer.parameters():
        p.requires_grad_(False)
    # tokens depend on the encoder alone, so the caches are keyed by its digest
    key = f"encoder:{digest}"
    user = {sp: cached_tokens(bundle, data, sp, None, work / f"tokens_{sp}.npz", key, progress)
            for sp in ("train", "val")}
    synthetic = cached_tokens(bundle, mix, "train", s["mix_clips"], work / "tokens_mix.npz", key, progress) \
        if mix is not None else []
    if mix is None:
        warnings.warn("no --mix corpus: the transformer trains on your clips alone, which carry no control ground "
                      "truth, so pinned pose, gaze, blink and emotion may weaken")
    train = mix_clips(user["train"], synthetic, s["gpt_mix"])
    r = _base_recipe(base_meta)
    report = {"tokenize_minutes": round((time.time() - t0) / 60, 2), "budget_minutes": s["gpt_minutes"],
              "user_clips": len(user["train"]), "mix_clips": len(synthetic)}
    # the recipe's loss settings; no mouth probe (its head is not in the bundle and would start untrained)
    report.update(train_gpt(bundle, train, user["val"], work, minutes=s["gpt_minutes"], batch=r["gpt_batch"],
                            corrupt=r["gpt_corrupt"], lr=s["gpt_lr"], warmup=s["gpt_warmup"],
                            start_prob=r["gpt_start"], mouth_weight=0.0, change_weight=r["gpt_change"],
                            portrait_share=r["gpt_portrait"], plausible=r["gpt_plausible"],
                            stale_prob=r["gpt_stale"], draft_prob=r["gpt_refine"] if bundle.cfg.refine else 0.0,
                            seed=seed, progress=progress))
    rep_path = work / "tokenizer_report.json"
    dec_report = json.loads(rep_path.read_text()) if rep_path.exists() else {}
    _save(bundle, base, base_meta, data, out, mix, {"decoder": dec_report, "gpt": report},
          n_clips=len(user["train"]))
    return report


def run_finetune(base: str | Path, data: Path, out: Path, mix: Path | None = None, progress: bool = True,
                 seed: int = 0, budget_scale: float = 1.0, transformer: bool = False) -> dict:
    """The decoder stage (kept, not redone, when ``out/work/tokenizer.safetensors`` exists), then
    with ``transformer`` the transformer stage."""
    _settings(budget_scale)
    t0 = time.time()
    report = {"from": str(base), "data": str(data), "mix": str(mix) if mix else None}
    done = Path(out) / "work" / "tokenizer.safetensors"
    if not done.exists():
        report["tokenizer"] = decoder_stage(base, data, out, mix, progress, seed, budget_scale)
    elif not transformer:   # the transformer stage checks the same itself
        _stage_tokenizer_of(done, encoder_digest(load_bundle(base).tokenizer), base)
    report["tokenizer_minutes"] = round((time.time() - t0) / 60, 2)
    if transformer:
        report["gpt"] = gpt_stage(base, data, out, mix, progress, seed, budget_scale)
    report["total_minutes"] = round((time.time() - t0) / 60, 2)
    return report
