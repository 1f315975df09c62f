"""``ExitHeadsModule``: trains exit heads on a frozen, merged CTR backbone (docs/method.md §5).

The backbone never changes: its parameters have ``requires_grad=False`` and it stays in eval mode
even when Lightning calls ``.train()``. A batch runs the backbone once, without gradient, up to
the deepest exit layer it needs (not further), and every trainable head is trained on the
last-position hidden state of its layer. Because the backbone is frozen, those states can be
kept per sample (``cache``, host memory: samples x layers x hidden floats) for later epochs, and
evaluation of samples whose states the llm stage recorded does not run the backbone again (read
from disk batch by batch, :meth:`ExitHeadsModule.add_state_store`). The head at the
model's last layer, when ``exits.layers`` holds it, is the tuned model's own head (frozen, see
``heads.py``): it is evaluated, not trained.

Loss per head (``exits.head``): ``full`` — cross-entropy over the whole vocabulary on the answer
token ("Yes" for label 1, "No" for 0; the paper's ``-log p^(l)(y|x)``); ``answer`` — cross-entropy
over the two answer logits. The training loss is the sum of the head losses; the heads share no
parameters, so each head gets exactly its own loss's gradient.

Learning rates: one optimizer (AdamW), one parameter group per trained head, lr
``exits.lr * exp(-exits.beta * d)``. ``exits.lr_depth`` sets what ``d`` counts: ``head`` (default)
— the head's index among the trained heads, 0 for the shallowest, so the shallowest head gets
``exits.lr``; ``layer`` — the exit layer number itself (``d = 5`` for a head after layer 5).

Logged scalars: ``train/loss/head_05`` and ``train/lr/head_05`` per trained head (two-digit
layer number), ``val/loss/head_05`` and ``val/auc/head_05`` (``test/...`` in the test loop) per
head, own head included (AUC only).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from gcnee.exits.heads import ExitHeads
from gcnee.llm.runner import LayerRunner

LR_DEPTHS = ("head", "layer")


def head_name(layer: int) -> str:
    """``head_05`` for the head after layer 5 (the suffix of its logged scalars)."""
    return f"head_{int(layer):02d}"


def head_learning_rates(layers: list[int], lr: float, beta: float,
                        depth: str = "head") -> dict[int, float]:
    """``{layer: lr * exp(-beta * d)}`` for trained heads at ``layers`` (see module docstring)."""
    if depth not in LR_DEPTHS:
        raise ValueError(f"exits.lr_depth='{depth}' is not one of {LR_DEPTHS}")
    return {layer: lr * math.exp(-beta * (i if depth == "head" else layer))
            for i, layer in enumerate(layers)}


class ExitHeadsModule(L.LightningModule):
    """Exit heads on a frozen backbone.

    Args:
        backbone: the merged tuned causal LM (Llama-style); frozen here.
        heads: :class:`ExitHeads` built for it.
        lr, beta: ``exits.lr``, ``exits.beta``; ``lr_depth``: ``exits.lr_depth``.
        weight_decay: AdamW weight decay.
        cache: keep each sample's backbone states after their first computation (the backbone
            is frozen, so later epochs and evaluation reuse them; memory: samples x exit
            layers x hidden floats).
        share_prefix: ``llm.share_prefix`` of the backbone's layer runner.
        max_length: ``llm.max_length``, the longest prompt (the runner checks sliding windows).

    Batches: ``{"input_ids": (B, T), "attention_mask": (B, T) left-padded, "label": (B,) 0/1}``.
    """

    def __init__(self, backbone: torch.nn.Module, heads: ExitHeads, lr: float = 1e-3,
                 beta: float = 0.1, lr_depth: str = "head", weight_decay: float = 0.0,
                 cache: bool = True, share_prefix: bool | str | None = "auto",
                 max_length: int | None = None) -> None:
        super().__init__()
        if not heads.trainable_layers:
            raise ValueError(f"exits.layers={heads.layers} has no head to train (only the "
                             "model's own last layer)")
        self.backbone = backbone.requires_grad_(False).eval()
        # The scorer's runner: heads are trained on the states they are served on.
        self.runner = LayerRunner(self.backbone, share_prefix=share_prefix,
                                  max_length=max_length)
        self.heads = heads
        self.lrs = head_learning_rates(heads.trainable_layers, float(lr), float(beta), lr_depth)
        self.weight_decay = float(weight_decay)
        # Checkpoints hold only the heads; the frozen backbone comes from the LLM stage's folder.
        self.strict_loading = False
        self.cache = bool(cache)
        self.states: dict[int, dict[int, torch.Tensor]] = {}  # sample_id -> layer -> (hidden,)
        # States recorded on disk (gcnee.llm.states.RecordedStates, memory-mapped): batches
        # of their samples read only their own rows, so no rank holds a split's states.
        self.stores: list[Any] = []
        self.backbone_batches = 0  # batches that ran the backbone (the rest came from states)
        # Every head's raw P(yes) per sample of the last validation / test loop.
        self.val_probs: dict[int, torch.Tensor] = {}
        self.test_probs: dict[int, torch.Tensor] = {}
        self.auc = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({str(layer): BinaryAUROC() for layer in heads.layers})
            for split in ("val", "test")})

    def train(self, mode: bool = True) -> ExitHeadsModule:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, whatever Lightning asks
        return self

    # ---- hidden states ----------------------------------------------------------------------
    def add_states(self, sample_ids: list[int], layers: list[int], states: torch.Tensor) -> None:
        """Remember the backbone's last-position outputs ``states`` (n, len(layers), hidden) of
        ``sample_ids``: batches of those samples then skip the backbone."""
        for row, sid in enumerate(sample_ids):
            cached = self.states.setdefault(int(sid), {})
            for j, layer in enumerate(layers):
                cached[int(layer)] = states[row, j]

    def add_state_store(self, store: Any) -> None:
        """Read the states of ``store``'s samples from it (a
        :class:`gcnee.llm.states.RecordedStates`: ``rows(ids, layers)`` -> ``(B, len(layers),
        hidden)`` or None) instead of running the backbone; rows are read per batch."""
        self.stores.append(store)

    def hidden(self, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
        """Last-position hidden states ``{layer: (B, hidden)}`` from the frozen backbone.

        The backbone never changes, so each sample's states are computed once (``cache``),
        taken from :meth:`add_states` or read from a store (:meth:`add_state_store`: the llm
        stage's evaluation pass over the same prompts).
        """
        ids = batch["sample_id"].tolist() if "sample_id" in batch else None
        dev = batch["input_ids"].device
        if ids is not None and all(all(x in self.states.get(s, ()) for x in layers)
                                   for s in ids):
            return {x: torch.stack([self.states[s][x] for s in ids]).to(dev) for x in layers}
        for store in self.stores if ids is not None else ():
            rows = store.rows(ids, layers)
            if rows is not None:
                return {x: rows[:, j].to(dev) for j, x in enumerate(layers)}
        out = self.runner.states(batch["input_ids"], batch["attention_mask"], layers)
        out = {x: h.contiguous() for x, h in out.items()}  # not views: frees the full states
        if ids is not None and self.cache:
            self.add_states(ids, list(out), torch.stack([out[x] for x in out], dim=1).cpu())
        self.backbone_batches += 1
        return out

    def head_loss(self, layer: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head at ``layer`` on the answer token, ``h`` (B, hidden)."""
        logits = self.heads.train_logits(layer, h).float()
        idx = 1 - labels.long()  # 0 = yes, 1 = no
        target = self.heads.answer_ids[idx] if self.heads.head_kind == "full" else idx
        return F.cross_entropy(logits, target)

    def head_losses(self, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{layer: loss}`` for every trained head on ``batch``."""
        hs = self.hidden(batch, self.heads.trainable_layers)
        return {layer: self.head_loss(layer, hs[layer], batch["label"]) for layer in hs}

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.head_losses(batch)
        bs = batch["input_ids"].shape[0]
        groups = ({g["name"]: g for g in self.trainer.optimizers[0].param_groups}
                  if self._trainer is not None and self.trainer.optimizers else {})
        for layer, loss in losses.items():
            name = head_name(layer)
            self.log(f"train/loss/{name}", loss, on_step=True, on_epoch=True, batch_size=bs)
            if name in groups:
                self.log(f"train/lr/{name}", groups[name]["lr"], on_step=True, batch_size=bs)
        return torch.stack(list(losses.values())).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.heads.head_parameters(layer), "lr": lr,
                   "name": head_name(layer)} for layer, lr in self.lrs.items()]
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("backbone.")}

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        hs = self.hidden(batch, self.heads.layers)
        labels = batch["label"].long()
        bs = labels.shape[0]
        probs = []
        for layer, h in hs.items():
            name = head_name(layer)
            metric = self.auc[split][str(layer)]
            p = self.heads.prob_yes(layer, h)
            probs.append(p)
            metric.update(p, labels)
            self.log(f"{split}/auc/{name}", metric, on_step=False, on_epoch=True, batch_size=bs)
            if not self.heads.is_own_head(layer):
                self.log(f"{split}/loss/{name}", self.head_loss(layer, h, labels),
                         on_step=False, on_epoch=True, batch_size=bs)
        if "sample_id" in batch:
            # Every head's raw P(yes) per sample: calibration is fitted on the validation ones,
            # and the threshold sweep replays its rules on both instead of running a second
            # all-heads pass.
            rows = torch.stack(probs, dim=1).float().cpu()
            kept = self.test_probs if split == "test" else self.val_probs
            for sid, row in zip(batch["sample_id"].tolist(), rows):
                kept[int(sid)] = row

    def on_validation_epoch_start(self) -> None:
        self.val_probs: dict[int, torch.Tensor] = {}  # sample_id -> (H,) P(yes) per head

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_test_epoch_start(self) -> None:
        self.test_probs: dict[int, torch.Tensor] = {}  # sample_id -> (H,) P(yes) per head

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)
