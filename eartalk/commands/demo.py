"""`eartalk demo`: the main job on the embedded defaults."""
from __future__ import annotations

import sys
from pathlib import Path

HELP = "render the demo video (eartalk-demo.mp4) from the bundled defaults"
DESCRIPTION = """Render the demo video eartalk-demo.mp4 (H.264 + AAC, 25 fps); nothing is downloaded.

With the trained default model (tiny) installed, the sample portrait speaks the sample sentence
through the model. Both samples are made on the spot, deterministically: the portrait by the
synthetic corpus's face renderer, the speech by eSpeak NG (--seed picks the face and sentence).
Until the default model is trained, the demo says so in one line and renders the synthetic clip
itself (renderer + eSpeak), at --size pixels.

example: eartalk demo --out eartalk-demo.mp4 --seed 1"""


def add_arguments(p):
    p.add_argument("--out", type=Path, default=Path("eartalk-demo.mp4"), help="output mp4 (default eartalk-demo.mp4)")
    p.add_argument("--seed", type=int, default=1, help="which synthetic face and sentence (default 1)")
    p.add_argument("--size", type=int, default=256,
                   help="frame size of the synthetic render, a multiple of 16 (default 256; the model "
                        "renders at its own size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _default_backend():
    """The trained default model on the torch backend; ModelNotTrainedError if it is not shipped."""
    from eartalk.runtime import load_model
    from eartalk.runtime.torch_backend import TorchBackend
    return TorchBackend(load_model("tiny"))


def _plan(seed: int):
    from eartalk.data import synth
    from eartalk.data.speech import VOICES
    assignment = {"identities": {s: [0] for s in synth.SPLITS}, "voices": {s: [VOICES[0]] for s in synth.SPLITS}}
    return synth.plan_clip(0, seed, assignment)


def sample_inputs(seed: int, size: int):
    """The sample portrait (uint8 [size, size, 3], neutral face), speech (16 kHz float32) and text."""
    from eartalk.data import face, synth
    plan = _plan(seed)
    utt = synth.speak(plan)
    portrait = face.render_portrait(synth.make_identity(seed, plan.identity_id), size=size)
    return portrait, utt.audio.astype("float32"), utt.text


def _model_demo(backend, args) -> int:
    from eartalk.generate import render
    portrait, audio, text = sample_inputs(args.seed, backend.cfg.image_size)
    try:
        res = render(backend, portrait, audio, args.out, seed=args.seed, progress=not args.quiet)
    finally:
        backend.close()
    print(f"demo: the default model made {res.frames} frames ({res.duration_s:.1f} s) saying {text!r} "
          f"in {res.seconds:.1f} s")
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def _synthetic_demo(args) -> int:
    import time

    from eartalk.data import synth
    from eartalk.data.video_io import write_mp4
    synth.validate_args(args.out.parent if str(args.out.parent) else Path("."), 1, args.size, None)
    t0 = time.time()
    frames, audio, _, meta = synth.render_clip(_plan(args.seed), args.seed, args.size)
    write_mp4(args.out, frames, audio=audio, fps=synth.FPS, sample_rate=synth.SAMPLE_RATE)
    print(f"demo: {len(frames)} frames ({meta['duration_s']:.1f} s) saying {meta['text']!r} "
          f"in {time.time() - t0:.1f} s")
    print(f"wrote {args.out.resolve()}")
    return 0


def run(args) -> int:
    from eartalk.runtime import ModelNotTrainedError
    try:
        backend = _default_backend()
    except ModelNotTrainedError:
        print("note: the default model is not trained yet (`eartalk train --recipe tiny`); rendering the "
              "synthetic face renderer instead", file=sys.stderr)
        return _synthetic_demo(args)
    return _model_demo(backend, args)
