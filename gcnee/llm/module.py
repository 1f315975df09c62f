"""``CTRLLMModule``: LoRA tuning of a causal LM to answer Yes/No, scored by the two answer logits.

The prompt's token ids end exactly where the answer token starts and batches are left-padded,
so the answer is predicted at the last position of every row: only that position's logits are
computed (``logits_to_keep=1``). Position ids are derived from the attention mask, so a prompt
gets the same score alone or left-padded in any batch.

Score (:mod:`gcnee.llm.answer`): ``P(yes) = softmax([s_yes, s_no])[0]`` at the last position.
Validation and test scoring run through :class:`gcnee.llm.runner.LayerRunner`, which also
records the exit layers' states for the exit stage; training uses the Hugging Face forward. Loss
(``llm.loss``): ``vocab`` = cross-entropy over the whole vocabulary on the answer token ("Yes"
for label 1, "No" for 0; the paper's loss), or ``binary`` = cross-entropy over the two answer
logits only (only those two rows of the output head are multiplied). Scoring always reads the
two answer rows in float32.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from gcnee.distributed import all_gather_objects
from gcnee.llm.answer import prob_yes
from gcnee.llm.batch import check_left_padded, positions_from_mask
from gcnee.llm.runner import LayerRunner
from gcnee.llm.shared_prefix import (
    gradient_checkpointing_active,
    last_hidden_with_shared_prefix,
    resolve_share_prefix,
    shared_prefix_length,
)
from gcnee.llm.states import ShardWriter
from gcnee.precision import float32_linear

LOSSES = ("vocab", "binary")


def last_position_hidden(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor,
                         share_prefix: bool | str | None = "auto") -> torch.Tensor:
    """The decoder's output (after its final norm) ``(B, hidden)`` at the last position of
    left-padded ``input_ids`` (B, T), under whatever autocast is active.

    Position ids count only real tokens (pads get 0), so left padding does not shift them.
    ``share_prefix`` (``llm.share_prefix``: true, false, auto = on CPU): run the prompt prefix
    that all rows share once (:mod:`gcnee.llm.shared_prefix`; same output up to float rounding).
    Raises ``ValueError`` unless the mask is contiguous left padding.
    """
    check_left_padded(attention_mask)  # right padding or holes: the last position is not real
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The decoder stack (LoRA layers included: peft injects them into its modules), final norm.
    decoder = base.model
    prefix = 0
    if (resolve_share_prefix(share_prefix, input_ids.device)
            and not gradient_checkpointing_active(decoder)):
        prefix = shared_prefix_length(input_ids, attention_mask)
    if prefix:
        return last_hidden_with_shared_prefix(decoder, input_ids, attention_mask, prefix)
    return decoder(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask),
                   use_cache=False).last_hidden_state[:, -1]


def head_logits(model: torch.nn.Module, hidden: torch.Tensor,
                rows: list[int] | None = None) -> torch.Tensor:
    """Float32 logits of the output head on ``hidden`` (B, hidden): all of the vocabulary
    (B, V), or only the token ids ``rows`` (B, len(rows)) — the two answer rows for scoring and
    the binary loss, so no (B, V) matrix is built (V = 152k for Qwen2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if rows is None:
        return float32_linear(hidden, head.weight, head.bias)
    bias = None if head.bias is None else head.bias[rows]
    return float32_linear(hidden, head.weight[rows], bias)


def last_position_logits(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor,
                         share_prefix: bool | str | None = "auto") -> torch.Tensor:
    """Float32 vocabulary logits (B, V) at the last position of left-padded ``input_ids``
    (B, T) (:func:`last_position_hidden`, then the output head in float32:
    :func:`gcnee.precision.float32_linear`)."""
    return head_logits(model, last_position_hidden(model, input_ids, attention_mask,
                                                   share_prefix))


def answer_logits(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """The (B, 2) float32 logits of [yes, no] taken from last-position logits (B, V)."""
    return logits[:, [yes_id, no_id]].float()


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P(yes) (B,) = two-way softmax over the answer logits of last-position logits (B, V)."""
    return prob_yes(answer_logits(logits, yes_id, no_id))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int,
                kind: str = "vocab") -> torch.Tensor:
    """Mean cross-entropy on the answer token; ``labels`` (B,) in {0, 1}.

    ``logits``: last-position logits (B, V); for ``kind="binary"`` also the (B, 2) [yes, no]
    answer logits alone (what training computes: :func:`head_logits` with two rows).
    """
    if kind == "vocab":
        target = torch.where(labels == 1, yes_id, no_id)
        return F.cross_entropy(logits.float(), target)
    if kind == "binary":
        pair = logits.float() if logits.shape[-1] == 2 else answer_logits(logits, yes_id, no_id)
        return F.cross_entropy(pair, 1 - labels.long())
    raise ValueError(f"llm.loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def add_lora(model: torch.nn.Module, lora_cfg: DictConfig) -> torch.nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (``llm.lora.*``); the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(lora_cfg.r), lora_alpha=int(lora_cfg.alpha),
                        lora_dropout=float(lora_cfg.dropout),
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class CTRLLMModule(L.LightningModule):
    """LoRA-tuned causal LM scoring CTR prompts by P(yes).

    Args:
        model: a causal LM (already quantized + ``prepare_for_kbit`` if QLoRA is wanted).
        yes_id, no_id: the answer tokens' ids (``gcnee.llm.backbone.answer_token_ids``).
        llm_cfg: the ``llm`` config section (loss, lora, lr, weight_decay, warmup_ratio).
        lora: wrap ``model`` with new LoRA adapters (False: ``model`` is used as given, e.g. an
            already-loaded ``PeftModel``).

    After ``trainer.validate``/``trainer.test``, ``results[split]`` holds the per-sample
    ``sample_id``, ``score`` and ``label`` arrays (gathered over ranks, sorted by sample_id), and
    metrics are logged as ``<tag>/<split>_{auc,log_loss,accuracy}`` (``tag`` is an attribute:
    "untuned" before training, "tuned" after).
    """

    def __init__(self, model: torch.nn.Module, yes_id: int, no_id: int, llm_cfg: DictConfig,
                 *, lora: bool = True) -> None:
        super().__init__()
        if llm_cfg.loss not in LOSSES:
            raise ValueError(f"llm.loss must be one of {', '.join(LOSSES)}, got {llm_cfg.loss!r}")
        self.model = add_lora(model, llm_cfg.lora) if lora else model
        # Scoring and state recording run the decoder layer by layer, as the exit scorer does
        # (same code, so the exit heads are trained on the states they are served on); the
        # training forward is Hugging Face's (gradients through the adapters).
        self.runner = LayerRunner(self.model, share_prefix=llm_cfg.get("share_prefix", "auto"),
                                  max_length=llm_cfg.get("max_length"))
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.loss_kind = str(llm_cfg.loss)
        self.share_prefix = llm_cfg.get("share_prefix", "auto")
        self.lr, self.weight_decay = float(llm_cfg.lr), float(llm_cfg.weight_decay)
        self.warmup_ratio = float(llm_cfg.warmup_ratio)
        self.tag = "tuned"
        self.lora_merged = False  # True while evaluation runs on merged weights
        self._unmerged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base comes from disk.
        self.strict_loading = False
        self.eval_metrics = torch.nn.ModuleDict({
            split: MetricCollection({"auc": BinaryAUROC(), "accuracy": BinaryAccuracy()})
            for split in ("val", "test")})
        self.eval_logloss = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self._outputs: dict[str, list[tuple]] = {"val": [], "test": []}
        self.results: dict[str, dict[str, np.ndarray]] = {}
        # Decoder layers whose last-position outputs evaluation records ((n, len(record_layers),
        # hidden) per split, see record_dir): the exit stage trains and evaluates its heads on
        # them instead of running the backbone over the same prompts again.
        self.record_layers: list[int] = []
        # Where each rank writes its recorded states while evaluation runs (gcnee.llm.states:
        # one shard per rank and split, merged by the llm stage); None keeps them in this
        # process as ``results[split]["hidden"]`` (one process only). Never gathered.
        self.record_dir: Path | None = None
        self._recorders: dict[str, ShardWriter | list[tuple]] = {}

    # ---- scoring --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, V) for left-padded prompts (B, T)."""
        return last_position_logits(self.model, input_ids, attention_mask, self.share_prefix)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the backbone."""
        return self.runner.num_layers

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """P(yes) ``(B,)`` float32 of left-padded prompts ``(B, T)`` (the layer runner)."""
        return self.score_and_record(input_ids, attention_mask)[0]

    @torch.no_grad()
    def score_and_record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         record: list[int] | None = None
                         ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """P(yes) ``(B,)`` float32 of left-padded prompts ``(B, T)`` through the layer runner,
        and the last-position outputs ``{layer: (B, hidden)}`` of the decoder layers in
        ``record`` (raw layer outputs, as the exit heads receive them)."""
        answer = torch.tensor([self.yes_id, self.no_id])
        n = self.runner.num_layers
        seen: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        def visit(layer: int, h: torch.Tensor, rows: torch.Tensor) -> None:
            if layer in (record or ()):
                seen[layer] = h
            if layer == n:
                out["p"] = prob_yes(self.runner.answer_logits(h, answer))

        self.runner.run(input_ids, attention_mask, sorted({*(record or ()), n}), visit)
        return out["p"], seen

    # ---- training -------------------------------------------------------------------------
    def training_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> torch.Tensor:
        """What the loss reads (float32): vocabulary logits (B, V) for ``llm.loss=vocab``, the
        [yes, no] logits (B, 2) for ``binary`` (two head rows, no vocabulary projection)."""
        hidden = last_position_hidden(self.model, input_ids, attention_mask, self.share_prefix)
        rows = [self.yes_id, self.no_id] if self.loss_kind == "binary" else None
        return head_logits(self.model, hidden, rows)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.training_logits(batch["input_ids"], batch["attention_mask"])
        loss = answer_loss(logits, batch["label"], self.yes_id, self.no_id, self.loss_kind)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def on_fit_start(self) -> None:
        # from_pretrained returns the backbone in eval mode and Lightning keeps submodule modes:
        # train like peft does (LoRA dropout and any backbone dropout active).
        self.train()

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check llm.lora.target_modules")
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.warmup_ratio * total))

        def factor(step: int) -> float:  # linear warmup to lr, then linear decay to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep}

    # ---- evaluation -----------------------------------------------------------------------
    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        probs, seen = self.score_and_record(batch["input_ids"], batch["attention_mask"],
                                            self.record_layers)
        labels = batch["label"]
        self.eval_metrics[split].update(probs, labels)
        self.eval_logloss[split].update(
            F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels.float(),
                                   reduction="none"))
        ids = batch["sample_id"].cpu().numpy()
        if self.record_layers:
            hidden = torch.stack([seen[x] for x in self.record_layers], dim=1).float().cpu()
            if split not in self._recorders:
                self._start_recording(split)
            rec = self._recorders[split]
            if isinstance(rec, ShardWriter):
                rec.add(ids, hidden.numpy())
            else:
                rec.append((ids, hidden.numpy()))
        # Only these small per-sample arrays are gathered across ranks at the loop's end.
        self._outputs[split].append((ids, probs.float().cpu().numpy(), labels.cpu().numpy()))

    def _start_recording(self, split: str) -> None:
        self._recorders.pop(split, None)
        if self.record_layers:
            self._recorders[split] = (ShardWriter(self.record_dir, split, self.global_rank)
                                      if self.record_dir is not None else [])

    def on_validation_epoch_start(self) -> None:
        self._start_recording("val")

    def on_test_epoch_start(self) -> None:
        self._start_recording("test")

    def _merge_lora(self, merge: bool) -> None:
        # On the CPU evaluation runs on the merged weights W + s·BA: the unmerged adapter path
        # adds two small matmuls, dtype casts and an add to each adapted projection (about a
        # tenth of a bf16 scoring pass on the development CPU). Unmerging would subtract s·BA
        # again, and W + Δ − Δ != W in floating point (every evaluation would shift the weights
        # training continues from), so the exact original weights are kept and copied back.
        # On CUDA the adapter path is cheap and a copy of every adapted weight is not: no merge.
        # Quantized bases keep the unmerged path (merging into 4/8-bit weights is lossy).
        tuner = getattr(self.model, "base_model", None)
        if not hasattr(tuner, "merge_adapter") or getattr(tuner.model, "hf_quantizer", None):
            return
        if merge and not self.lora_merged:
            if next(self.model.parameters()).device.type != "cpu":
                return
            self._unmerged = [(p, p.detach().clone()) for p in _adapted_weights(self.model)]
            tuner.merge_adapter()
            self.lora_merged = True
        elif not merge and self.lora_merged:
            tuner.unmerge_adapter()
            with torch.no_grad():
                for param, original in self._unmerged:
                    param.copy_(original)
            self._unmerged = []
            self.lora_merged = False

    def on_validation_start(self) -> None:
        self._merge_lora(True)

    def on_validation_end(self) -> None:
        self._merge_lora(False)

    def on_test_start(self) -> None:
        self._merge_lora(True)

    def on_test_end(self) -> None:
        self._merge_lora(False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_end(self, split: str) -> None:
        values = self.eval_metrics[split].compute()  # synced over ranks by torchmetrics
        logloss = self.eval_logloss[split].compute()
        self.eval_metrics[split].reset()
        self.eval_logloss[split].reset()
        self.log_dict({f"{self.tag}/{split}_auc": values["auc"].float(),
                       f"{self.tag}/{split}_accuracy": values["accuracy"].float(),
                       f"{self.tag}/{split}_log_loss": logloss.float()}, sync_dist=False)
        if self.record_layers and split not in self._recorders:
            self._start_recording(split)  # a loop run without its epoch-start hook
        rec = self._recorders.pop(split, None)
        if isinstance(rec, ShardWriter):
            # Closed before the gather below: once that collective returns, every rank's
            # shard is complete and rank 0 may merge them.
            rec.close()
        local = self._outputs[split]
        self._outputs[split] = []
        gathered = all_gather_objects(local)
        parts = [p for rank in gathered for p in rank]
        if parts:
            ids, scores, labels = (np.concatenate([p[i] for p in parts]) for i in range(3))
        else:
            ids, scores, labels = np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
        ids, first = np.unique(ids, return_index=True)  # sorted; no duplicates expected
        self.results[split] = {"sample_id": ids, "score": scores[first],
                               "label": labels[first]}
        if isinstance(rec, list) and rec:
            if len(gathered) > 1:
                raise RuntimeError("recording states under DDP needs CTRLLMModule.record_dir "
                                   "(each rank writes its own shard)")
            self.results[split]["hidden"] = np.concatenate([h for _, h in rec])[first]

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ---- export ---------------------------------------------------------------------------
    def save_adapter(self, folder: str | Path) -> Path:
        """Save the LoRA adapter with peft's ``save_pretrained`` (replaces ``folder``)."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        _replace_dir(tmp, folder)
        return folder

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's state dict with the LoRA weights merged in, on the CPU, under the
        base model's own names (this module is unchanged; no second model is built).

        Each adapted weight is ``W + s·BA`` computed in float32 and stored in ``W``'s dtype;
        every other tensor is the base's own (tied tensors stay shared).
        """
        from peft.tuners.lora import LoraLayer

        if getattr(getattr(self.model, "base_model", None), "model", None) is None:
            raise TypeError("merged_state_dict needs a peft-wrapped model")
        if self.lora_merged:
            raise RuntimeError("the adapter is merged in for evaluation: merge after it ends")
        base = self.model.get_base_model()
        if getattr(base, "hf_quantizer", None) is not None:
            raise ValueError("a quantized base is not merged (it would be re-quantized): the "
                             "adapter is served on the quantized base instead")
        merged: dict[int, torch.Tensor] = {}  # keyed by storage: tied weights stay one tensor
        deltas = {}
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
                deltas[f"{name}.weight"] = (weight, delta)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, tensor in base.state_dict().items():
                if ".lora_" in key:
                    continue
                name = key.replace(".base_layer.", ".")
                if name in deltas:
                    weight, delta = deltas[name]
                    out[name] = (weight.float() + delta).to(weight.dtype).cpu()
                else:
                    ptr = tensor.data_ptr()
                    if ptr not in merged:
                        merged[ptr] = tensor.detach().cpu()
                    out[name] = merged[ptr]
        return out

    def merged_model(self) -> torch.nn.Module:
        """A plain (not peft) copy of the backbone with the LoRA weights merged in, on the CPU
        (for tests and small models; :meth:`save_merged` writes without building it)."""
        base = self.model.get_base_model()
        state = self.merged_state_dict()
        model = type(base)(copy.deepcopy(base.config))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        return model.to(next(iter(state.values())).dtype).eval()

    def save_merged(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """Save the merged model (and tokenizer) as a plain HF folder for the exit stage,
        written from :meth:`merged_state_dict` (no copy of the model on its device)."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        base = self.model.get_base_model()
        base.save_pretrained(tmp, state_dict=self.merged_state_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, folder)
        return folder


def _adapted_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The base weights that peft's LoRA layers of ``model`` merge into."""
    from peft.tuners.lora import LoraLayer

    return [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]
