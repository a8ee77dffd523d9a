"""The one model configuration shared by the tokenizer, the audio encoder and the transformer.

Derived sizes (tokens per frame, page size, cache capacity) are computed in ``__post_init__`` so
that the step contract of ``shared/design.md`` is fixed by a handful of primary numbers. Named
presets live in ``PRESETS``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# Controls entering as Frame-Condition-In-Context tokens: one token per control kind.
# Each kind has a fixed slice of the Dc-wide condition vector (values), see ``COND_LAYOUT``.
CONTROL_KINDS = ("pose", "gaze", "blink", "emotion")
EMOTIONS = ("neutral", "happy", "sad", "angry", "surprised")
# name -> (kind, index inside the condition vector, valid range)
CONTROLS = {
    "yaw": ("pose", 0, (-30.0, 30.0)),      # degrees
    "pitch": ("pose", 1, (-20.0, 20.0)),    # degrees
    "roll": ("pose", 2, (-15.0, 15.0)),     # degrees
    "gaze_x": ("gaze", 3, (-1.0, 1.0)),     # fraction of the eye's free travel, + = right
    "gaze_y": ("gaze", 4, (-1.0, 1.0)),     # + = down
    "blink": ("blink", 5, (0.0, 1.0)),      # eyelid closure, 1 = closed
    "emotion": ("emotion", 6, EMOTIONS),    # one-hot in slots 6..10
}
COND_DIM = 16  # Dc: values in slots 0..10, kind one-hot in slots 12..15


@dataclass
class ModelConfig:
    # video / tokenizer
    image_size: int = 128
    # tokens per side: N = token_grid**2. 4x4 (a step ~1/3.5 of the work) was tried on
    # 2026-12-04: its tokenizer reached only 19.2 dB held-out at step 1,500 (8x8: 22.4).
    token_grid: int = 8
    codebook_size: int = 512       # V
    # Frame codes: the last k cells of the token grid (row-major: the bottom-right corner, which is
    # background) carry one code each for the whole frame instead of their 16x16 pixels; the decoder
    # adds them at every scale. Why: emotion (blush, smile folds, brows, lids) spreads over many
    # cells, and with 3 FSQ digits per cell the codes never carried it (session 18: an MLP on the
    # codes named test frames' emotion 38% of the time). 0 = off, as every bundle before 2026-12-05.
    frame_codes: int = 0
    # The decoder warps the portrait by a learned flow (a coarse flow at the token grid, a fine
    # one at S/4) before fusing it and blending it with generated colour. False: the portrait's
    # features and pixels are fused unwarped and the decoder paints every departure itself. Why:
    # session 23 (2026-12-05), 1,500 equal steps on the full corpus, probe on 10 test clips'
    # reconstructions: without the warp 23.46 dB held-out against 22.67, visemes 0.28 against
    # 0.11, emotion 50% against 19%, and 10% less time a step (docs/model-history.md). But the
    # whole tiny recipe without it (session 24) made a worse model, so every bundle warps (True).
    warp: bool = True
    # A tail of this many channels after the decoder's blend: three 3x3 convs at S/2 (2x2 pixels
    # packed per position) that see the blended frame, the (warped) portrait, the generated colour
    # and the mask, and add a correction (the last conv starts at zero, so a new tail starts as the
    # decoder without one). Why: the decoder works at S/4 and unpacks 4x4 pixels per cell with a
    # 1x1 conv, and its reconstructions blur what moved a few pixels (brows, nose lines, lip line)
    # into 16-pixel blocks. Measured (session 40): 32 channels cost 1.4x a step and learnt no faster
    # per step, so the 25-minute tokenizer stage ended 0.6-1.0 dB lower. 0 = off, as every bundle.
    pixel_tail: int = 0
    # audio
    sample_rate: int = 16000
    fps: int = 25
    n_mels: int = 80
    mel_hop: int = 160             # 10 ms
    audio_tokens: int = 2          # A per frame
    audio_dim: int = 128           # F
    lookahead_frames: int = 2      # video frames of audio lookahead (80 ms)
    # transformer
    n_layer: int = 4
    # 2 heads (d_model 128): a training step is 2.5x cheaper than with 4 (5.1 -> 2.1 s on the
    # 2-core AVX2 machine), so the 90-minute recipe sees 2.5x the frames.
    n_head: int = 2
    head_dim: int = 64
    window: int = 8                # W: recent frames attended
    sink_frames: int = 1           # pinned portrait frames
    cond_tokens: int = len(CONTROL_KINDS)  # C
    cond_dim: int = COND_DIM       # Dc
    max_batch: int = 16
    # Few-step refinement: the query slots can also read a draft of the frame's own tokens (some
    # known, the rest to predict), trained MaskGIT-style (train_gpt.draft_mask). Off: the model
    # predicts every token in one pass only, as every bundle before 2026-12-04 (session 16) did.
    refine: bool = False
    # derived (filled in __post_init__)
    tokens_per_frame: int = field(init=False)   # N
    page_tokens: int = field(init=False)        # P = C + A + N: K/V appended per step
    cache_tokens: int = field(init=False)       # S = sink pages * P + W * P
    d_model: int = field(init=False)
    samples_per_frame: int = field(init=False)  # 640 at 16 kHz, 25 fps
    mels_per_frame: int = field(init=False)

    def __post_init__(self):
        assert self.image_size % 16 == 0, "image_size must be a multiple of 16"
        assert self.sample_rate % self.fps == 0
        self.tokens_per_frame = self.token_grid ** 2
        assert 0 <= self.frame_codes < self.tokens_per_frame, \
            f"frame_codes={self.frame_codes}: expected 0 .. {self.tokens_per_frame - 1}"
        assert self.pixel_tail >= 0, f"pixel_tail={self.pixel_tail}: expected 0 (off) or a channel count"
        self.page_tokens = self.cond_tokens + self.audio_tokens + self.tokens_per_frame
        self.cache_tokens = (self.sink_frames + self.window) * self.page_tokens
        self.d_model = self.n_head * self.head_dim
        self.samples_per_frame = self.sample_rate // self.fps
        assert self.samples_per_frame % self.mel_hop == 0
        self.mels_per_frame = self.samples_per_frame // self.mel_hop

    # ---- serialisation (the derived fields are recomputed, never trusted from disk)
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name, default in _LATER_FIELDS.items():   # older bundles' configs stay equal
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model config has unknown fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Fields added after bundles had shipped, with the value that means "as before": left out of
# to_dict at that value, so the configs of earlier bundles and exports still compare equal.
_LATER_FIELDS = {"frame_codes": 0, "warp": True, "pixel_tail": 0}

PRESETS: dict[str, dict] = {
    "tiny": dict(),
    # 4x the KV bytes of tiny: used by the kernel bandwidth estimates.
    "small": dict(n_layer=8, n_head=8, head_dim=64),
    # for fast unit tests
    "test": dict(image_size=32, token_grid=2, codebook_size=16, n_layer=2, n_head=2, head_dim=8,
                 window=3, audio_dim=16, max_batch=4),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
