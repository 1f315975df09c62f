"""The decoder run layer by layer: the one scoring path of every trained model in gcnee.

The llm stage's validation/test scoring (with the exit layers' states recorded), the exit
stage's head training, the early-exit scorer, ``gcnee predict``, ``gcnee evaluate`` and the
benches all run a causal LM through :class:`LayerRunner`, so the states the heads are trained on
and the states they are served on come from the same code. (LoRA training keeps the Hugging Face
forward, :func:`gcnee.llm.module.last_position_logits`: it needs gradients through the adapter.)

What it does for a left-padded batch ``input_ids`` ``(B, T)`` with ``attention_mask`` ``(B, T)``:

1. **Shared prefix.** Every CTR prompt starts with the same tokens (chat template, instruction,
   user header). When ``share_prefix`` is on and the rows share ``P >= 16`` real leading tokens
   (:func:`gcnee.llm.shared_prefix.shared_prefix_length`), the prefix runs once at batch 1 and
   its keys/values are put in front of every row's own keys/values in each layer; the rows'
   own tokens run at positions ``P..``. Layer ``l`` of the prefix runs just before layer ``l``
   of the rows, so a batch whose rows all exit at layer 5 pays 5 prefix layers, not ``N``.
2. **Positions, mask, rotary** are built once per batch: positions count real tokens only
   (:func:`positions_from_mask`), so a prompt's states do not depend on its batch's padding;
   the 4-D mask lets each real token see the prefix and the real tokens up to itself, and a
   padding position see only itself (finite values, never read).
3. **Layers.** After each layer in ``layers`` the caller's ``visit(layer, states, rows)`` gets
   the last-position outputs ``(n, hidden)`` (raw layer output, no final norm) of the ``n`` rows
   still running and their indices in the batch; it returns which of them leave (or None).
4. **Compaction.** Rows that leave are dropped from the hidden states, mask, positions and
   rotary tables; leading columns that are padding for every remaining row are cut; the prefix
   keys/values (one row, broadcast) need no change. The remaining rows are then computed as in a
   batch of their own. ``compact=False`` keeps them in the batch (the usual baseline) but stops
   visiting them.

Invariant (tested): for any row, the states ``visit`` sees equal, up to float rounding, the
Hugging Face forward's ``hidden_states[l][row, -1]`` of that prompt alone, whatever the batch,
the prefix sharing and the layers other rows left at.

Supported: decoders whose layers take ``(hidden, attention_mask, position_ids, position_embeddings,
cache)`` and whose attention reads keys/values through ``cache.update`` (Llama and the models
built like it), with the ``eager`` or ``sdpa`` attention kernel. Anything else is refused here,
at construction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gcnee.llm.batch import check_left_padded, positions_from_mask
from gcnee.llm.shared_prefix import resolve_share_prefix, shared_prefix_length
from gcnee.precision import float32_linear

KERNELS = ("eager", "sdpa")

# visit(layer, states (n, hidden), rows (n,)) -> bool (n,) of the rows that leave, or None
Visit = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass
class RunStats:
    """What one :meth:`LayerRunner.run` computed.

    row_layers: decoder-layer applications, counted per row.
    token_layers: the same per (row, position), padding and the shared prefix's one row
        included.
    prefix: the shared prefix length ``P`` (0: not shared).
    """

    row_layers: int = 0
    token_layers: int = 0
    prefix: int = 0


class _PrefixKV:
    """Stands in for a transformers cache inside the attention layers: while ``recording`` it
    keeps the prefix's keys/values of each layer (batch 1); otherwise it puts them, broadcast to
    the batch, in front of the rows' own keys/values. Nothing is stored for the rows."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.kv[layer_idx] = (key, value)
            return key, value
        pk, pv = self.kv[layer_idx]
        n = key.shape[0]
        return (torch.cat([pk.expand(n, -1, -1, -1), key], dim=2),
                torch.cat([pv.expand(n, -1, -1, -1), value], dim=2))


def attention_mask_4d(key_mask: torch.Tensor, prefix: int, kernel: str, dtype: torch.dtype
                      ) -> torch.Tensor:
    """The ``(n, 1, S, P + S)`` mask of ``n`` rows' own ``S`` columns (``key_mask`` ``(n, S)``,
    left-padded) after a shared prefix of ``P`` tokens: a real token sees the prefix and the real
    tokens up to itself; a padding position sees only itself. ``sdpa`` takes it as booleans
    (True = attend), ``eager`` as an additive float mask."""
    n, s = key_mask.shape
    q = torch.arange(s, device=key_mask.device)
    own = (q[None, :] <= q[:, None])[None] & key_mask.bool()[:, None, :]  # (n, S, S)
    own = own | torch.eye(s, dtype=torch.bool, device=key_mask.device)[None]
    allowed = torch.cat([own.new_ones(n, s, prefix), own], dim=2)[:, None]
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack ``model.model``, output head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise TypeError(f"{type(base).__name__} has no .model.{name}: not a decoder the "
                            "layer runner can run layer by layer (Llama-style models only)")
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(base).__name__}'s output head is not an nn.Linear")
    return decoder, head


class LayerRunner:
    """Runs a causal LM's decoder layer by layer (module docstring).

    Args:
        model (nn.Module): a Hugging Face causal LM with ``.model.embed_tokens/.layers/.norm/
            .rotary_emb`` and an output head, or a peft model wrapping one (LoRA layers run as
            injected, merged or not).
        share_prefix (bool or str, optional): run the rows' shared prompt prefix once
            (``llm.share_prefix``: true, false, or auto = on CPU; default: ``"auto"``).

    The runner holds references, not copies: placing the model on a device moves it too.
    It runs under whatever autocast and grad mode the caller has set (no gradient is kept
    through :meth:`states`).
    """

    def __init__(self, model: nn.Module, share_prefix: bool | str | None = "auto") -> None:
        self.decoder, self.head = _decoder_parts(model)
        self.config = self.decoder.config
        kernel = str(getattr(self.config, "_attn_implementation", None) or "eager")
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel '{kernel}' cannot be run layer by layer; set "
                             f"llm.attention to one of {', '.join(KERNELS)}")
        self.share_prefix = share_prefix
        resolve_share_prefix(share_prefix, torch.device("cpu"))  # a bad setting fails here
        params = inspect.signature(self.decoder.layers[0].forward).parameters
        # transformers renamed past_key_values -> cache (5.2x); the old name is deprecated.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def num_layers(self) -> int:
        """Decoder layers ``N``."""
        return len(self.decoder.layers)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def kernel(self) -> str:
        """The attention kernel the model runs (``eager`` or ``sdpa``)."""
        return str(getattr(self.config, "_attn_implementation", None) or "eager")

    def sharing(self) -> bool:
        """Whether :meth:`run` shares prompt prefixes on the model's current device."""
        return resolve_share_prefix(self.share_prefix, self.device)

    # -- heads ---------------------------------------------------------------------------------

    def answer_logits(self, states: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """The model's own answer: final norm, then the two ``answer_ids`` rows of the output
        head in float32. ``states`` ``(n, hidden)`` after the last layer -> ``(n, 2)``."""
        ids = answer_ids.to(self.head.weight.device)
        bias = self.head.bias[ids] if self.head.bias is not None else None
        return float32_linear(self.decoder.norm(states), self.head.weight[ids], bias)

    # -- running -------------------------------------------------------------------------------

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Last-position outputs ``{layer: (B, hidden)}`` after each decoder layer in ``layers``
        (1-based, raw layer output), without gradient; runs up to ``max(layers)`` only."""
        out: dict[int, torch.Tensor] = {}

        def keep(layer: int, h: torch.Tensor, rows: torch.Tensor) -> None:
            out[layer] = h

        with torch.no_grad():
            self.run(input_ids, attention_mask, layers, keep)
        return out

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            layers: Sequence[int], visit: Visit, compact: bool = True) -> RunStats:
        """Run the decoder over a left-padded batch ``(B, T)``, calling ``visit`` after each
        layer in ``layers`` (1-based, increasing) with the rows still running; stops after the
        last of ``layers`` or when no row is left. Returns what was computed."""
        wanted = sorted({int(x) for x in layers})
        if not wanted or wanted[0] < 1 or wanted[-1] > self.num_layers:
            raise ValueError(f"layers {list(layers)} outside 1..{self.num_layers}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        dev = self.device
        ids = input_ids.to(dev)
        am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev).long()
        if am.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(am.shape)} does not match input_ids "
                             f"{tuple(ids.shape)}")
        check_left_padded(am)
        b, width = ids.shape
        prefix = shared_prefix_length(ids, am) if self.sharing() else 0
        stats = RunStats(prefix=prefix)
        lm = self.decoder
        cache = _PrefixKV() if prefix else None
        if prefix:
            start = width - int(am[0].sum())
            p_pos = torch.arange(prefix, device=dev)[None]
            p_h = lm.embed_tokens(ids[:1, start:start + prefix])
            p_rope = lm.rotary_emb(p_h, position_ids=p_pos)
            p_mask = attention_mask_4d(torch.ones_like(p_pos), 0, self.kernel, p_h.dtype)
            # Row r's own tokens sit at [T - len_r + P, T); dropping the first P columns puts
            # them at [T - len_r, T - P), where the original mask's ones start: the rows' mask
            # is the original's first T - P columns.
            ids, am = ids[:, prefix:], am[:, : width - prefix]
        pos = positions_from_mask(am) + prefix
        h = lm.embed_tokens(ids)
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        mask = attention_mask_4d(am, prefix, self.kernel, h.dtype)
        rows = torch.arange(b, device=dev)  # the caller's index of each row of h
        waiting = None  # compact=False: which rows of h are still visited
        kw = {self._cache_kwarg: cache} if cache is not None else {}
        j = 0
        for i, layer in enumerate(lm.layers[: wanted[-1]]):
            if cache is not None:
                cache.recording = True
                p_h = layer(p_h, attention_mask=p_mask, position_embeddings=p_rope,
                            position_ids=p_pos, **kw)
                cache.recording = False
                stats.token_layers += prefix
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos,
                      **kw)
            stats.row_layers += h.shape[0]
            stats.token_layers += h.shape[0] * h.shape[1]
            if i + 1 != wanted[j]:
                continue
            j += 1
            sel = None if waiting is None else waiting.nonzero().squeeze(1)
            last = h[:, -1] if sel is None else h[sel, -1]
            leave = visit(i + 1, last, rows if sel is None else rows[sel])
            if j == len(wanted) or leave is None or not bool(leave.any()):
                continue
            if bool(leave.all()):
                break
            if not compact:
                if waiting is None:
                    waiting = torch.ones(h.shape[0], dtype=torch.bool, device=dev)
                waiting[(torch.arange(h.shape[0], device=dev) if sel is None else sel)[leave]] = \
                    False
                if not bool(waiting.any()):
                    break
                continue
            keep = (~leave).nonzero().squeeze(1)
            h, am, pos, rows = h[keep], am[keep], pos[keep], rows[keep]
            cos, sin = cos[keep], sin[keep]
            # Left padding: columns before the longest remaining prompt are padding for all rows.
            cut = am.shape[1] - int(am.sum(1).max())
            if cut > 0:
                h, am, pos = h[:, cut:], am[:, cut:], pos[:, cut:]
                cos, sin = cos[:, cut:], sin[:, cut:]
            mask = attention_mask_4d(am, prefix, self.kernel, h.dtype)
        return stats
