r"""Batched early-exit scoring: run the decoder layer by layer and drop rows as they exit.

The decoder runs through :class:`gcnee.llm.runner.LayerRunner` (the same code that records the
states the exit heads are trained on): inputs left-padded, positions from the mask, the shared
prompt prefix run once per batch (``share_prefix``), the answer read at the last position.

At each exit layer only the rows still undecided are scored, from the last position only and
with the head's two answer rows (a 2 x hidden matmul; no vocabulary projection). Rows whose rule
fires leave the batch (the runner's compaction), so the remaining rows are computed exactly as
they would be in a batch of their own. With :math:`L_i` the layer row :math:`i` leaves at, a
batch of :math:`B` rows costs

.. math::

    \sum_{l=1}^{\max_i L_i} \left|\{ i : L_i \ge l \}\right| \quad \text{row-layers}

instead of :math:`B \cdot \max_i L_i`. ``compact=False`` keeps every row in the batch until the
slowest has exited (the usual no-compaction baseline); each row's score is still taken at its own
exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gcnee.exits.heads import ExitHeads
from gcnee.exits.rules import ExitRule, make_rule
from gcnee.llm.answer import prob_yes
from gcnee.llm.batch import length_sorted_batches
from gcnee.llm.runner import LayerRunner

MODES = ("exit", "full", "all")
RULE_READS = ("raw", "calibrated")


@dataclass
class ScoreResult:
    """Per-row results, in the caller's row order, on the CPU.

    scores: ``(B,)`` float32 P(yes) at each row's exit (calibrated when the scorer has a
        calibration).
    exit_layers: ``(B,)`` long, the decoder layer (1-based) the row left at.
    exit_heads: ``(B,)`` long, index of that head in ``heads.layers`` (``-1`` for full depth).
    head_probs: ``(B, H)`` float32 raw P(yes) of every head the row reached (NaN after its exit;
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


class EarlyExitScorer:
    """Scores prompts with early exit from a causal LM and its exit heads.

    Args:
        model (nn.Module): a (merged) Hugging Face causal LM the
            :class:`~gcnee.llm.runner.LayerRunner` can run (Llama, Mistral, Qwen2, SmolLM2, ...).
        heads (ExitHeads): the exit heads; moved to the model's device.
        answer_ids (sequence of int, optional): ``(yes_id, no_id)``; must equal
            ``heads.answer_ids`` (default: :obj:`None` = theirs).
        pad_token_id (int, optional): id used for padding in :meth:`score_requests` (masked,
            so any valid id works; default: the model config's, else 0).
        autocast (torch.dtype, optional): run the decoder under ``torch.autocast`` with this
            dtype (``torch.bfloat16`` for ``trainer.precision=bf16-mixed``; default:
            :obj:`None` = the weights' own dtype). Head probabilities are always float32.
        share_prefix (bool or str, optional): ``llm.share_prefix`` (default: ``"auto"``).
        calibration (optional): per-layer maps with ``apply(layer, p) -> p`` fitted on
            validation (:class:`gcnee.exits.calibration.Calibration`); every exit's score is
            then the calibrated P(yes) (default: :obj:`None` = raw head probabilities).
        rule_reads (str, optional): what the exit rule reads, ``"raw"`` or ``"calibrated"``
            probabilities (``eval.rule_reads``; default: ``"raw"``).
        max_length (int, optional): ``llm.max_length``, the longest prompt; the runner checks
            sliding windows against it (default: :obj:`None`: sliding-window models refused).
    """

    def __init__(self, model: nn.Module, heads: ExitHeads,
                 answer_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None,
                 autocast: torch.dtype | None = None,
                 share_prefix: bool | str | None = "auto", calibration: Any = None,
                 rule_reads: str = "raw", max_length: int | None = None) -> None:
        self.runner = LayerRunner(model, share_prefix=share_prefix, max_length=max_length)
        self.model = model
        self.config = self.runner.config
        n = self.runner.num_layers
        if heads.num_layers != n:
            raise ValueError(f"exit heads were built for {heads.num_layers} layers, "
                             f"the model has {n}")
        self.num_layers = n
        ids = list(heads.answer_ids.tolist()) if answer_ids is None else [int(a) for a in
                                                                           answer_ids]
        if ids != heads.answer_ids.tolist():
            raise ValueError(f"answer_ids {ids} differ from the heads' {heads.answer_ids.tolist()}")
        self.heads = heads.to(self.device)
        self.answer_ids = torch.as_tensor(ids, dtype=torch.long)
        if pad_token_id is None:
            pad_token_id = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.autocast = autocast
        if rule_reads not in RULE_READS:
            raise ValueError(f"eval.rule_reads='{rule_reads}' is not one of {RULE_READS}")
        self.calibration, self.rule_reads = calibration, rule_reads

    @property
    def device(self) -> torch.device:
        """Where the model is (the heads follow it on every call)."""
        return self.runner.device

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
        left-padded (:func:`gcnee.llm.runner.length_sorted_batches`); results come back in the
        order of ``requests``. ``mode``: ``exit`` (early exit with ``rule``), ``full``
        (:meth:`full_depth`) or ``all`` (:meth:`all_head_probs`; ``scores`` are then the last
        head's).
        """
        if mode not in MODES:
            raise ValueError(f"mode='{mode}' is not one of {MODES}")
        lengths = [len(r) for r in requests]
        if any(n == 0 for n in lengths):
            raise ValueError(f"request {lengths.index(0)} is empty")
        rule_obj = make_rule(rule if mode == "exit" else "none", tau=tau, m=m, min_prev=min_prev)
        n_heads = 0 if mode == "full" else len(self.heads.layers)
        n = len(requests)
        out = ScoreResult(torch.empty(n), torch.empty(n, dtype=torch.long),
                          torch.empty(n, dtype=torch.long), torch.empty(n, n_heads))
        for ids, am, idx in length_sorted_batches(requests, batch_size, self.pad_token_id):
            res = self._run(ids, am, mode, rule_obj, compact)
            out.scores[idx] = res.scores
            out.exit_layers[idx] = res.exit_layers
            out.exit_heads[idx] = res.exit_heads
            out.head_probs[idx] = res.head_probs
            out.row_layers += res.row_layers
            out.token_layers += res.token_layers
        return out

    # -- internals -----------------------------------------------------------------------------

    def _prob(self, mode: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        if mode == "full":
            return prob_yes(self.runner.answer_logits(h, self.answer_ids))
        return self.heads.prob_yes(layer, h)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mode: str,
             rule: ExitRule, compact: bool) -> ScoreResult:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        dev = self.device
        self.heads.to(dev)
        layers = [self.num_layers] if mode == "full" else list(self.heads.layers)
        b, last = input_ids.shape[0], len(layers) - 1
        probs = torch.full((b, len(layers)), float("nan"), device=dev)  # raw
        read = probs if self.calibration is None or self.rule_reads == "raw" else probs.clone()
        scores = torch.empty(b, device=dev)
        cal = self.calibration
        exit_j = torch.full((b,), -1, dtype=torch.long, device=dev)
        index = {layer: j for j, layer in enumerate(layers)}

        def visit(layer: int, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            j = index[layer]
            p = self._prob(mode, layer, h).float()
            probs[rows, j] = p
            q = p if cal is None else cal.apply(layer, p)
            if read is not probs:
                read[rows, j] = q
            fire = (torch.ones_like(p, dtype=torch.bool) if j == last
                    else rule.fires(read[rows, : j + 1]))
            scores[rows[fire]] = q[fire]
            exit_j[rows[fire]] = j
            return fire

        was = (self.model.training, self.heads.training)
        self.model.eval()
        self.heads.eval()
        try:
            with torch.inference_mode(), torch.autocast(
                    dev.type, dtype=self.autocast or torch.bfloat16,
                    enabled=self.autocast is not None):
                stats = self.runner.run(input_ids, attention_mask, layers, visit, compact)
        finally:
            self.model.train(was[0])
            self.heads.train(was[1])
        exit_layers = torch.as_tensor(layers, device=dev)[exit_j]
        if mode == "full":  # the model's own head is not one of the exit heads
            exit_j = torch.full_like(exit_j, -1)
            probs = probs[:, :0]
        return ScoreResult(scores.cpu(), exit_layers.cpu(), exit_j.cpu(), probs.cpu(),
                           stats.row_layers, stats.token_layers)
