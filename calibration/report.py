"""The accuracy report of one quantized artifact (int8 / fp8 step + decoder) against fp32, both
on ONNX Runtime CPU, on held-out clips.

What is measured, and on which inputs:

- **token agreement (same inputs)**: the fp32 stream runs; at every frame the quantized step graph
  gets exactly the fp32 step's inputs (same KV cache, audio, controls) and its argmax tokens are
  compared with fp32's. Also the K/V relative error and the logits SQNR on those inputs.
- **decoder PSNR (same codes)**: the quantized decoder decodes the fp32 stream's codes; PSNR of its uint8
  frames against fp32's.
- **stream PSNR (free-running)**: the quantized graphs run a stream on their own (their tokens
  feed their own cache); PSNR of its frames against the fp32 stream's. Reported, not gated: the
  targets are per artifact on the same inputs (token agreement for the step graph, decoder PSNR
  for the decoder). Free-running, the first differing token makes the two streams different
  samples of the model from then on, whatever the precision; that effect is what lip-sync and
  drift (below) judge.
- **lip-sync**: the probe's mouth openness against the clip's ground truth (Pearson r), fp32
  stream vs quantized stream (controls free, as ``eartalk eval``); delta relative to fp32.
- **identity drift**: ``eartalk eval``'s drift over ``frames_drift`` frames (2,000 by default) of
  looped speech, fp32 vs quantized: slope per 1000 frames and dist(last)/dist(ref).

With an untrained (random-init) model these numbers say little about a trained one; the report
says so. Outputs: ``<precision>.report.json``, ``.md`` (a short table) and ``.png`` (per-frame
PSNR and the two drift curves).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from eartalk.runtime.backend import Backend, to_uint8_frames

__all__ = ["accuracy_report", "TARGETS", "format_markdown"]

# The issue's INT8 targets (FP8 is reported against the same numbers, without a promise)
TARGETS = {"token_agreement": 0.97, "psnr_db": 35.0, "lipsync_rel_delta": 0.05, "speedup": 1.5}


class _Shadow(Backend):
    """fp32 backend that also runs the quantized step/decoder on the very same inputs."""

    name = "shadow"

    def __init__(self, ref: Backend, q: Backend):
        super().__init__(ref.cfg, ref.receptive_field)
        self.ref, self.q = ref, q
        self.agree: list[float] = []
        self.kv_err: list[float] = []
        self.logit_sqnr: list[float] = []
        self.dec_psnr: list[float] = []

    def tokenize(self, images):
        return self.ref.tokenize(images)

    def reference(self, portrait):
        return self.ref.reference(portrait)

    def prefill(self, portrait_tokens):
        return self.ref.prefill(portrait_tokens)

    def encode_audio(self, mel_window):
        return self.ref.encode_audio(mel_window)

    def step(self, *args):
        from eartalk.calibration.quantize import sqnr_db
        lr, kr, vr = self.ref.step(*args)
        lq, kq, vq = self.q.step(*args)
        self.agree.append(float(np.mean(lr.argmax(-1) == lq.argmax(-1))))
        self.kv_err.append(max(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
                               for a, b in ((kr, kq), (vr, vq))))
        self.logit_sqnr.append(sqnr_db(lr, lq))
        return lr, kr, vr

    def decode_float(self, codes, ref):
        from eartalk.evaluate import psnr
        a = self.ref.decode_float(codes, ref)
        b = self.q.decode_float(codes, ref)
        for x, y in zip(to_uint8_frames(a), to_uint8_frames(b)):
            self.dec_psnr.append(psnr(x, y))
        return a


def _finite(v):
    return v if v is not None and isinstance(v, (int, float)) and math.isfinite(v) else None


def _mean_psnr(values) -> float:
    """Mean PSNR over frames via the mean MSE (identical frames: inf), not a mean of dB values."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan
    mse = np.where(np.isinf(v), 0.0, 255.0 ** 2 / 10 ** (v / 10))
    m = float(mse.mean())
    return math.inf if m == 0 else 10 * math.log10(255.0 ** 2 / m)


def accuracy_report(onnx_dir, precision: str, data, out_dir, *, model="tiny", random_init: bool = False,
                    seed: int = 0, split: str = "test", max_clips: int = 8, max_frames: int | None = 250,
                    frames_drift: int = 2000, probe=None, threads: int | None = None, progress: bool = True,
                    guidance: float = 1.0) -> dict:
    """Measure the ``precision`` graphs of ``onnx_dir`` against its fp32 graphs (see the module
    docstring); writes ``<precision>.report.{json,md,png}`` to ``out_dir``; -> the report dict.
    ``guidance``: the streams' audio guidance (``runtime/guidance.py``); default 1, unguided, one
    step row per frame, as the shipped reports were measured."""
    from eartalk.data.corpus import list_clips, load_clip
    from eartalk.evaluate import _drift, _frames_of, _probe, drift_checkpoints, pearson, psnr
    from eartalk.model.train_gpt import clip_portrait, fit_size
    from eartalk.probe.net import load_probe
    from eartalk.runtime.model_loader import load_model
    from eartalk.runtime.ort_backend import OrtBackend

    drift_checkpoints(frames_drift)
    ids = list_clips(data, split)[:max_clips]
    if not ids:
        raise ValueError(f"corpus {data} has no clips in split {split!r}")
    bundle = load_model(model, random_init=random_init, seed=seed)
    fp = OrtBackend.from_bundle(onnx_dir, bundle, threads=threads)
    q = OrtBackend.from_bundle(onnx_dir, bundle, threads=threads, precision=precision)
    probe = probe or load_probe()
    cfg, spf = fp.cfg, fp.cfg.samples_per_frame
    shadow = _Shadow(fp, q)
    t0 = time.perf_counter()
    stream_psnr, mouth_fp, mouth_q, mouth_gt, per_clip = [], [], [], [], []
    first = None
    for cid in ids:
        clip = load_clip(data, cid)
        audio = clip.audio.astype(np.float32)
        if max_frames:
            audio = audio[: max_frames * spf]
        portrait = clip_portrait(clip, cfg.image_size)
        a = np.asarray(_frames_of(shadow, portrait, audio, (), seed, guidance=guidance))   # fp32, quantized shadowed
        b = np.asarray(_frames_of(q, portrait, audio, (), seed, guidance=guidance))        # quantized, free-running
        ps = [psnr(x, y) for x, y in zip(a, b)]
        stream_psnr += ps
        m = min(len(a), len(b), len(clip.gt["mouth_open"]) if clip.gt is not None else 0)
        if m:
            pa, pb = _probe(probe, a[:m]), _probe(probe, b[:m])
            mouth_fp.append(pa["mouth_open"]), mouth_q.append(pb["mouth_open"])
            mouth_gt.append(np.asarray(clip.gt["mouth_open"][:m]))
        per_clip.append({"clip": cid, "frames": len(a), "stream_psnr_db": _mean_psnr(ps)})
        if first is None and clip.gt is not None:
            first = (clip, portrait, fit_size(np.asarray(clip.frames), cfg.image_size))
    r_fp = pearson(np.concatenate(mouth_fp), np.concatenate(mouth_gt)) if mouth_fp else math.nan
    r_q = pearson(np.concatenate(mouth_q), np.concatenate(mouth_gt)) if mouth_q else math.nan
    rel = abs(r_q - r_fp) / abs(r_fp) if math.isfinite(r_fp) and math.isfinite(r_q) and r_fp != 0 else math.nan
    drift = {}
    if first is not None and frames_drift:
        for name, be in (("fp32", fp), (precision, q)):
            drift[name] = _drift(be, probe, first[0], first[1], first[2], frames_drift, seed, progress,
                                 guidance=guidance)["free"]
    agreement = float(np.mean(shadow.agree))
    dec_psnr = _mean_psnr(shadow.dec_psnr)
    qinfo = fp.graphs.manifest.get("quantized", {}).get(precision, {})
    metrics = {
        "token_agreement": agreement, "token_agreement_min_frame": float(np.min(shadow.agree)),
        "kv_rel_error_mean": float(np.mean(shadow.kv_err)), "kv_rel_error_max": float(np.max(shadow.kv_err)),
        "logits_sqnr_db_mean": float(np.mean(shadow.logit_sqnr)),
        "decoder_psnr_db": dec_psnr, "stream_psnr_db": _mean_psnr(stream_psnr),
        "lipsync_r_fp32": r_fp, f"lipsync_r_{precision}": r_q, "lipsync_rel_delta": rel,
        "lipsync_abs_delta": r_q - r_fp if math.isfinite(r_q) and math.isfinite(r_fp) else math.nan,
    }
    if drift:
        metrics.update({
            "drift_slope_fp32": drift["fp32"]["slope_per_1000_frames"],
            f"drift_slope_{precision}": drift[precision]["slope_per_1000_frames"],
            "drift_slope_delta": drift[precision]["slope_per_1000_frames"] - drift["fp32"]["slope_per_1000_frames"],
            "drift_ratio_fp32": drift["fp32"]["ratio"], f"drift_ratio_{precision}": drift[precision]["ratio"]})
    targets = {
        "token_agreement": {"target": f">= {TARGETS['token_agreement']}", "met": agreement >= TARGETS["token_agreement"]},
        "decoder_psnr_db": {"target": f">= {TARGETS['psnr_db']}", "met": dec_psnr >= TARGETS["psnr_db"]},
        "lipsync_rel_delta": {"target": f"<= {TARGETS['lipsync_rel_delta']}",
                              "met": bool(math.isfinite(rel) and rel <= TARGETS["lipsync_rel_delta"])},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{precision}.report.{ext}" for ext in ("json", "md", "png")}
    report = {
        "precision": precision, "reference": "fp32", "runtime": "onnxruntime CPU (both)", "onnx_dir": str(onnx_dir),
        "guidance": float(guidance),
        "model": str(model), "random_init": bool(random_init), "weights_sha256": fp.weights_hash,
        "data": str(data), "split": split, "clips": per_clip, "frames": len(shadow.agree),
        "frames_drift": frames_drift if drift else 0, "metrics": metrics, "targets": targets,
        "artifacts": {k: {kk: v.get(kk) for kk in ("file", "sha256", "method", "excluded_nodes", "head_nodes_fp32", "gate_passed",
                                                  "quantized_nodes", "candidate_nodes", "min_compute_capability")}
                      for k, v in qinfo.items()},
        "excluded_nodes": {k: v.get("excluded", []) for k, v in qinfo.items()},
        "per_frame": {"token_agreement": shadow.agree, "decoder_psnr_db": [_finite(x) for x in shadow.dec_psnr],
                      "stream_psnr_db": [_finite(x) for x in stream_psnr]},
        "drift": {k: {kk: v[kk] for kk in ("curve_frames", "curve", "slope_per_1000_frames", "ratio", "fps")}
                  for k, v in drift.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "notes": [("RANDOM-INIT model: these numbers describe an untrained network (noise frames, probe "
                   "readings of noise) and say little about a trained one") if random_init else "trained model",
                  "token agreement and decoder PSNR: quantized graphs on exactly the fp32 stream's inputs; "
                  "stream PSNR: a free-running quantized stream against the fp32 stream (divergence compounds)",
                  "PSNR values of identical frames are inf (stored as null per frame, 'inf' in means)"],
        "plot": str(paths["png"]), "markdown": str(paths["md"]),
    }
    paths["json"].write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(format_markdown(report))
    _plot(report, paths["png"])
    fp.close(), q.close()
    return report


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        o = float(o)
        return o if math.isfinite(o) else (None if math.isnan(o) else ("inf" if o > 0 else "-inf"))
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _fmt(v, spec=".4g"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if v == "inf" or v == math.inf:
        return "inf"
    return format(v, spec)


def format_markdown(r: dict) -> str:
    """A short markdown table of one report (metric, value, target, met)."""
    m, t, p = r["metrics"], r["targets"], r["precision"]
    rows = [("token agreement (same inputs)", _fmt(m["token_agreement"], ".4f"), t["token_agreement"]),
            ("K/V relative error (mean / max)", f"{_fmt(m['kv_rel_error_mean'], '.3g')} / {_fmt(m['kv_rel_error_max'], '.3g')}", None),
            ("logits SQNR dB (mean)", _fmt(m["logits_sqnr_db_mean"], ".1f"), None),
            ("decoder PSNR dB (same codes)", _fmt(m["decoder_psnr_db"], ".2f"), t["decoder_psnr_db"]),
            ("stream PSNR dB (free-running; reported, not gated)", _fmt(m["stream_psnr_db"], ".2f"), None),
            (f"lip-sync r fp32 / {p}", f"{_fmt(m['lipsync_r_fp32'], '.3f')} / {_fmt(m[f'lipsync_r_{p}'], '.3f')}", None),
            ("lip-sync relative delta", _fmt(m["lipsync_rel_delta"], ".3f"), t["lipsync_rel_delta"])]
    if "drift_slope_fp32" in m:
        rows.append((f"identity drift slope /1000 fr fp32 / {p} ({r['frames_drift']} frames)",
                     f"{_fmt(m['drift_slope_fp32'], '.2e')} / {_fmt(m[f'drift_slope_{p}'], '.2e')}", None))
        rows.append((f"drift ratio fp32 / {p}", f"{_fmt(m['drift_ratio_fp32'], '.2f')} / {_fmt(m[f'drift_ratio_{p}'], '.2f')}", None))
    lines = [f"# {p} vs fp32 (ONNX Runtime CPU): {r['model']}{' (RANDOM INIT)' if r['random_init'] else ''}", "",
             f"{r['frames']} frames on {len(r['clips'])} clips of {r['data']} [{r['split']}], audio guidance "
             f"{r.get('guidance', 1.0):g}{' (unguided)' if r.get('guidance', 1.0) == 1 else ''}", "",
             "| metric | value | target | met |", "|---|---|---|---|"]
    for name, val, tg in rows:
        lines.append(f"| {name} | {val} | {tg['target'] if tg else ''} | {('yes' if tg['met'] else 'NO') if tg else ''} |")
    ex = {k: [e["node"] for e in v] for k, v in r["excluded_nodes"].items()}
    lines += ["", "Kept in fp32 by the accuracy gate: " + ("; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in ex.items()) or "none")]
    heads = {k: a.get("head_nodes_fp32") for k, a in r.get("artifacts", {}).items() if a.get("head_nodes_fp32")}
    if heads:
        lines += ["", "Kept in fp32 by design, the output heads: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in heads.items())]
    lines += [f"- {n}" for n in r["notes"][:1]]
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    cap = lambda xs: [60.0 if x is None else min(60.0, x) for x in xs]   # noqa: E731  (inf plotted at 60)
    a.plot(cap(r["per_frame"]["decoder_psnr_db"]), label="decoder, same codes", lw=0.8)
    a.plot(cap(r["per_frame"]["stream_psnr_db"]), label="free-running stream", lw=0.8)
    a.axhline(TARGETS["psnr_db"], color="k", ls="--", lw=0.6, label="target")
    a.set_xlabel("frame (clips concatenated)")
    a.set_ylabel("PSNR vs fp32 dB (inf shown as 60)")
    a.set_title(f"{r['precision']} vs fp32")
    a.legend(fontsize=7)
    for name, d in r["drift"].items():
        b.plot(d["curve_frames"], d["curve"], label=name)
    b.set_xlabel("frame")
    b.set_ylabel("identity distance from frame 1")
    b.set_title("identity drift (probe)")
    b.legend(fontsize=7)
    fig.suptitle(("RANDOM-INIT model: " if r["random_init"] else "") + f"{r['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
