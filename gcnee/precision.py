"""Numerics that must not follow autocast, whether the CPU has native bf16, and what
``trainer.precision: auto`` means on this machine (the autocast of a precision is
:func:`gcnee.llm.load_plan.autocast_of`)."""

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


def resolve_precision(precision: str | int | None, accelerator: str = "auto") -> tuple[str, str]:
    """``trainer.precision`` made concrete for this machine: ``(precision, why)``.

    ``auto`` is the fastest precision measured not to cost AUC (README "CTR LLM"):
    ``bf16-mixed`` on a CUDA GPU with bf16 (``16-mixed`` on one without), ``bf16-mixed`` on a CPU
    with AVX-512 BF16 or AMX, ``32-true`` on any other CPU, where bf16 is emulated (a
    SmolLM2-135M forward of 8 x 128 tokens took 7.7x as long as in float32 on 2 AMD Zen 3
    cores). Any other value is returned unchanged (``why`` empty).
    """
    p = "32-true" if precision is None else str(precision)
    if p != "auto":
        return p, ""
    if str(accelerator) in ("auto", "gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            if torch.cuda.is_bf16_supported():
                return "bf16-mixed", "CUDA GPU with bf16"
            return "16-mixed", "CUDA GPU without bf16"
    if cpu_has_native_bf16():
        return "bf16-mixed", "CPU with AVX-512 BF16 or AMX"
    return "32-true", "CPU without AVX-512 BF16 or AMX: bf16 would be emulated"
