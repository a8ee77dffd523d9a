"""`eartalk stream`: drive a streaming session from an audio file or live PCM on stdin."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from eartalk.controls_timeline import apply_timeline, load_timeline

HELP = "stream a talking head from an audio file or live PCM on stdin (mp4 or raw RGB out)"
DESCRIPTION = """Stream a talking head: one portrait plus speech in, frames out as soon as their audio
(with 80 ms lookahead) has arrived.

--audio FILE decodes any audio file (resampled to 16 kHz mono); --audio - reads raw PCM, s16le
16 kHz mono, from stdin and always runs live. --realtime feeds a file at wall-clock speed (20 ms
chunks) and paces output to 25 fps. --out OUT.mp4 writes H.264 with the audio muxed in; OUT.rgb
writes raw RGB24 frames (S*S*3 bytes each). Live stats go to stderr: fps, per-frame latency (from
the audio chunk that made a frame computable to the frame), and first-frame latency (from the chunk
completing the first 120 ms = frame 0 + 80 ms lookahead). Ctrl-C stops and keeps what was written.

--controls timeline.json: {"events": [{"t": 1.5, "yaw": 10, "emotion": "happy"},
                                      {"frame": 80, "blink": null}]}
Each event sets controls from its time ("t", seconds) or frame; null releases a control (free).

--backend onnxruntime --onnx-dir DIR runs the exported graphs; --precision int8 (or fp8) runs the step
and decoder graphs calibrated by `eartalk calibrate quantize` in DIR.

example: eartalk stream --portrait me.png --audio speech.wav --out out.mp4 --random-init"""

CHUNK_MS = 20


from eartalk.commands.model_options import add_model_options, apply_threads


def add_arguments(p):
    p.add_argument("--portrait", required=True, type=Path, help="portrait image (png/jpg)")
    p.add_argument("--audio", required=True, help="audio file, or - for raw s16le 16 kHz mono PCM on stdin")
    p.add_argument("--controls", type=Path, default=None, help="controls timeline JSON (see above)")
    p.add_argument("--out", type=Path, default=None, help="OUT.mp4 (with audio) or OUT.rgb (raw RGB24)")
    add_model_options(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = argmax (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--realtime", action="store_true", help="feed a file in real time and pace output to 25 fps")
    p.add_argument("--quiet", action="store_true", help="no live stats line")


class _Sink:
    """Where frames go: Mp4Writer (audio muxed), a raw RGB file, or nowhere."""

    def __init__(self, out: Path | None, size: int, fps: int, rate: int):
        self.mp4 = self.raw = None
        self.frames = 0
        if out is None:
            return
        if out.suffix.lower() == ".mp4":
            from eartalk.data.video_io import Mp4Writer
            self.mp4 = Mp4Writer(out, fps=fps, size=size, audio_rate=rate)
        elif out.suffix.lower() == ".rgb":
            self.raw = open(out, "wb")
        else:
            raise ValueError(f"--out {out}: expected a .mp4 or .rgb file name")

    def audio(self, pcm: np.ndarray) -> None:
        if self.mp4 is not None and pcm.size:
            self.mp4.write_audio(pcm)

    def frame(self, image: np.ndarray) -> None:
        self.frames += 1
        if self.mp4 is not None:
            self.mp4.write(image)
        elif self.raw is not None:
            self.raw.write(np.ascontiguousarray(image).tobytes())
            self.raw.flush()

    def close(self) -> None:
        if self.mp4 is not None and self.mp4.n_frames:
            self.mp4.close()
        elif self.mp4 is not None:
            self.mp4.abort()
        if self.raw is not None:
            self.raw.close()


def _chunks_from_file(path: str, spc: int, realtime: bool, rate: int):
    from eartalk.data.audio_io import load_audio
    audio = load_audio(path, rate)
    t0 = time.perf_counter()
    for i in range(0, audio.size, spc):
        if realtime:
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield audio[i:i + spc]


def _chunks_from_stdin(spc: int):
    buf = sys.stdin.buffer
    carry = b""
    while True:
        data = buf.read(2 * spc)
        if not data:
            break
        data = carry + data
        n = len(data) // 2 * 2
        carry = data[n:]
        if n:
            yield np.frombuffer(data[:n], dtype="<i2").astype(np.int16)


def run(args) -> int:
    from eartalk.runtime import make_backend, Engine

    apply_threads(args)
    live = args.audio == "-"
    if not live and not Path(args.audio).is_file():
        raise FileNotFoundError(f"audio file not found: {args.audio}")
    kind = getattr(args, "backend", "torch")
    opts = {"onnx_dir": args.onnx_dir} if kind == "onnxruntime" else {}
    backend = make_backend(args.model, kind, random_init=args.random_init, seed=args.seed,
                           precision=getattr(args, "precision", "fp32"), **opts)
    cfg = backend.cfg
    timeline = load_timeline(args.controls, cfg.fps) if args.controls else []
    if args.random_init:
        print(f"note: model {args.model!r} is randomly initialised (--random-init): frames are not a face",
              file=sys.stderr)
    engine = Engine(backend, max_sessions=1)
    session = engine.open_session(args.portrait, realtime=args.realtime or live, seed=args.seed,
                                  temperature=args.temperature, top_k=args.top_k, refine=args.refine,
                                  guidance=args.guidance, decode=args.decode)
    apply_timeline(session, timeline)
    spc = cfg.sample_rate * CHUNK_MS // 1000
    chunks = _chunks_from_stdin(spc) if live else _chunks_from_file(args.audio, spc, args.realtime, cfg.sample_rate)
    sink = _Sink(args.out, cfg.image_size, cfg.fps, cfg.sample_rate)
    ready_at: dict[int, float] = {}          # frame index -> time its audio became available
    lat: list[float] = []
    first_ms = None
    t_start = time.perf_counter()
    last_print = t_start
    status = 0

    def drain():
        nonlocal first_ms, last_print
        for f in session.frames():
            now = time.perf_counter()
            sink.frame(f.image)
            lat.append((now - ready_at.pop(f.index, now)) * 1e3)
            if f.index == 0:
                first_ms = lat[-1]
            if not args.quiet and now - last_print > 1.0:
                last_print = now
                fps = sink.frames / (now - t_start)
                print(f"\rframe {f.index:6d}  {fps:5.1f} fps  latency p50 {np.median(lat):6.1f} ms  "
                      f"first {first_ms:6.1f} ms", end="", file=sys.stderr, flush=True)

    try:
        for chunk in chunks:
            before = session.frame_index + session.frames_pending
            session.push_audio(chunk)
            sink.audio(chunk if chunk.dtype == np.float32 else chunk.astype(np.float32) / 32768.0)
            now = time.perf_counter()
            for i in range(before, session.frame_index + session.frames_pending):
                ready_at[i] = now
            drain()
        before = session.frame_index + session.frames_pending
        session.flush()
        now = time.perf_counter()
        for i in range(before, session.frame_index + session.frames_pending):
            ready_at[i] = now
        drain()
    except KeyboardInterrupt:
        print("\ninterrupted: keeping what was written", file=sys.stderr)
        status = 130
    finally:
        sink.close()
        session.close()
        engine.close()
    wall = time.perf_counter() - t_start
    if lat:
        print(f"\n{sink.frames} frames in {wall:.2f} s ({sink.frames / wall:.1f} fps); per-frame latency "
              f"p50 {np.percentile(lat, 50):.1f} ms p99 {np.percentile(lat, 99):.1f} ms; first frame "
              f"{first_ms:.1f} ms after the first {cfg.lookahead_frames * 1000 // cfg.fps} ms of lookahead audio"
              + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    else:
        print("no frames (no audio?)", file=sys.stderr)
    return status
