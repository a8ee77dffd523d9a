"""`eartalk generate`: one portrait + one speech file (+ a controls timeline) -> an mp4."""
from __future__ import annotations

from pathlib import Path

HELP = "make a talking-head mp4 from a portrait and a speech file (offline)"
DESCRIPTION = """Make a talking-head video offline: the portrait speaks the audio file.

The mp4 (H.264 + AAC, 25 fps) has exactly ceil(duration x 25) frames and the input speech muxed
in. --audio takes any file eartalk can decode (wav, flac, ogg, mp3, m4a, the audio of an mp4, ...);
it is resampled to 16 kHz mono. A portrait that is not square or not the model's size is
centre-cropped and resized (a notice says so).

--controls timeline.json pins or frees controls at any moment, in seconds ("t") or frames ("frame");
null frees a control (the model picks it again):
  {"events": [{"t": 0, "emotion": "happy"}, {"t": 1.5, "yaw": 10, "blink": 0},
              {"frame": 80, "yaw": null, "blink": null}]}
Controls: yaw [-30, 30], pitch [-20, 20], roll [-15, 15] (degrees), gaze_x, gaze_y [-1, 1],
blink [0, 1], emotion (neutral, happy, sad, angry, surprised).

--model takes a preset name (default tiny: needs the trained default model) or a bundle directory
(model.json + model.safetensors; a bundle whose hash or config does not match is refused).
--random-init runs an untrained preset (for testing: frames are not a face).
--backend onnxruntime runs the graphs of `eartalk export onnx` (--onnx-dir); with --precision int8
(or fp8) the step and decoder graphs calibrated by `eartalk calibrate quantize` in that folder.

example: eartalk generate --portrait me.png --audio speech.wav --out talk.mp4 --controls timeline.json"""


from eartalk.commands.model_options import add_model_options, apply_threads


def add_arguments(p):
    p.add_argument("--portrait", required=True, type=Path, help="portrait image (png/jpg)")
    p.add_argument("--audio", required=True, type=Path, help="speech file (any format load_audio reads)")
    p.add_argument("--out", required=True, type=Path, help="output .mp4")
    p.add_argument("--controls", type=Path, default=None, help="controls timeline JSON (see above)")
    add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    apply_threads(args)
    from eartalk.generate import generate
    res = generate(args.portrait, args.audio, args.out, controls=args.controls, model=args.model,
                   random_init=args.random_init, backend=args.backend, seed=args.seed,
                   onnx_dir=args.onnx_dir, progress=not args.quiet, precision=args.precision,
                   refine=args.refine, guidance=args.guidance, decode=args.decode)
    print(f"wrote {res.out} ({res.frames} frames, {res.duration_s:.2f} s of audio) in {res.seconds:.1f} s "
          f"({res.frames / max(res.seconds, 1e-9):.1f} fps)")
    return 0
