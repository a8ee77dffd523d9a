"""Analytic cost of the paged KV cache kernels per model step: bytes moved, FLOPs, and the time a
roofline implies on Jetson Orin and RTX 4090.

    python bench/kernels.py --json OUT.json [--host-timing]

EVERYTHING UNDER "estimates" IS AN ANALYTIC ESTIMATE, NOT A MEASUREMENT: no GPU was used.
time = max(bytes / memory bandwidth, FLOPs / peak FLOP rate), per kernel, per step (all layers).
The optional --host-timing figure is a CPU timing of the g++ host build of the same kernel
bodies (one thread walking the grid); it says nothing about GPU speed and is labelled as such.

What is counted (one step = one frame for B sessions; S = (sinks + W) * P cached tokens):
- append: read new_k/new_v [L,B,H,P,D], write them into the pool.
- gather: read the valid pool tokens, write past_k/past_v [L,B,H,S,D] and past_lag [B,S].
- paged_attention (L launches, one per layer): Q = P + N queries per step (the step's own tokens
  plus N query slots, design.md "step contract"); K/V of S tokens read once per query block of
  QBLK queries (the kernel as written has no cross-block reuse; "bytes_min" assumes perfect L2
  reuse); q read and out/lse written in fp32. FLOPs = 4*Q*S*D (QK and PV) + ~5*Q*S (bias, max,
  exp, sum) per (session, head, layer), executed as fp32 FMA on CUDA cores (no tensor cores), so
  the fp32 peak is the right compute roof.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from eartalk.model.config import preset

# Assumed device peaks (public spec-sheet numbers).
DEVICES = {
    "jetson_orin": {
        "name": "Jetson AGX Orin 64GB (sm_87)",
        "mem_bw_GBps": 204.8,
        "fp32_TFLOPS": 5.3,   # 2048 CUDA cores x 1.3 GHz x 2 (FMA)
        "fp8": False,         # compute capability 8.7 < 8.9: fp8 KV refused
    },
    "rtx_4090": {
        "name": "GeForce RTX 4090 (sm_89)",
        "mem_bw_GBps": 1008.0,
        "fp32_TFLOPS": 82.6,  # 16384 CUDA cores x 2.52 GHz boost x 2
        "fp8": True,
    },
}
KV_DTYPES = {"float16": 2, "float8_e4m3fn": 1}
QBLK = {64: 64, 128: 32}       # threads (= queries) per attention block (kv_cache.cuh AttnShape)
FRAME_MS = 40.0                # 25 fps


def kernel_costs(cfg, batch: int, elem: int) -> dict[str, dict[str, float]]:
    """Bytes and FLOPs per step (all layers) of each kernel for one config and batch."""
    assert batch >= 1 and elem in (1, 2, 4), (batch, elem)
    L, H, D, P, N = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.page_tokens, cfg.tokens_per_frame
    assert D <= 128, f"head_dim {D} has no attention kernel instance"
    S = cfg.cache_tokens
    Q = P + N
    page_kv = L * 2 * H * P * D * elem               # one page, K and V, all layers
    append = {"bytes": 2 * batch * page_kv, "flops": 0.0}
    kv_read = 2 * L * batch * H * S * D * elem
    gather = {"bytes": 2 * kv_read + batch * S * 4, "flops": 0.0}
    qblocks = math.ceil(Q / QBLK[64 if D <= 64 else 128])
    q_io = L * batch * H * Q * (2 * D * 4 + 4)        # q in, out and lse out, fp32
    table = batch * (cfg.sink_frames + cfg.window) * 12 + (batch + 1) * 4
    attn = {
        "bytes": qblocks * kv_read + q_io + L * table,
        "bytes_min": kv_read + q_io + L * table,
        "flops": float(L * batch * H * (4 * Q * S * D + 5 * Q * S)),
        "queries_per_step": Q,
        "query_blocks": qblocks,
    }
    return {"append": append, "gather": gather, "paged_attention": attn}


def roofline_us(bytes_: float, flops: float, dev: dict) -> dict[str, float | str]:
    t_mem = bytes_ / (dev["mem_bw_GBps"] * 1e9)
    t_fl = flops / (dev["fp32_TFLOPS"] * 1e12)
    t = max(t_mem, t_fl)
    return {"est_us": round(t * 1e6, 3), "bound": "memory" if t_mem >= t_fl else "compute",
            "frame_budget_pct": round(100 * t * 1e3 / FRAME_MS, 4)}


def estimates() -> list[dict]:
    rows = []
    for name in ("tiny", "small"):
        cfg = preset(name)
        for batch in (1, 16):
            for kv_dtype, elem in KV_DTYPES.items():
                for kernel, c in kernel_costs(cfg, batch, elem).items():
                    if kv_dtype == "float8_e4m3fn" and kernel != "paged_attention":
                        continue  # fp8 pools only change attention's dequantising reads here
                    row = {"preset": name, "batch": batch, "kv_dtype": kv_dtype,
                           "kernel": kernel, **c, "devices": {}}
                    for key, dev in DEVICES.items():
                        if kv_dtype == "float8_e4m3fn" and not dev["fp8"]:
                            row["devices"][key] = {"est_us": None, "bound": "n/a: no fp8 (cc < 8.9)"}
                        else:
                            row["devices"][key] = roofline_us(c["bytes"], c["flops"], dev)
                    rows.append(row)
    return rows


def host_timing(repeats: int = 3) -> dict:
    """CPU timing of the g++ host build on the tiny preset, batch 1, fp32 pool."""
    import numpy as np

    from eartalk.runtime import cuda_kernels as ck
    cfg = preset("tiny")
    hk = ck.HostKernels(ck.build_host_library(debug=False))
    L, H, P, D, W, sinks = cfg.n_layer, cfg.n_head, cfg.page_tokens, cfg.head_dim, cfg.window, cfg.sink_frames
    per = sinks + W
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((per + 2, L, 2, H, P, D)).astype(np.float32)
    indptr = np.array([0, per], np.int32)
    ids = rng.permutation(per + 2)[:per].astype(np.int32)
    lag = np.array([-1] * sinks + list(range(W, 0, -1)), np.int32)
    valid = np.full(per, P, np.int32)
    q = rng.standard_normal((1, H, P + cfg.tokens_per_frame, D)).astype(np.float32)
    bias = np.zeros((H, W + 2), np.float32)
    new = rng.standard_normal((L, 1, H, P, D)).astype(np.float32)
    ops = {
        "append": lambda: hk.append(pool, ids[-1:].copy(), new, new),
        "gather": lambda: hk.gather(pool, indptr, ids, lag, valid, per),
        "paged_attention": lambda: [hk.paged_attention(q, pool, l, indptr, ids, lag, valid, bias, 0.125)
                                    for l in range(L)],
    }
    out = {}
    for name, fn in ops.items():
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(best * 1e3, 3)
    return {"label": "CPU host-build timing (g++ -O2, one thread walking the CUDA grid, tiny preset, "
                     "batch 1, fp32 pool, all layers). NOT a GPU figure.",
            "best_of": repeats, "ms": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--host-timing", action="store_true",
                    help="also time the CPU host build (labelled as such; not a GPU figure)")
    args = ap.parse_args(argv)
    result = {
        "kind": "ANALYTIC ROOFLINE ESTIMATES - not measurements; no GPU was used",
        "model": "time = max(bytes / mem_bw, flops / fp32_peak) per kernel per step (all layers)",
        "devices": DEVICES,
        "presets": {n: {k: getattr(preset(n), k) for k in ("n_layer", "n_head", "head_dim",
                                                          "page_tokens", "cache_tokens", "window",
                                                          "sink_frames", "tokens_per_frame")}
                    for n in ("tiny", "small")},
        "estimates": estimates(),
    }
    if args.host_timing:
        result["cpu_host_build_timing"] = host_timing()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"# {result['kind']}")
    print(f"{'preset':6} {'B':>3} {'kv':14} {'kernel':16} {'MB':>9} {'MFLOP':>9} "
          f"{'Orin us':>9} {'4090 us':>9}")
    for r in result["estimates"]:
        o, g = r["devices"]["jetson_orin"]["est_us"], r["devices"]["rtx_4090"]["est_us"]
        print(f"{r['preset']:6} {r['batch']:>3} {r['kv_dtype']:14} {r['kernel']:16} "
              f"{r['bytes'] / 1e6:9.3f} {r['flops'] / 1e6:9.1f} "
              f"{'n/a' if o is None else f'{o:9.2f}':>9} {g:9.2f}")
    if args.host_timing:
        t = result["cpu_host_build_timing"]
        print(f"# {t['label']}: {t['ms']} ms")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
