"""`eartalk demo`: the main job on the embedded defaults."""
from __future__ import annotations

from pathlib import Path

HELP = "render the demo video (eartalk-demo.mp4) from the bundled defaults"
DESCRIPTION = """Render the demo: one synthetic talking-face clip with its speech, written to
eartalk-demo.mp4 (H.264 + AAC, 25 fps). Until the trained default model ships, this renders the
synthetic corpus's own renderer and eSpeak NG speech; nothing is downloaded."""


def add_arguments(p):
    p.add_argument("--out", type=Path, default=Path("eartalk-demo.mp4"), help="output mp4 (default eartalk-demo.mp4)")
    p.add_argument("--seed", type=int, default=1, help="which synthetic face and sentence (default 1)")
    p.add_argument("--size", type=int, default=256, help="frame size, a multiple of 16 (default 256)")


def run(args) -> int:
    import time

    from eartalk.data import synth
    from eartalk.data.speech import VOICES
    from eartalk.data.video_io import write_mp4
    synth.validate_args(args.out.parent if str(args.out.parent) else Path("."), 1, args.size, None)
    t0 = time.time()
    assignment = {"identities": {s: [0] for s in synth.SPLITS}, "voices": {s: [VOICES[0]] for s in synth.SPLITS}}
    plan = synth.plan_clip(0, args.seed, assignment)
    frames, audio, _, meta = synth.render_clip(plan, args.seed, args.size)
    write_mp4(args.out, frames, audio=audio, fps=synth.FPS, sample_rate=synth.SAMPLE_RATE)
    print(f"demo: {len(frames)} frames ({meta['duration_s']:.1f} s) saying {meta['text']!r} "
          f"in {time.time() - t0:.1f} s")
    print(f"wrote {args.out.resolve()}")
    return 0
