"""One dtype / device policy: settings -> how a backbone is loaded, placed and run.

Every loader of a causal LM (the llm stage's backbone, the exit stage's and ``TrainedRun``'s
tuned model, the LLM retriever's embedder, the benches) asks :func:`load_plan` and nothing else
decides a dtype, a device map, a quantization config or an autocast.

=================  ==========================  ==========================  ===========
``trainer.precision``  weights on CPU           weights on CUDA             autocast
=================  ==========================  ==========================  ===========
``32-true``, ``32``    float32                  float32                     none
``bf16-mixed``         float32                  bfloat16                    bfloat16
``bf16-true``          bfloat16                 bfloat16                    none
``16-mixed``           float32                  float16                     float16
``16-true``            float16                  float16                     none
=================  ==========================  ==========================  ===========

Why: on CUDA a frozen or merged model is only ever read under autocast, so float32 weights
would be re-cast on every forward and take twice the memory (28 GB for a 7B model); on the CPU
the measured default (``configs/ml100k.yaml``: float32 weights under bf16 autocast) stays.
``-true`` casts the weights themselves, as Lightning's ``HalfPrecision`` does in training, so a
run trained in ``bf16-true`` is also scored in bf16. LoRA adapters are created in float32
(peft's ``autocast_adapter_dtype``) under ``-mixed``; ``-true`` casts them with everything else.

On CUDA the model is loaded straight onto the rank's local device (``device_map``), never through
a host copy. ``llm.quantization: nf4 | int8`` loads through bitsandbytes with the compute dtype of
the precision (nf4 would otherwise compute in float32), placed at load time and never moved
afterwards (bitsandbytes' 8-bit models refuse ``.to``). Rejected: a quantized model with
``-true`` precision (it would cast the adapters and the norms to half precision as well).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from gcnee.config import ConfigError

QUANTIZATIONS = (None, "nf4", "int8")
# (weights on CUDA, weights on CPU, autocast); the weight dtype on CUDA is also the compute dtype.
_PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype, torch.dtype | None]] = {
    "32-true": (torch.float32, torch.float32, None),
    "32": (torch.float32, torch.float32, None),
    "bf16-mixed": (torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16-true": (torch.bfloat16, torch.bfloat16, None),
    "16-mixed": (torch.float16, torch.float32, torch.float16),
    "16": (torch.float16, torch.float32, torch.float16),
    "16-true": (torch.float16, torch.float16, None),
}


@dataclass(frozen=True)
class LoadPlan:
    """How to load and run one backbone (:func:`load_plan` builds it).

    Args:
        device (torch.device): where the model runs (the rank's local device).
        dtype (torch.dtype): the ``from_pretrained`` dtype of the weights.
        compute_dtype (torch.dtype): the dtype matmuls run in (nf4's compute dtype).
        autocast (torch.dtype, optional): the autocast of scoring outside Lightning (None: off).
        quantization (str, optional): ``nf4``, ``int8`` or None.
    """

    device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype
    autocast: torch.dtype | None
    quantization: str | None = None

    @property
    def device_map(self) -> dict[str, Any] | None:
        """``{"": cuda index}``: on CUDA the model is placed at load time, without a host copy;
        None: loaded on the CPU (quantized or not), where it stays."""
        if self.device.type == "cuda":
            return {"": self.device.index or 0}
        return None

    def quantization_config(self) -> Any:
        """transformers' ``BitsAndBytesConfig`` for :attr:`quantization` (None: not quantized)."""
        if self.quantization is None:
            return None
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(f"llm.quantization={self.quantization} needs bitsandbytes: "
                              "pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig

        if self.quantization == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=self.compute_dtype)
        return BitsAndBytesConfig(load_in_8bit=True)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """``dtype``, ``device_map`` and ``quantization_config`` for ``from_pretrained``."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.quantization is not None:
            kwargs["quantization_config"] = self.quantization_config()
        return kwargs

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on :attr:`device`: moved unless it is quantized (placed at load time);
        a quantized model somewhere else is an error, not a silent move."""
        where = next(module.parameters()).device
        if _same_device(where, self.device):
            return module
        if self.quantization is not None:
            raise RuntimeError(f"a {self.quantization} model cannot be moved from {where} to "
                               f"{self.device}: bitsandbytes places it at load time "
                               "(load it with this plan instead)")
        return module.to(self.device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def local_device(accelerator: str = "auto") -> torch.device:
    """The device of this process: ``cuda:<LOCAL_RANK>`` when ``trainer.accelerator`` puts the
    run on a GPU and one is there, else the CPU."""
    from gcnee.training import uses_cuda

    if uses_cuda(accelerator):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_plan(precision: str | int | None, quantization: str | None = None,
              accelerator: str = "auto", device: torch.device | str | None = None
              ) -> LoadPlan:
    """The :class:`LoadPlan` of ``trainer.precision``, ``llm.quantization`` and
    ``trainer.accelerator`` (module docstring); ``device`` overrides :func:`local_device`
    (e.g. the device a server hands to its worker).

    Raises :class:`~gcnee.config.ConfigError` naming the keys of a rejected combination.
    """
    p = "32-true" if precision is None else str(precision)
    if p not in _PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(_PRECISIONS)}, got {p!r}")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"llm.quantization must be null, nf4 or int8, got {quantization!r}")
    if quantization is not None and p.endswith("-true") and p != "32-true":
        raise ConfigError(
            f"llm.quantization={quantization} with trainer.precision={p}: '-true' casts every "
            f"parameter, the LoRA adapters and norms included, to half precision; use "
            f"trainer.precision={p.replace('-true', '-mixed')} (the quantized weights compute "
            f"in {p.split('-')[0]} either way)")
    device = local_device(accelerator) if device is None else torch.device(device)
    cuda_dtype, cpu_dtype, autocast = _PRECISIONS[p]
    on_cuda = device.type == "cuda"
    return LoadPlan(device=device, dtype=cuda_dtype if on_cuda else cpu_dtype,
                    compute_dtype=cuda_dtype, autocast=autocast, quantization=quantization)


def autocast_of(precision: str | int | None) -> torch.dtype | None:
    """The autocast dtype of ``trainer.precision`` (None: no autocast; ``-true`` casts the
    weights instead), as Lightning's loops use it: code that scores outside them wraps its
    forwards in the same autocast, so its speed and scores match the stage's own."""
    p = "32-true" if precision is None else str(precision)
    if p not in _PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(_PRECISIONS)}, got {p!r}")
    return _PRECISIONS[p][2]


def plan_of(cfg: Any, device: torch.device | str | None = None) -> LoadPlan:
    """:func:`load_plan` of a whole config (``cfg.trainer`` and ``cfg.llm``)."""
    return load_plan(cfg.trainer.precision, cfg.llm.get("quantization"),
                     cfg.trainer.accelerator, device)
