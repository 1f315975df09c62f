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

Supported (:data:`SUPPORTED_MODEL_TYPES`): Llama, Mistral, Qwen2/Qwen2.5 and Qwen3, with the
``eager`` or ``sdpa`` attention kernel. Their decoder layers all take ``(hidden, attention_mask,
position_ids, position_embeddings, cache)`` and read keys/values through ``cache.update``; what
differs between them (Qwen2's q/k/v biases, Qwen3's q/k norms, head_dim) lives inside the layers.
Sliding-window attention (Mistral's ``sliding_window``, Qwen's ``use_sliding_window`` layers) is
reproduced only where it equals full attention: a window of at least ``max_length`` tokens (the
longest prompt the runner will see) hides nothing. Anything the runner does not reproduce (a
shorter window, logit softcapping, Gemma's ``(1 + w)`` norms and scaled embeddings, per-layer-type
rotary, any other model type) is refused at construction by :func:`check_architecture`, naming
the model type and the feature.
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
# Model types whose decoder the runner reproduces (tests/llm/test_runner*.py check each against
# the Hugging Face forward).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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
                            "layer runner can run layer by layer (supported model types: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(base).__name__}'s output head is not an nn.Linear")
    return decoder, head


def sliding_window_layers(config: Any) -> tuple[list[int], int | None]:
    """``(layers, window)``: the 1-based decoder layers that use sliding-window attention and the
    window (``config.sliding_window``), or ``([], None)``. Mistral applies its window to every
    layer; Qwen2/Qwen3 to the ``layer_types`` marked ``sliding_attention`` (their configs set
    ``sliding_window`` to None unless ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [], None
    n = int(config.num_hidden_layers)
    if getattr(config, "model_type", None) == "mistral":  # MistralAttention ignores layer_types
        return list(range(1, n + 1)), int(window)
    types = list(getattr(config, "layer_types", None) or [])
    layers = [i + 1 for i, t in enumerate(types) if t == "sliding_attention"]
    return layers, (int(window) if layers else None)


def _spans(layers: Sequence[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(x) if x == start else f"{start}-{x}")
            start = None
    return ", ".join(out)


def unsupported_features(config: Any, max_length: int | None = None) -> list[str]:
    """What in ``config`` the runner would not reproduce (empty: supported); ``max_length`` is
    the longest prompt it will see (``llm.max_length``; None: unknown, so any sliding window
    counts as unsupported)."""
    mtype = str(getattr(config, "model_type", None))
    found = []
    if mtype not in SUPPORTED_MODEL_TYPES:
        found.append(f"model type '{mtype}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if mtype.startswith("gemma"):
        found.append("Gemma-style (1 + w) RMSNorm and sqrt(hidden)-scaled embeddings")
    for key, what in (("final_logit_softcapping", "final-logit softcapping"),
                      ("attn_logit_softcapping", "attention-logit softcapping")):
        if getattr(config, key, None) is not None:
            found.append(f"{what} ({key}={getattr(config, key)})")
    rope = getattr(config, "rope_parameters", None)
    if getattr(config, "rope_local_base_freq", None) is not None or (
            isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values())):
        found.append("per-layer-type rotary embeddings")
    types = set(getattr(config, "layer_types", None) or [])
    odd = sorted(types - {"full_attention", "sliding_attention"})
    if odd:
        found.append(f"attention layer types {odd}")
    layers, window = sliding_window_layers(config)
    if layers and (max_length is None or window < int(max_length)):
        need = ("no max_length was given to check it against" if max_length is None
                else f"shorter than llm.max_length={int(max_length)}")
        found.append(f"sliding-window attention (sliding_window={window} on layers "
                     f"{_spans(layers)}; {need}; a window >= llm.max_length equals full "
                     "attention and is accepted)")
    return found


def check_architecture(config: Any, max_length: int | None = None, name: str | None = None
                       ) -> None:
    """Raise ``ValueError`` naming the model type and every feature of ``config`` the runner
    would not reproduce (:func:`unsupported_features`); ``name``: the model class, for the
    message."""
    found = unsupported_features(config, max_length)
    if found:
        mtype = getattr(config, "model_type", None)
        what = f"{name} (model type '{mtype}')" if name else f"model type '{mtype}'"
        raise ValueError(f"the layer runner cannot run {what}: it does not reproduce "
                         + "; ".join(found))


class LayerRunner:
    """Runs a causal LM's decoder layer by layer (module docstring).

    Args:
        model (nn.Module): a Hugging Face causal LM with ``.model.embed_tokens/.layers/.norm/
            .rotary_emb`` and an output head, or a peft model wrapping one (LoRA layers run as
            injected, merged or not).
        share_prefix (bool or str, optional): run the rows' shared prompt prefix once
            (``llm.share_prefix``: true, false, or auto = on CPU; default: ``"auto"``).
        max_length (int, optional): the longest prompt :meth:`run` will see (``llm.max_length``);
            a sliding window at least this long is full attention for these prompts (default:
            :obj:`None`: unknown, so a model with sliding-window layers is refused).

    Raises ``ValueError`` for a model or kernel it does not reproduce (:func:`check_architecture`).

    The runner holds references, not copies: placing the model on a device moves it too.
    It runs under whatever autocast and grad mode the caller has set (no gradient is kept
    through :meth:`states`).
    """

    def __init__(self, model: nn.Module, share_prefix: bool | str | None = "auto",
                 max_length: int | None = None) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        check_architecture(base.config, max_length, type(base).__name__)
        self.decoder, self.head = _decoder_parts(model)
        self.config = self.decoder.config
        self.max_length = None if max_length is None else int(max_length)
        self._window = sliding_window_layers(self.config)[1]
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
        longest = int(am.sum(1).max())
        if self._window is not None and longest > self._window:
            raise ValueError(f"a prompt of {longest} tokens is longer than the model's sliding "
                             f"window ({self._window}), which the layer runner does not "
                             f"reproduce (max_length={self.max_length})")
        b, width = ids.shape
        prefix = shared_prefix_length(ids, am) if self.sharing() else 0
        stats = RunStats(prefix=prefix)
        lm = self.decoder
        cache = _PrefixKV() if prefix else None
        if prefix:
            start = width - int(am[0].sum())
            p_pos = torch.arange(prefix, device=dev)[None]
            p_h = lm.embed_tokens(ids[:1, start:start + prefix])
            p_mask = attention_mask_4d(torch.ones_like(p_pos), 0, self.kernel, p_h.dtype)
            # Row r's own tokens sit at [T - len_r + P, T); dropping the first P columns puts
            # them at [T - len_r, T - P), where the original mask's ones start: the rows' mask
            # is the original's first T - P columns.
            ids, am = ids[:, prefix:], am[:, : width - prefix]
        pos = positions_from_mask(am) + prefix
        h = lm.embed_tokens(ids)
        if prefix:
            # One rotary call over prefix and rows: a dynamic rope rescales by the largest
            # position it is given, as it does once over the whole prompt in the HF forward.
            cos, sin = lm.rotary_emb(h, position_ids=torch.cat([p_pos.expand(b, -1), pos], 1))
            p_rope = (cos[:1, :prefix], sin[:1, :prefix])
            cos, sin = cos[:, prefix:], sin[:, prefix:]
        else:
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
