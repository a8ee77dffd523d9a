"""The engine interface every runtime backend implements: numpy in, numpy out.

One backend serves one model configuration (``cfg``). The graphs it runs are those of
``export/onnx_export.py`` (``GRAPHS``), so an ONNX Runtime or TensorRT backend plugs in by mapping
each abstract method to one graph:

=========================  ==========================  =========================================
method                     graph                       shapes
=========================  ==========================  =========================================
``tokenize``               ``tokenizer_encode``        float32 [B,3,S,S] in [0,1] -> int64 [B,N]
``reference``              ``tokenizer_reference``     float32 [B,3,S,S] -> ref float32 [B,...]
``prefill``                ``prefill``                 int64 [B,N] -> k, v float32 [L,B,H,P,D]
``encode_audio``           ``audio_encoder``           float32 [B,R,n_mels] -> [B,A,F]
``step``                   ``step``                    the step contract of ``shared/design.md``
``decode_float``           ``tokenizer_decode``        codes float32 [B,N,d], ref -> float32 [B,3,S,S]
=========================  ==========================  =========================================

The concrete helpers here (``encode_portrait``, ``decode``, ``decode_codes``) hold the parts that
must be the same on every backend -- portrait validation/resizing, tokens to codes
(``code_table``) and the float -> uint8 conversion -- so two backends given the same graphs produce
the same pixels.
"""
from __future__ import annotations

import abc
import warnings

import numpy as np

__all__ = ["Backend", "prepare_portrait", "to_uint8_frames"]


def prepare_portrait(image, size: int) -> np.ndarray:
    """A portrait as uint8 [size, size, 3]: validated, centre-cropped to a square and resized.

    Accepts uint8 [H, W, 3] (RGB) or [H, W, 4] (alpha dropped). Another size is cropped/resized
    with a ``UserWarning`` naming both sizes; anything that is not an image raises ``ValueError``.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"portrait must be a uint8 numpy array [H, W, 3] (RGB) or an image path, "
                         f"got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"portrait must be an RGB image [H, W, 3] uint8, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"portrait must be uint8 RGB (0..255), got dtype {image.dtype}")
    image = image[..., :3]
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    warnings.warn(f"portrait is {h}x{w}; centre-cropping to a square and resizing to the model's "
                  f"{size}x{size}", UserWarning, stacklevel=3)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    from PIL import Image   # a dependency of the package; imported only when a resize is needed
    img = Image.fromarray(np.ascontiguousarray(image[top:top + s, left:left + s]))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def to_uint8_frames(images: np.ndarray) -> np.ndarray:
    """float [B,3,S,S] in [0,1] -> uint8 [B,S,S,3], rounding half up (identical on every backend)."""
    x = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)
    return np.ascontiguousarray(np.floor(x).astype(np.uint8).transpose(0, 2, 3, 1))


class Backend(abc.ABC):
    """Runs the model's graphs for a batch of sessions. Subclasses set ``cfg``, ``receptive_field``
    (mel frames per audio-encoder window) and ``name``, and implement the abstract methods.

    ``step`` is called once per engine tick for all sessions stepping at that tick; a backend with
    ``batch_invariant = True`` guarantees that a session's outputs do not depend on which other
    sessions share its batch (bit for bit), which the engine's tests check.
    """

    name: str = "abstract"
    batch_invariant: bool = False
    max_batch: int | None = None     # rows one step call takes at most (None: no limit)

    def __init__(self, cfg, receptive_field: int):
        self.cfg = cfg
        self.receptive_field = int(receptive_field)
        from eartalk.model.tokenizer import code_table
        # float32 [V, d]: token -> the code the decoder reads (its normalised FSQ digits)
        self.code_table = code_table(cfg.codebook_size).numpy()

    # ------------------------------------------------------------------ graphs
    @abc.abstractmethod
    def tokenize(self, images: np.ndarray) -> np.ndarray:
        """float32 [B,3,S,S] in [0,1] -> int64 tokens [B,N]."""

    @abc.abstractmethod
    def reference(self, portrait: np.ndarray) -> np.ndarray:
        """float32 [B,3,S,S] in [0,1] -> the decoder's reference tensor float32 [B, ...]."""

    @abc.abstractmethod
    def prefill(self, portrait_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 [B,N] -> sink page (k, v) float32 [L,B,H,P,D]."""

    @abc.abstractmethod
    def encode_audio(self, mel_window: np.ndarray) -> np.ndarray:
        """One video frame's audio tokens: float32 mel window [B,R,n_mels] -> [B,A,F]."""

    @abc.abstractmethod
    def step(self, prev_tokens: np.ndarray, audio: np.ndarray, cond: np.ndarray,
             cond_mask: np.ndarray, past_k: np.ndarray, past_v: np.ndarray,
             past_lag: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One frame for B sessions -> (logits [B,N,V], new_k, new_v [L,B,H,P,D]), all float32."""

    def refine(self, prev_tokens, audio, cond, cond_mask, past_k, past_v, past_lag, draft: np.ndarray,
               draft_known: np.ndarray) -> np.ndarray:
        """A refinement pass of the frame ``step`` just made (``runtime/refine.py``): the same inputs
        plus the frame's draft int64 [B,N] and which of it is known, bool [B,N] -> logits [B,N,V].
        Only backends that run the model with a draft input implement it."""
        raise NotImplementedError(f"the {self.name} backend cannot run refinement passes")

    def refine_blocker(self) -> str | None:
        """Why refinement passes cannot run here, or None when they can."""
        if not self.cfg.refine:
            return "this model was not trained to refine (its config has refine=false)"
        if type(self).refine is Backend.refine:
            return f"the {self.name} backend cannot run refinement passes (use the torch or onnxruntime backend)"
        return None

    @property
    def can_refine(self) -> bool:
        """The model was trained to refine (``cfg.refine``) and this backend runs refinement passes."""
        return self.refine_blocker() is None

    @abc.abstractmethod
    def decode_float(self, codes: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """codes float32 [B,N,d] (rows of ``code_table``, or their expectation) + ref [B,...] ->
        float32 images [B,3,S,S] in [0,1]."""

    # ------------------------------------------------------------------ shared helpers
    def encode_portrait(self, image) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [H,W,3] portrait -> (tokens int64 [N], ref float32 [...]) for one session."""
        img = prepare_portrait(image, self.cfg.image_size)
        x = (img.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
        x = np.ascontiguousarray(x)
        return self.tokenize(x)[0].astype(np.int64), np.asarray(self.reference(x)[0], np.float32)

    def codes_of(self, tokens: np.ndarray) -> np.ndarray:
        """int64 tokens [B,N] -> their codes float32 [B,N,d] (what ``decode_float`` reads)."""
        tokens = np.asarray(tokens)
        V = self.cfg.codebook_size
        if tokens.ndim != 2 or tokens.shape[1] != self.cfg.tokens_per_frame:
            raise ValueError(f"decode tokens must be int64 [B, {self.cfg.tokens_per_frame}], "
                             f"got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.size and (tokens.min() < 0 or tokens.max() >= V):
            raise ValueError(f"decode tokens must be integers in [0, {V}), got dtype {tokens.dtype}"
                             + (f", range [{tokens.min()}, {tokens.max()}]" if tokens.size else ""))
        return self.code_table[tokens]

    def decode(self, tokens: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """int64 [B,N] + ref [B,...] -> uint8 RGB frames [B,S,S,3]."""
        return self.decode_codes(self.codes_of(tokens), ref)

    def decode_codes(self, codes: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """codes float32 [B,N,d] + ref [B,...] -> uint8 RGB frames [B,S,S,3]."""
        codes = np.asarray(codes)
        want = (self.cfg.tokens_per_frame, self.code_table.shape[1])
        if codes.ndim != 3 or codes.shape[1:] != want:
            raise ValueError(f"decode codes must be float32 [B, {want[0]}, {want[1]}], got shape {codes.shape}")
        return to_uint8_frames(self.decode_float(np.ascontiguousarray(codes, np.float32), ref))

    def close(self) -> None:
        """Release engine resources (no-op by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_invariant={self.batch_invariant})"
