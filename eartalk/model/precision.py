"""Training precision: whether this CPU runs bf16 matmuls in hardware, and the autocast both training
stages use where it does (inference and the exported graphs stay float32)."""
from __future__ import annotations

import torch


def bf16_native() -> bool:
    """Whether this CPU does bf16 matmuls in hardware (AVX-512 BF16 or AMX). Elsewhere (AVX2, e.g. an
    AMD Zen 3) torch emulates them: a training step measured 110 s under bf16 autocast against
    11 s in float32, so autocast is only worth turning on where this is true."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_bf16(bf16: bool | None) -> bool:
    """A training stage's ``bf16`` argument: as given, or where the CPU has native bf16 when None."""
    return bf16_native() if bf16 is None else bf16


def train_autocast(enabled: bool):
    """bf16 autocast of a training forward, only while gradients are on (validation, under
    ``no_grad``, measures the float32 model that is shipped)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and torch.is_grad_enabled())
