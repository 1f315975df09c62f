"""Batched early-exit scoring: run the decoder layer by layer and drop rows as they exit.

The decoder is run by hand exactly as ``LlamaModel.forward`` does it in transformers 5.x
(``embed_tokens`` -> ``create_causal_mask`` -> ``rotary_emb`` -> decoder layers), with the
attention implementation the model was loaded with (``config._attn_implementation``: sdpa, eager,
...), because ``create_causal_mask`` builds the mask that implementation expects.

Inputs are left-padded (the prompt's last token is the last column), so the answer is read at
position ``-1`` for every row. Position ids come from the attention mask
(``cumsum(mask) - 1``, as ``generate`` does), so a row's positions do not depend on how much
padding its batch adds; RoPE is relative, so this equals the plain forward (positions
``0..T-1``) up to float rounding.

At each exit layer only the rows still undecided are scored, from the last position only and
with the head's two answer rows (a 2 x hidden matmul; no vocabulary projection). Rows whose rule
fires leave the batch: hidden states, 2-D mask, position ids and rotary embeddings are indexed,
leading columns that have become padding for every remaining row are cut off, and the 4-D mask is
rebuilt for the smaller batch — so the remaining rows are computed exactly as they would be in a
batch of their own. ``compact=False`` keeps every row in the batch until the slowest has exited
(the usual no-compaction baseline); each row's score is still taken at its own exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from gcnee.exits.heads import ExitHeads
from gcnee.exits.rules import ExitRule, make_rule
from gcnee.precision import float32_linear

MODES = ("exit", "full", "all")


@dataclass
class ScoreResult:
    """Per-row results, in the caller's row order, on the CPU.

    scores: ``(B,)`` float32 P(yes) at each row's exit.
    exit_layers: ``(B,)`` long, the decoder layer (1-based) the row left at.
    exit_heads: ``(B,)`` long, index of that head in ``heads.layers`` (``-1`` for full depth).
    head_probs: ``(B, H)`` float32 P(yes) of every head the row reached (NaN after its exit;
        ``(B, 0)`` for full depth).
    row_layers: decoder-layer applications actually computed, counted per row.
    token_layers: the same counted per (row, position), i.e. including the padding computed.
    """

    scores: torch.Tensor
    exit_layers: torch.Tensor
    exit_heads: torch.Tensor
    head_probs: torch.Tensor
    row_layers: int = 0
    token_layers: int = 0


@dataclass
class _Point:
    layer: int
    prob: Callable[[torch.Tensor], torch.Tensor]  # (n, hidden) -> (n,) P(yes)


class EarlyExitScorer:
    """Scores prompts with early exit from a Llama-style causal LM and its exit heads.

    Args:
        model: a (merged) Hugging Face causal LM with ``.model.embed_tokens/.layers/.norm/
            .rotary_emb`` and ``.lm_head`` (Llama, Mistral, Qwen2, SmolLM2, ...).
        heads: the exit heads; moved to the model's device.
        answer_ids: ``(yes_id, no_id)``; defaults to ``heads.answer_ids``.
        pad_token_id: id used for padding in :meth:`score_requests` (masked, so any valid id
            works); defaults to the model config's, else 0.
        autocast: run the decoder under ``torch.autocast`` with this dtype (``torch.bfloat16``
            for ``trainer.precision=bf16-mixed``; see :func:`gcnee.training.autocast_dtype`);
            None = the weights' own dtype. Head probabilities are always float32.
    """

    def __init__(self, model: nn.Module, heads: ExitHeads,
                 answer_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None,
                 autocast: torch.dtype | None = None) -> None:
        inner = getattr(model, "model", None)
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, name):
                raise TypeError(f"{type(model).__name__} has no .model.{name}: not a Llama-style "
                                "decoder the scorer can run layer by layer")
        self.model = model
        self.lm = inner
        self.config = inner.config
        n = int(self.config.num_hidden_layers)
        if heads.num_layers != n:
            raise ValueError(f"exit heads were built for {heads.num_layers} layers, "
                             f"the model has {n}")
        self.num_layers = n
        ids = list(heads.answer_ids.tolist()) if answer_ids is None else [int(a) for a in
                                                                           answer_ids]
        if ids != heads.answer_ids.tolist():
            raise ValueError(f"answer_ids {ids} differ from the heads' {heads.answer_ids.tolist()}")
        self.device = next(model.parameters()).device
        self.heads = heads.to(self.device)
        self.answer_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if pad_token_id is None:
            pad_token_id = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.autocast = autocast

    # -- public API ----------------------------------------------------------------------------

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              rule: str | ExitRule | None = "window", tau: float | None = None,
              m: int | None = None, min_prev: int = 1, compact: bool = True) -> ScoreResult:
        """Early-exit scores of a left-padded batch ``input_ids`` ``(B, T)``.

        ``rule`` is an :class:`ExitRule` or a name (``window``, ``confidence``, ``patience``,
        ``none``) with ``tau`` / ``m`` / ``min_prev``; the last exit head always answers.
        """
        return self._run(input_ids, attention_mask, "exit",
                         make_rule(rule, tau=tau, m=m, min_prev=min_prev), compact)

    def full_depth(self, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> ScoreResult:
        """Reference without early exit: all decoder layers, the model's own final norm and head
        (answer rows only), whatever the exit heads are."""
        return self._run(input_ids, attention_mask, "full", make_rule("none"), True)

    def all_head_probs(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One pass to the deepest exit layer recording every head's P(yes): ``(B, H)`` float32
        on the CPU, for offline replay of many rules (:func:`gcnee.exits.rules.replay`)."""
        return self._run(input_ids, attention_mask, "all", make_rule("none"), True).head_probs

    def score_requests(self, requests: Sequence[Sequence[int]], batch_size: int,
                       rule: str | ExitRule | None = "window", tau: float | None = None,
                       m: int | None = None, min_prev: int = 1, compact: bool = True,
                       mode: str = "exit") -> ScoreResult:
        """Score token-id lists (unpadded prompts) in batches of ``batch_size``.

        Requests are sorted by length (longest first) so a batch holds similar lengths, then
        left-padded; results come back in the order of ``requests``. ``mode``: ``exit`` (early
        exit with ``rule``), ``full`` (:meth:`full_depth`) or ``all`` (:meth:`all_head_probs`;
        ``scores`` are then the last head's).
        """
        if mode not in MODES:
            raise ValueError(f"mode='{mode}' is not one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (eval.batch_size), got {batch_size}")
        lengths = [len(r) for r in requests]
        if any(n == 0 for n in lengths):
            raise ValueError(f"request {lengths.index(0)} is empty")
        rule_obj = make_rule(rule if mode == "exit" else "none", tau=tau, m=m, min_prev=min_prev)
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        n_heads = 0 if mode == "full" else len(self.heads.layers)
        out = ScoreResult(torch.empty(len(requests)), torch.empty(len(requests), dtype=torch.long),
                          torch.empty(len(requests), dtype=torch.long),
                          torch.empty(len(requests), n_heads))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(lengths[i] for i in idx)
            ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
            am = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - lengths[i]:] = torch.as_tensor(list(requests[i]), dtype=torch.long)
                am[r, width - lengths[i]:] = 1
            res = self._run(ids, am, mode, rule_obj, compact)
            t = torch.as_tensor(idx, dtype=torch.long)
            out.scores[t] = res.scores
            out.exit_layers[t] = res.exit_layers
            out.exit_heads[t] = res.exit_heads
            out.head_probs[t] = res.head_probs
            out.row_layers += res.row_layers
            out.token_layers += res.token_layers
        return out

    # -- internals -----------------------------------------------------------------------------

    def _points(self, mode: str) -> list[_Point]:
        if mode == "full":
            lm_head = self.model.lm_head
            w = lm_head.weight
            b = lm_head.bias

            def own(x: torch.Tensor) -> torch.Tensor:
                logits = float32_linear(self.lm.norm(x), w[self.answer_ids],
                                        b[self.answer_ids] if b is not None else None)
                return torch.softmax(logits, dim=-1)[:, 0]

            return [_Point(self.num_layers, own)]
        return [_Point(layer, lambda x, layer=layer: self.heads.prob_yes(layer, x))
                for layer in self.heads.layers]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mode: str,
             rule: ExitRule, compact: bool) -> ScoreResult:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device)
        am = (torch.ones_like(ids) if attention_mask is None
              else attention_mask.to(self.device).long())
        if am.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(am.shape)} does not match input_ids "
                             f"{tuple(ids.shape)}")
        if not bool(am[:, -1].all()):
            raise ValueError("the batch must be left-padded: attention_mask[:, -1] must be 1 for "
                             "every row (the prompt's last token in the last column)")
        was = (self.model.training, self.heads.training)
        self.model.eval()
        self.heads.eval()
        try:
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=self.autocast or torch.bfloat16,
                    enabled=self.autocast is not None):
                return self._loop(ids, am, self._points(mode), rule, compact, mode == "full")
        finally:
            self.model.train(was[0])
            self.heads.train(was[1])

    def _loop(self, ids: torch.Tensor, am: torch.Tensor, points: list[_Point], rule: ExitRule,
              compact: bool, full: bool) -> ScoreResult:
        lm = self.lm
        b = ids.shape[0]
        n_points = len(points)
        h, mask, (cos, sin), pos = _prepare(lm, ids, am)
        rows = torch.arange(b, device=self.device)  # caller's index of each row of h
        waiting = None  # compact=False: which rows of h are still undecided
        probs = torch.full((b, n_points), float("nan"), device=self.device)
        scores = torch.empty(b, device=self.device)
        exit_j = torch.full((b,), -1, dtype=torch.long, device=self.device)
        row_layers = token_layers = 0
        j = 0
        for i, layer_mod in enumerate(lm.layers[: points[-1].layer]):
            h = layer_mod(h, attention_mask=mask, position_embeddings=(cos, sin),
                          position_ids=pos)
            row_layers += h.shape[0]
            token_layers += h.shape[0] * h.shape[1]
            if i + 1 != points[j].layer:
                continue
            sel = None if waiting is None else waiting.nonzero().squeeze(1)
            x = h[:, -1] if sel is None else h[sel, -1]
            orig = rows if sel is None else rows[sel]
            p = points[j].prob(x).float()
            probs[orig, j] = p
            if j == n_points - 1:
                fire = torch.ones_like(p, dtype=torch.bool)
            else:
                fire = rule.fires(probs[orig, : j + 1])
            scores[orig[fire]] = p[fire]
            exit_j[orig[fire]] = j
            j += 1
            if bool(fire.all()):
                break
            if not bool(fire.any()):
                continue
            if not compact:
                if waiting is None:
                    waiting = torch.ones(h.shape[0], dtype=torch.bool, device=self.device)
                waiting[orig[fire] if sel is None else sel[fire]] = False
                continue
            keep = (~fire).nonzero().squeeze(1)
            h, am, pos, rows = h[keep], am[keep], pos[keep], rows[keep]
            cos, sin = cos[keep], sin[keep]
            # Left padding: columns before the longest remaining prompt are padding for all rows.
            start = am.shape[1] - int(am.sum(1).max())
            if start > 0:
                h, am, pos = h[:, start:], am[:, start:], pos[:, start:]
                cos, sin = cos[:, start:], sin[:, start:]
            mask = _causal_mask(lm, h, am, pos)
        layers_t = torch.as_tensor([pt.layer for pt in points], device=self.device)
        exit_layers = layers_t[exit_j]
        if full:  # the model's own head is not one of the exit heads
            exit_j = torch.full_like(exit_j, -1)
            probs = probs[:, :0]
        return ScoreResult(scores.cpu(), exit_layers.cpu(), exit_j.cpu(), probs.cpu(),
                           row_layers, token_layers)


def _causal_mask(lm: nn.Module, h: torch.Tensor, am: torch.Tensor, pos: torch.Tensor):
    """The mask ``LlamaModel.forward`` builds for the model's attention implementation."""
    return create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=am, cache=None,
                              position_ids=pos)


def _prepare(lm: nn.Module, ids: torch.Tensor, am: torch.Tensor):
    """Embeddings ``(B, T, hidden)``, causal mask, rotary ``(cos, sin)`` and position ids of a
    left-padded batch, as ``LlamaModel.forward`` computes them (positions from the mask)."""
    pos = (am.cumsum(-1) - 1).clamp_(min=0)
    h = lm.embed_tokens(ids)
    return h, _causal_mask(lm, h, am, pos), lm.rotary_emb(h, position_ids=pos), pos


def last_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Last-position hidden states after each decoder layer in ``layers`` (1-based, raw layer
    output, no final norm): ``{layer: (B, hidden)}`` for a left-padded batch ``(B, T)``.

    Runs the decoder only up to ``max(layers)``; no gradient flows into the backbone. Used to
    train exit heads on a frozen backbone.
    """
    lm = model.model
    wanted = sorted({int(x) for x in layers})
    if not wanted or wanted[0] < 1 or wanted[-1] > len(lm.layers):
        raise ValueError(f"layers {list(layers)} outside 1..{len(lm.layers)}")
    am = attention_mask.long()
    if not bool(am[:, -1].all()):
        raise ValueError("the batch must be left-padded: attention_mask[:, -1] must be 1")
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        h, mask, pe, pos = _prepare(lm, input_ids, am)
        for i, layer_mod in enumerate(lm.layers[: wanted[-1]]):
            h = layer_mod(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            if i + 1 in wanted:
                out[i + 1] = h[:, -1].contiguous()  # not a view: frees the full states
    return out
