"""Run a batch's shared prompt prefix once instead of once per row.

Every CTR prompt starts with the same tokens (the chat template's system turn with the
instruction, the user-turn header: 23 tokens of ~127 on ml-100k). A decoder forward over a
left-padded batch (B, T) whose rows share a prefix of P real tokens equals

1. a forward of the prefix alone, batch 1, positions 0..P-1, keeping its key/value cache;
2. that cache repeated B times, then a forward of each row's remaining tokens at positions P..,
   attending to the cached prefix and to its own earlier tokens.

It saves (B - 1) * P token-passes per batch. The answer is still read at the last position, so
nothing downstream changes; gradients flow through the repeated cache into the prefix pass, so
training can use it too. On CPU it is a measured win (``gcnee bench scoring``, README
"Benchmarks"); on GPUs the extra small forward mostly adds latency, so ``llm.share_prefix: auto``
uses it on CPU only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from gcnee.llm.batch import check_left_padded, positions_from_mask

# Shorter shared prefixes are not worth the second (small) forward's fixed cost.
MIN_PREFIX_TOKENS = 16


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         min_tokens: int = MIN_PREFIX_TOKENS) -> int:
    """Tokens every row of a left-padded batch starts with; 0 when not worth sharing.

    ``input_ids``, ``attention_mask``: (B, T), real tokens at the right end of each row. The
    length is capped so every row keeps at least one token of its own (its last position is
    where the answer is read). Returns 0 for a single row, a prefix shorter than
    ``min_tokens``, or a mask that is not left padding (ones after zeros only).
    """
    batch, width = input_ids.shape
    if batch < 2:
        return 0
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        return 0  # not left-padded: the shifted-suffix trick below would be wrong
    lengths = mask.sum(-1)
    span = int(lengths.min()) - 1
    if span < min_tokens:
        return 0
    start = (width - lengths)[:, None]
    heads = input_ids.gather(1, start + torch.arange(span, device=input_ids.device)[None])
    same = (heads == heads[:1]).all(0).long()
    length = int(same.cumprod(0).sum())
    return length if length >= min_tokens else 0


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    # transformers renamed past_key_values -> cache (5.2x; the old name is deprecated).
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def last_hidden_with_shared_prefix(decoder: torch.nn.Module, input_ids: torch.Tensor,
                                   attention_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """The decoder's final-norm output at the last position (B, hidden), with the first
    ``prefix`` real tokens of every row (identical: :func:`shared_prefix_length`) run once.

    ``decoder`` is the bare decoder stack of a Llama, Mistral, Qwen2 or Qwen3 model
    (``model.model``: embeddings, layers, final norm) that accepts a key/value cache; a
    sliding-window layer is exact while the prompt fits its window (checked at load by
    :func:`gcnee.llm.runner.check_architecture`). Position ids count real tokens only, as in the
    unshared forward, so the result equals it up to float rounding. Raises ``ValueError`` unless
    ``attention_mask`` is contiguous left padding.
    """
    check_left_padded(attention_mask)
    batch, width = input_ids.shape
    start = width - int(attention_mask[0].sum())
    kwarg = _cache_kwarg(decoder)
    positions = torch.arange(prefix, device=input_ids.device)[None]
    first = decoder(input_ids=input_ids[:1, start:start + prefix], position_ids=positions,
                    use_cache=True)
    cache = _returned_cache(first)
    if cache is None:
        raise RuntimeError("the decoder returned no key/value cache for the shared prefix")
    cache.batch_repeat_interleave(batch)
    # Row r's own tokens sit at [T - len_r + P, T). Shifting every row left by P puts them at
    # [T - len_r, T - P): exactly where the original mask's ones start, so the suffix mask is
    # the original mask's first T - P columns (what lands left of it is masked out).
    own = attention_mask[:, : width - prefix]
    mask = torch.cat([own.new_ones(batch, prefix), own], dim=1)
    position_ids = prefix + positions_from_mask(own)
    out = decoder(input_ids=input_ids[:, prefix:], attention_mask=mask,
                  position_ids=position_ids, use_cache=True, **{kwarg: cache})
    return out.last_hidden_state[:, -1]


def gradient_checkpointing_active(decoder: torch.nn.Module) -> bool:
    """True when a training forward would drop the cache (transformers disables caching under
    gradient checkpointing, e.g. after ``prepare_model_for_kbit_training``)."""
    if not (decoder.training and torch.is_grad_enabled()):
        return False
    return any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())


def resolve_share_prefix(setting: bool | str | None, device: torch.device) -> bool:
    """``llm.share_prefix``: true/false, or auto/None = on CPU only."""
    if isinstance(setting, bool):
        return setting
    value = "auto" if setting is None else str(setting).lower()
    if value == "auto":
        return device.type == "cpu"
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"llm.share_prefix must be true, false or auto, got {setting!r}")
