"""Numerics that must not follow autocast, and whether the CPU has native bf16 (the autocast of
``trainer.precision`` is :func:`gcnee.llm.load_plan.autocast_of`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def float32_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32 whatever autocast is active: ``(..., in)`` ->
    ``(..., out)`` float32.

    Answer logits are read from this. Under bf16 autocast a bf16 output head rounds logits of
    ~15 to steps of 1/16, so P(yes) took ~16 distinct values over 2,000 prompts (ties that blunt
    AUC). The heads are a few rows, or one position's vocabulary: float32 costs nothing.
    """
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX); None: unknown."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return None
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
