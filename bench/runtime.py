"""Runtime benchmark: sessions per engine, paged vs concat vs recompute, long-stream flatness,
memory, first-frame latency. Tiny preset, RANDOM weights (timing does not depend on training),
fp32, torch backend, CPU, ``torch.set_num_threads(2)``.

    python bench/runtime.py [--quick] --json OUT.json        (a PNG plot is written beside OUT)

What is measured (also written into the JSON under "method"):

* ``fps_N``: N sessions in one Engine, each fed speech-like noise, unguided (guidance 1: one row of
  the step per session); wall time per ``tick`` (one batched step + per-session sampling and
  decode) -> aggregate frames/s; per-frame latency = tick time.
* guidance: the same with every session at the runtime's default guidance (``runtime/guidance.py``:
  each session's row twice in the one step call, the second on silence), 1 and 16 sessions;
  cost = tick time / the unguided tick's.
* decode modes: two engines of N sessions (1 and 16), unguided, one decoding each frame's expected
  codes (the runtime's default, ``runtime/soft_decode.py``), the other the picked tokens' codes
  (``decode="tokens"``), ticked alternately (so warm-up and machine load fall on both alike);
  cost = the expected-code tick's p50 / the tokens tick's.
* paged / concat / recompute, per frame, transformer only (decode is the same for all three):
  paged = build_page_table + gather + step + begin_step + append; concat = torch.cat of every past
  K/V (no window, grows without bound) + the same step maths over all of it; recompute exact = no
  cache, one forward over the context tokens of the last L*W frames (+ sink + this frame's
  queries), which reproduces the window's K/V exactly (layer-l K/V of a frame depend on that
  frame's own window, so the receptive field is L*W frames); recompute approx = the same over only
  the last W frames (NOT exact: its deeper-layer K/V differ).
* step at frame 100 vs 100,000: two identical streams run 90 real frames; the second one's page
  table is fast-forwarded by 99,910 ``begin_step`` calls (metadata only: pages are freed/reused
  exactly as in a real stream, K/V bytes are left stale); then real ticks of the two are timed
  alternately (frames ~100 vs ~100,000), medians compared.
* RSS: VmRSS from /proc/self/status after ~130 real frames, then over a 100,000-frame loop (25,000
  with --quick) of the
  cache path with a cheap step (page table + begin_step + append of a fixed K/V every frame,
  gather every ``gather_every`` frames); growth = (max RSS - RSS at start) / RSS at start.
* refinement: one session opened with ``refine`` = 0, 1, 2, 3 (K extra passes of the step per
  frame, ``runtime/refine.py``; the preset is built with ``refine=True``, which adds one unused
  vector to the one-pass step), ticks timed as for ``fps_N``; cost = tick time / K=0's.
* first frame (at the runtime's default guidance): session already open; PCM pushed in 20 ms chunks; time from the push that
  completes frame 0's audio + 80 ms lookahead (1920 samples) to frame 0 leaving ``frames()``.
"""
from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a small shared CPU the spinning thread steals the core
# the other one needs (measured here: 148 -> 44 ms per tiny tick with 2 threads under load).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eartalk.model.bundle import new_bundle
from eartalk.model.config import preset
from eartalk.model.gpt import _sfa_lag, lag_bias
from eartalk.runtime import Engine
from eartalk.runtime.guidance import DEFAULT_GUIDANCE
from eartalk.runtime.page_table import build_page_table
from eartalk.runtime.torch_backend import TorchBackend, batch_invariant_step

SPF = 640


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(a, q):
    return float(np.percentile(np.asarray(a) * 1e3, q))


def portrait(i):
    return np.random.default_rng(i).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def speech(n, seed):
    return (np.random.default_rng(seed).standard_normal(n) * 0.2).astype(np.float32)


# ------------------------------------------------------------------ sessions per engine
def bench_sessions(backend, n_sessions, ticks, refine=0, guidance=1.0):
    eng = Engine(backend, max_sessions=n_sessions)
    ss = [eng.open_session(portrait(i), refine=refine, guidance=guidance) for i in range(n_sessions)]
    for i, s in enumerate(ss):
        s.push_audio(speech(SPF * (ticks + 3), i))
    eng.tick()                                                     # warm-up
    times = []
    for _ in range(ticks):
        t = time.perf_counter()
        n = eng.tick()
        times.append(time.perf_counter() - t)
        assert n == n_sessions
    eng.close()
    return {"sessions": n_sessions, "ticks": ticks, "tick_ms_p50": pct(times, 50), "tick_ms_p99": pct(times, 99),
            "fps_aggregate": n_sessions * len(times) / sum(times), "fps_per_session": len(times) / sum(times)}


def bench_decode_modes(backend, n_sessions, ticks):
    """Tick p50 of an engine decoding expected codes and one decoding the tokens' codes, alternately."""
    engines, handles, times = {}, [], {"expected": [], "tokens": []}
    for mode in times:
        engines[mode] = eng = Engine(backend, max_sessions=n_sessions)
        for i in range(n_sessions):
            handles.append(eng.open_session(portrait(i), guidance=1.0, decode=mode))   # a dropped handle closes
            handles[-1].push_audio(speech(SPF * (ticks + 3), i))
        eng.tick()                                                 # warm-up
    for _ in range(ticks):
        for mode, eng in engines.items():
            t = time.perf_counter()
            assert eng.tick() == n_sessions
            times[mode].append(time.perf_counter() - t)
    for eng in engines.values():
        eng.close()
    out = {m: pct(t, 50) for m, t in times.items()}
    return {"sessions": n_sessions, "ticks": ticks, "tick_ms_p50": out, "cost": out["expected"] / out["tokens"]}


# ------------------------------------------------------------------ three caches
class Stream:
    """Inputs of a synthetic stream: prev tokens, audio features, free conditions per frame."""

    def __init__(self, cfg, T, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.tokens = torch.randint(0, cfg.codebook_size, (T + 1, 1, cfg.tokens_per_frame), generator=g)
        self.audio = torch.randn(T, 1, cfg.audio_tokens, cfg.audio_dim, generator=g)
        self.cond = torch.zeros(T, 1, cfg.cond_tokens, cfg.cond_dim)
        self.mask = torch.zeros(T, 1, cfg.cond_tokens, dtype=torch.bool)


def run_paged(backend, st, T):
    eng = Engine(backend, max_sessions=1)
    handle = eng.open_session(portrait(0), guidance=1.0)      # keep the handle: a dropped Session closes itself
    s = handle._state
    st.tokens[0] = torch.from_numpy(s.prev_tokens)[None]
    times, logits = [], []
    for t in range(T):
        t0 = time.perf_counter()
        table = build_page_table([s.pages])
        pk, pv, lag = eng.cache.gather(table)
        lo, nk, nv = backend.step_torch(st.tokens[t], st.audio[t], st.cond[t], st.mask[t], pk, pv, lag)
        eng.cache.append([s.pages.begin_step()], nk, nv)
        times.append(time.perf_counter() - t0)
        logits.append(lo)
    eng.close()
    return times, logits


def run_concat(backend, st, T):
    gpt, cfg = backend.bundle.gpt, backend.cfg
    with torch.inference_mode():
        sk, sv = gpt.prefill(st.tokens[0])
    ks, vs, lags = sk, sv, torch.full((1, cfg.page_tokens), -1, dtype=torch.int32)
    times, sizes = [], []
    gpt._check_step = lambda *a: None          # the dense step over a growing S (bench only)
    try:
        for t in range(T):
            t0 = time.perf_counter()
            with torch.inference_mode():
                lo, nk, nv = batch_invariant_step(gpt, st.tokens[t], st.audio[t], st.cond[t], st.mask[t], ks, vs, lags)
                # every cached frame is one frame older; lags past W are clamped to W by lag_bias
                lags = torch.where(lags >= 0, lags + 1, lags)
                ks, vs = torch.cat([ks, nk], dim=3), torch.cat([vs, nv], dim=3)
                lags = torch.cat([lags, torch.ones(1, cfg.page_tokens, dtype=torch.int32)], dim=1)
            times.append(time.perf_counter() - t0)
            sizes.append(2 * ks.numel() * ks.element_size())
    finally:
        del gpt._check_step
    return times, sizes


def recompute(gpt, st, t, frames_back):
    """Logits of frame t from scratch over the context of frames [t - frames_back, t]."""
    cfg = gpt.cfg
    P, N, W = cfg.page_tokens, cfg.tokens_per_frame, cfg.window
    s = max(0, t - frames_back)
    T = t - s + 1
    lag_full = _sfa_lag(T, P, N, W)
    # keep the sink, every frame's context, and only frame t's queries (past queries are never seen)
    keep = torch.cat([torch.arange(P)] + [P + j * (P + N) + torch.arange(P) for j in range(T)]
                     + [P + (T - 1) * (P + N) + P + torch.arange(N)])
    lag = lag_full[keep][:, keep]
    with torch.inference_mode():
        ctx = gpt._context(gpt.embed_tokens(st.tokens[s:t + 1, 0]), gpt.audio_proj(st.audio[s:t + 1, 0]),
                           st.cond[s:t + 1, 0], st.mask[s:t + 1, 0])                    # [T,P,d]
        sink = gpt._context(gpt.embed_tokens(st.tokens[0]), gpt.audio_null[None], None, None)   # [1,P,d]
        x = torch.cat([sink[0], ctx.reshape(-1, ctx.shape[-1]), gpt._queries(ctx[-1:])[0]])[None]
        for l, blk in enumerate(gpt.blocks):
            x, _, _ = blk(x, lag_bias(gpt.lag_bias[l], lag, W).permute(2, 0, 1).unsqueeze(0))
        return gpt._logits(x[:, -N:])


def run_recompute(backend, st, frames, frames_back):
    gpt = backend.bundle.gpt
    times, logits = [], {}
    for t in frames:
        t0 = time.perf_counter()
        logits[t] = recompute(gpt, st, t, frames_back)
        times.append(time.perf_counter() - t0)
    return times, logits


# ------------------------------------------------------------------ long stream, memory, first frame
def bench_long(backend, quick):
    # Two identical streams: A stays near frame 100, B is fast-forwarded to 100,000. Their ticks
    # are timed alternately so that load from other processes hits both equally.
    engines, handles = [], []
    for _ in range(2):
        eng = Engine(backend, max_sessions=1)
        h = eng.open_session(portrait(0), guidance=1.0)
        h.push_audio(speech(SPF * 160, 1))
        for _ in range(90):
            eng.tick()
        engines.append(eng)
        handles.append(h)
    s = handles[1]._state
    t0 = time.perf_counter()
    for _ in range(100_000 - s.frame_index):                         # metadata fast-forward
        s.pages.begin_step()
    s.frame_index = 100_000
    ff_s = time.perf_counter() - t0
    at100, at100k = [], []
    for _ in range(30 if quick else 60):
        for eng, out in zip(engines, (at100, at100k)):
            t0 = time.perf_counter()
            eng.tick()
            out.append(time.perf_counter() - t0)
    assert s.frame_index > 100_000 and engines[1].pool.num_used == s.pages.window + 1
    eng = engines[1]
    engines[0].close()

    # RSS: cache path with a cheap step
    n_frames = 25_000 if quick else 100_000      # ~0.4 ms per frame of cache path
    gather_every = 100 if quick else 10
    new_k = torch.randn(eng.cache.pool[:1, :, 0].permute(1, 0, 2, 3, 4).shape)
    rss = [rss_mb()]
    t0 = time.perf_counter()
    for f in range(n_frames):
        table = build_page_table([s.pages])
        if f % gather_every == 0:
            eng.cache.gather(table)
        eng.cache.append([s.pages.begin_step()], new_k, new_k)
        if f % 5000 == 0:
            rss.append(rss_mb())
    rss.append(rss_mb())
    loop_s = time.perf_counter() - t0
    eng.close()
    return {"step_ms_at_100": pct(at100, 50), "step_ms_at_100k": pct(at100k, 50),
            "step_ratio": float(np.median(at100k) / np.median(at100)), "fast_forward_s": ff_s,
            "rss_mb_start": rss[0], "rss_mb_max": max(rss), "rss_mb_end": rss[-1], "rss_samples_mb": rss,
            "rss_frames": n_frames, "rss_gather_every": gather_every, "rss_loop_s": loop_s,
            "rss_growth_pct": 100 * (max(rss) - rss[0]) / rss[0]}


def bench_first_frame(backend, repeats):
    out = []
    for r in range(repeats):
        eng = Engine(backend, max_sessions=1)
        sess = eng.open_session(portrait(r))                         # opening excluded
        audio = speech(SPF * 4, r)
        need = SPF * (1 + backend.cfg.lookahead_frames)
        for i in range(0, need, 320):
            t0 = time.perf_counter()
            sess.push_audio(audio[i:i + 320])
            got = list(sess.frames())
        out.append((time.perf_counter() - t0) * 1e3)
        assert [f.index for f in got] == [0]
        eng.close()
    return {"first_frame_ms_each": out, "first_frame_ms": float(np.median(out))}


def plot(path, paged, concat, rec_frames, rec_exact, rec_approx):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(len(paged)), np.array(paged) * 1e3, label="paged (ours)")
    ax.plot(np.arange(len(concat)), np.array(concat) * 1e3, label="concat (naive, unbounded)")
    ax.plot(rec_frames, np.array(rec_exact) * 1e3, "o-", label="recompute, exact (L*W frames)")
    ax.plot(rec_frames, np.array(rec_approx) * 1e3, "s--", label="recompute, approx (W frames)")
    ax.set_xlabel("frame index")
    ax.set_ylabel("transformer time per frame (ms)")
    ax.set_yscale("log")
    ax.set_title("tiny preset (random init), fp32, torch CPU, 2 threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (< 60 s)")
    ap.add_argument("--json", required=True, type=Path, help="output JSON (PNG written beside it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    cfg = preset("tiny", refine=True)     # as the shipped tiny: refinement passes can be timed
    backend = TorchBackend(new_bundle(cfg, seed=0), device="cpu")
    q = args.quick
    print(f"tiny preset, RANDOM weights (untrained; timing only), fp32, torch {torch.__version__} CPU, "
          f"{torch.get_num_threads()} threads, batch-invariant step")

    sess = {n: bench_sessions(backend, n, t) for n, t in ((1, 15 if q else 60), (4, 5 if q else 25), (16, 2 if q else 10))}
    for n, r in sess.items():
        print(f"{n:2d} sessions: {r['fps_aggregate']:6.1f} fps aggregate ({r['fps_per_session']:5.1f} per session), "
              f"tick p50 {r['tick_ms_p50']:.1f} ms p99 {r['tick_ms_p99']:.1f} ms")

    guided = {n: bench_sessions(backend, n, t, guidance=DEFAULT_GUIDANCE)
              for n, t in ((1, 15 if q else 60), (16, 2 if q else 10))}
    print(f"guidance {DEFAULT_GUIDANCE:g} (the default), tick p50: " + " | ".join(
        f"{n} session{'s' * (n > 1)} {r['tick_ms_p50']:.1f} ms ({r['tick_ms_p50'] / sess[n]['tick_ms_p50']:.2f}x "
        f"unguided, {r['fps_aggregate']:.1f} fps aggregate)" for n, r in guided.items()))

    modes = {n: bench_decode_modes(backend, n, t) for n, t in ((1, 15 if q else 60), (16, 3 if q else 12))}
    print("expected-code decoding (the default) against the tokens' codes, unguided, ticked alternately, p50: "
          + " | ".join(f"{n} session{'s' * (n > 1)} {r['tick_ms_p50']['expected']:.1f} vs "
                       f"{r['tick_ms_p50']['tokens']:.1f} ms ({r['cost']:.3f}x)" for n, r in modes.items()))

    ref = {k: bench_sessions(backend, 1, 15 if q else 60, refine=k) for k in (0, 1, 2, 3)}
    print("refinement, 1 session, tick p50: " + " | ".join(
        f"K={k} {r['tick_ms_p50']:.1f} ms ({r['tick_ms_p50'] / ref[0]['tick_ms_p50']:.2f}x)" for k, r in ref.items()))

    T = 40 if q else 200
    st = Stream(cfg, T)
    paged, paged_logits = run_paged(backend, st, T)
    concat, sizes = run_concat(backend, st, T)
    LW = cfg.n_layer * cfg.window
    rec_frames = [1, 16, LW] if q else [1, 8, 16, LW, 60, 100, T - 1]
    rec_exact, rec_logits = run_recompute(backend, st, rec_frames, LW)
    rec_approx, approx_logits = run_recompute(backend, st, rec_frames, cfg.window)
    tail = slice(T // 2, T)
    paged_ms = float(np.median(paged[tail]) * 1e3)
    concat_end_ms = float(np.median(concat[-5:]) * 1e3)
    steady = [i for i, f in enumerate(rec_frames) if f >= LW]
    rec_ms = float(np.median([rec_exact[i] for i in steady]) * 1e3)
    approx_ms = float(np.median([rec_approx[i] for i in steady]) * 1e3)
    agree = {t: float((rec_logits[t].argmax(-1) == paged_logits[t].argmax(-1)).float().mean()) for t in rec_frames}
    maxdiff = max(float((rec_logits[t] - paged_logits[t]).abs().max()) for t in rec_frames)
    approx_diff = max(float((approx_logits[t] - paged_logits[t]).abs().max()) for t in rec_frames)
    print(f"per frame (transformer only), frames {T // 2}..{T - 1}: paged {paged_ms:.1f} ms | concat at frame {T} "
          f"{concat_end_ms:.1f} ms (cache {sizes[-1] / 2**20:.1f} MiB and growing; paged fixed) | recompute exact "
          f"{rec_ms:.1f} ms | recompute approx (W frames) {approx_ms:.1f} ms")
    print(f"  ratios: recompute/paged {rec_ms / paged_ms:.1f}x (target >= 10)   concat/paged "
          f"{concat_end_ms / paged_ms:.2f}x (target >= 1)   approx-recompute/paged {approx_ms / paged_ms:.1f}x")
    print(f"  exact recompute vs paged: max |logit diff| {maxdiff:.2e}, token agreement "
          f"{min(agree.values()):.3f}; approx recompute max |logit diff| {approx_diff:.2e}")

    long = bench_long(backend, q)
    print(f"step (tick) at frame 100: {long['step_ms_at_100']:.1f} ms, at 100,000: {long['step_ms_at_100k']:.1f} ms "
          f"-> ratio {long['step_ratio']:.3f} (target <= 1.1)")
    print(f"RSS over {long['rss_frames']:,} frames of the cache path: {long['rss_mb_start']:.1f} -> max "
          f"{long['rss_mb_max']:.1f} MiB, growth {long['rss_growth_pct']:.2f}% (target <= 1%)")
    ff = bench_first_frame(backend, 3 if q else 7)
    print(f"first frame after 80 ms lookahead audio: {ff['first_frame_ms']:.1f} ms median (target <= 120)")

    result = {
        "fps_1": sess[1]["fps_aggregate"], "fps_4": sess[4]["fps_aggregate"], "fps_16": sess[16]["fps_aggregate"],
        "paged_vs_recompute": rec_ms / paged_ms, "paged_vs_concat": concat_end_ms / paged_ms,
        "step_ratio_100k_vs_100": long["step_ratio"], "rss_growth_pct": long["rss_growth_pct"],
        "first_frame_ms": ff["first_frame_ms"],
        "guidance_cost": {str(n): r["tick_ms_p50"] / sess[n]["tick_ms_p50"] for n, r in guided.items()},
        "refine_cost": {str(k): r["tick_ms_p50"] / ref[0]["tick_ms_p50"] for k, r in ref.items()},
        "expected_decode_cost": {str(n): r["cost"] for n, r in modes.items()},
        "details": {
            "model": "tiny preset, random init (untrained), fp32", "backend": "torch CPU, batch-invariant",
            "threads": torch.get_num_threads(), "quick": q, "sessions": sess, "guided_sessions": guided,
            "guidance": DEFAULT_GUIDANCE, "refine": ref, "decode_modes": modes,
            "per_frame_ms": {"paged": paged_ms, "concat_at_end": concat_end_ms, "recompute_exact": rec_ms,
                             "recompute_approx_last_W": approx_ms, "paged_vs_recompute_approx": approx_ms / paged_ms},
            "paged_series_ms": [x * 1e3 for x in paged], "concat_series_ms": [x * 1e3 for x in concat],
            "concat_cache_bytes": sizes, "paged_pool_bytes_per_session": (cfg.sink_frames + cfg.window)
            * cfg.n_layer * 2 * cfg.n_head * cfg.page_tokens * cfg.head_dim * 4,
            "recompute_frames": rec_frames, "recompute_exact_ms": [x * 1e3 for x in rec_exact],
            "recompute_approx_ms": [x * 1e3 for x in rec_approx],
            "recompute_exact_token_agreement": agree, "recompute_exact_max_logit_diff": maxdiff,
            "recompute_approx_max_logit_diff": approx_diff,
            "long_stream": long, "first_frame": ff, "seconds": time.perf_counter() - t_all,
            "method": __doc__,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    png = args.json.with_suffix(".png")
    plot(png, paged, concat, rec_frames, rec_exact, rec_approx)
    print(f"wrote {args.json} and {png} ({time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
