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
logits only.
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


def last_position_logits(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor,
                         share_prefix: bool | str | None = "auto") -> torch.Tensor:
    """Float32 logits (B, V) at the last position of left-padded ``input_ids`` (B, T).

    Position ids count only real tokens (pads get 0), so left padding does not shift them. The
    decoder runs under whatever autocast is active; the output head in float32
    (:func:`gcnee.precision.float32_linear`). ``share_prefix`` (``llm.share_prefix``: true,
    false, auto = on CPU): run the prompt prefix that all rows share once
    (:mod:`gcnee.llm.shared_prefix`; same logits up to float rounding).
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
        last = last_hidden_with_shared_prefix(decoder, input_ids, attention_mask, prefix)
    else:
        last = decoder(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions_from_mask(attention_mask),
                       use_cache=False).last_hidden_state[:, -1]
    head = base.get_output_embeddings()
    return float32_linear(last, head.weight, head.bias)


def answer_logits(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """The (B, 2) float32 logits of [yes, no] taken from last-position logits (B, V)."""
    return logits[:, [yes_id, no_id]].float()


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P(yes) (B,) = two-way softmax over the answer logits of last-position logits (B, V)."""
    return prob_yes(answer_logits(logits, yes_id, no_id))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int,
                kind: str = "vocab") -> torch.Tensor:
    """Mean cross-entropy on the answer token; ``logits`` (B, V), ``labels`` (B,) in {0, 1}."""
    if kind == "vocab":
        target = torch.where(labels == 1, yes_id, no_id)
        return F.cross_entropy(logits.float(), target)
    if kind == "binary":
        return F.cross_entropy(answer_logits(logits, yes_id, no_id), 1 - labels.long())
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
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
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
        # Evaluation runs on the merged weights W + s·BA: the unmerged adapter path adds two
        # small matmuls, dtype casts and an add to each of the 7 x 30 adapted projections
        # (about a tenth of a bf16 scoring pass on the development CPU). Quantized bases keep
        # the unmerged path (merging into 4/8-bit weights is lossy).
        tuner = getattr(self.model, "base_model", None)
        if not hasattr(tuner, "merge_adapter") or getattr(tuner.model, "hf_quantizer", None):
            return
        if merge and not self.lora_merged:
            tuner.merge_adapter()
        elif not merge and self.lora_merged:
            tuner.unmerge_adapter()
        self.lora_merged = merge

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

    def merged_model(self) -> torch.nn.Module:
        """A copy of the backbone with the LoRA weights merged in (this module is unchanged)."""
        return copy.deepcopy(self.model).merge_and_unload()

    def save_merged(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """Save the merged model (and tokenizer) as a plain HF folder for the exit stage."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        merged = self.merged_model()
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        del merged
        _replace_dir(tmp, folder)
        return folder
