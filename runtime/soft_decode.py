"""Expected-code decoding: the frame shown is decoded from each cell's expected code under the
step's distribution, not from the token picked for it.

A token is a code of FSQ digits (``eartalk.model.tokenizer.code_table``): ordered levels per
channel, so the probability-weighted mean of the codes is a point of the same space the decoder
reads, between the codes the transformer hesitates over. Where the transformer is sure, it is the
picked token's code; where it hesitates (two mouth openings, a blink half-way), the decoder gets
the middle instead of a guess that may be the wrong one. The token picked (argmax or sampled) is
still what the next step reads and what the cache holds: the stream's history is unchanged.

Measured on the shipped ``tiny`` (docs/model-history.md, session 25; `eartalk eval`, 30 test clips,
5,685 frames, the two runs differing only in this): PSNR 23.27 -> 23.44 dB, SSIM 0.867 -> 0.870,
viseme accuracy 0.510 -> 0.531, mouth-openness r 0.876 -> 0.883, yaw MAE 1.38 -> 1.28 deg, blink
on the next frame 0.778 -> 0.812, emotion 42.5% -> 42.2%. A softmax temperature of 2 gave the
same PSNR and less emotion on 10 clips, 4 less of both: the plain softmax (1) is the default.
It costs 0.05 ms a session and frame on the host (``bench/runtime.py``: ticked alternately with an
engine decoding the tokens' codes, 0.98x the tick for one session, 1.04x for 16).

``Engine`` picks per session (``decode="expected"``, the default, or ``"tokens"``, the frame of its
tokens as before); this module holds the arithmetic.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DECODE_MODES", "DEFAULT_DECODE", "check_decode", "expected_codes"]

DECODE_MODES = ("expected", "tokens")
DEFAULT_DECODE = "expected"


def check_decode(decode) -> str:
    """``decode`` as one of :data:`DECODE_MODES` (None = the default), or ValueError listing them."""
    decode = DEFAULT_DECODE if decode is None else decode
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {list(DECODE_MODES)} ('expected': each cell's code averaged "
                         f"under the step's probabilities, the default; 'tokens': the picked tokens' codes), "
                         f"got {decode!r}")
    return decode


def expected_codes(logits: np.ndarray, table: np.ndarray) -> np.ndarray:
    """logits ``[..., N, V]`` and the code table ``[V, d]`` -> the expected codes ``[..., N, d]``
    under ``softmax(logits)``, float32 (shifted by the row max: no overflow; within 1e-6 of a
    float64 softmax, at a sixth of its time: 0.06 ms a frame for tiny)."""
    logits, table = np.asarray(logits, np.float32), np.asarray(table, np.float32)
    if logits.shape[-1] != table.shape[0]:
        raise ValueError(f"logits have {logits.shape[-1]} codes in their last axis; the code table has {table.shape[0]}")
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ table
