"""The ``exits`` stage: train exit heads on the frozen tuned model, calibrate them on validation,
then sweep the exit rules.

Reads the merged tuned model of the ``llm`` stage (``checkpoints/<run>/llm/merged``) and the same
tokenized prompts (``CTRDataModule``; its token cache in the llm stage folder is reused, or, with
``exits.max_train_samples`` beyond the LLM's few-shot set or ``exits.val_samples``, one of its
own here). Trains the heads
with ``ExitHeadsModule`` (one optimizer, one parameter group per head, depth-decayed learning
rates; resumes from ``ckpt/last.ckpt``), validates each head, fits the per-head calibration
(``exits.calibration``) on every head's validation P(yes), then runs the test loop with
:class:`ThresholdSweepCallback`: AUC, measured RPS and exit layers for every rule, with and
without calibration, and the setting chosen on validation (:mod:`gcnee.exits.sweep`). Outputs
in ``checkpoints/<run>/exits/``: ``heads.pt`` (head weights, layers, answer ids, calibration),
``head_probs{,_val}.pt``, ``sweep.{csv,json,md}``, ``sweep_*.png``, ``summary.json``.
TensorBoard: ``logs/<run>/exits/`` (``train/loss/head_05``, ...).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

import gcnee.llm.stage  # noqa: F401  (registers "llm" and its upstream stages first)
from gcnee.config import TRAINER_RESULT_KEYS
from gcnee.distributed import all_gather_objects
from gcnee.exits.heads import ExitHeads, save_heads
from gcnee.llm.backbone import load_tuned
from gcnee.stages import StageContext, StageError, register, write_json
from gcnee.training import checkpoint_step, resumable_checkpoint, trainer_from_config


def build_exit_trainer(cfg: DictConfig, *, fit: bool, logger: Any = None,
                       callbacks: list[Any] | None = None) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` with the exit stage's epochs.

    Lightning's distributed sampler is off: ``CTRDataModule`` shards evaluation itself.
    """
    return trainer_from_config(cfg.trainer, max_epochs=int(cfg.exits.epochs) if fit else None,
                               logger=logger, callbacks=callbacks,
                               use_distributed_sampler=False)


def load_llm_states(module: Any, llm_dir: Path, layers: list[int]) -> dict[str, int]:
    """Give ``module`` the tuned model's exit-layer states that the llm stage recorded while
    scoring the validation and test prompts (``llm/hidden_{val,test}.{npy,json}``, or a run's
    older ``hidden_{val,test}.pt``), when they cover every exit layer; ``{split: samples}``
    reused. They were recorded by the same layer runner the scorer uses
    (:mod:`gcnee.llm.runner`), on the LoRA-merged weights this stage loads. They stay on disk,
    memory-mapped (:class:`gcnee.llm.states.RecordedStates`): each rank reads the rows of the
    batches it evaluates, nothing more."""
    from gcnee.llm.states import RecordedStates

    reused = {}
    for split in ("val", "test"):
        store = RecordedStates.open(llm_dir, split)
        if store is None or not store.covers(layers):
            continue
        module.add_state_store(store)
        reused[split] = len(store)
    return reused


def fit_calibration(module: Any, val_ids: list[int], val_labels: list[int], layers: list[int],
                    kind: str, seed: int) -> Any:
    """Per-head calibration (``exits.calibration``) fitted on every head's raw validation
    P(yes), as the module's validation loop recorded them; None for ``none``."""
    from gcnee.exits.calibration import Calibration

    # Under DDP each rank validated a shard: every rank gets all of them (n x heads floats).
    for part in all_gather_objects(module.val_probs):
        module.val_probs.update(part)
    if kind == "none":
        return None
    missing = [s for s in val_ids if int(s) not in module.val_probs]
    if missing:
        raise StageError(f"exit heads: {len(missing)} validation samples have no recorded head "
                         "probabilities; cannot fit the calibration")
    probs = torch.stack([module.val_probs[int(s)] for s in val_ids])
    return Calibration.fit(probs, np.asarray(val_labels), layers, kind=kind, seed=seed)


# The eval keys that change this stage's outputs (not eval.ablations: those are the report's).
EXIT_EVAL_KEYS = [f"eval.{k}" for k in (
    "max_samples", "val_max_samples", "batch_size", "rule", "thresholds", "windows",
    "window_min_prev", "threshold", "window", "rps_samples", "bootstrap", "sweep_rules",
    "confidence_thresholds", "patience_windows", "rule_reads", "max_auc_loss", "rps_repeats",
    "sweep_rule_reads")]


@register("exits", config_keys=["exits", *EXIT_EVAL_KEYS, "run.seed", *TRAINER_RESULT_KEYS],
          requires=["llm"], distributed=True,
          help="train exit heads on the frozen tuned model; AUC/RPS sweep over exit thresholds")
def run(ctx: StageContext) -> dict[str, Any]:
    from gcnee.exits.module import ExitHeadsModule
    from gcnee.exits.sweep import ThresholdSweepCallback
    from gcnee.llm.backbone import answer_token_ids
    from gcnee.llm.datamodule import CTRDataModule

    cfg = ctx.cfg
    seconds: dict[str, float] = {}
    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    llm_dir = ctx.input_dir("llm")
    t0 = time.time()
    model, tokenizer = load_tuned(llm_dir, cfg)
    answer_ids = answer_token_ids(tokenizer, list(cfg.llm.answer_words),
                                  cfg.llm.use_chat_template)
    heads = ExitHeads.from_model(model, list(cfg.exits.layers), answer_ids,
                                 head=cfg.exits.head, init=cfg.exits.init)
    # The head-training batch size is the exit stage's own; everything else as the llm stage.
    # More training samples than the LLM's need prompts of their own: that token cache lives
    # here (the llm stage's is reused otherwise).
    dm_cfg = cfg.copy()
    dm_cfg.llm.batch_size = int(cfg.exits.batch_size)
    extra, val_n = cfg.exits.max_train_samples, cfg.exits.val_samples
    if val_n is not None:
        dm_cfg.eval.val_max_samples = int(val_n)
    own_prompts = extra is not None or val_n is not None
    dm = CTRDataModule(dm_cfg, ctx.input_dir("data"), ctx.input_dir("retriever"),
                       ctx.out_dir if own_prompts else llm_dir, tokenizer,
                       train_samples=extra)
    dm.prepare_data()
    dm.setup()
    seconds["load"] = time.time() - t0

    # Training samples' states are kept in host memory only when a later epoch reads them
    # again (training samples x trained heads x hidden float32 per rank: 1.6 GB for 16k
    # samples of a 4096-wide model at 6 heads); validation/test states come from the llm stage.
    module = ExitHeadsModule(model, heads, lr=float(cfg.exits.lr), beta=float(cfg.exits.beta),
                             lr_depth=cfg.exits.lr_depth, cache=int(cfg.exits.epochs) > 1,
                             share_prefix=cfg.llm.get("share_prefix", "auto"),
                             max_length=int(cfg.llm.max_length))
    reused = load_llm_states(module, llm_dir, heads.layers)
    logger = TensorBoardLogger(save_dir=str(ctx.log_dir), name="", version="",
                               default_hp_metric=False)
    checkpoint, resume = resumable_checkpoint(ctx, cfg.trainer.checkpoint_every_n_steps)
    t0 = time.time()
    trainer = build_exit_trainer(cfg, fit=True, logger=logger, callbacks=[checkpoint])
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")
    val = dm.datasets["val"]
    if (not any(k.startswith("val/") for k in trainer.callback_metrics)
            or any(int(s) not in module.val_probs for s in val.sample_ids)):
        trainer.validate(module, datamodule=dm, verbose=False)  # resumed after the last epoch
    seconds["train"] = time.time() - t0

    t0 = time.time()
    calibration = fit_calibration(module, val.sample_ids, val.labels, heads.layers,
                                  str(cfg.exits.calibration), int(cfg.run.seed))
    seconds["calibration"] = time.time() - t0
    t0 = time.time()
    test = dm.datasets["test"]
    sweep = ThresholdSweepCallback(test.input_ids, test.labels, cfg.eval, ctx.out_dir,
                                   seed=int(cfg.run.seed), sample_ids=test.sample_ids,
                                   share_prefix=cfg.llm.get("share_prefix", "auto"),
                                   val_ids=val.sample_ids, val_labels=val.labels,
                                   calibration=calibration,
                                   calibration_kind=str(cfg.exits.calibration))
    tester = build_exit_trainer(cfg, fit=False, logger=logger, callbacks=[sweep])
    metrics = tester.test(module, datamodule=dm, verbose=False)[0]
    seconds["test_and_sweep"] = time.time() - t0
    summary: dict[str, Any] = {
        "layers": heads.layers,
        "train_samples": len(dm.datasets["train"]),
        "val_samples": len(dm.datasets["val"]),
        "learning_rates": {str(k): v for k, v in module.lrs.items()},
        "resumed_from_step": checkpoint_step(resume),
        "states_from_llm_stage": reused,
        "backbone_batches": module.backbone_batches,
        "global_step": int(trainer.global_step),
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "test": {k: float(v) for k, v in metrics.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if trainer.is_global_zero:
        save_heads(ctx.out_dir / "heads.pt", heads, cfg.exits.head, cfg.exits.init,
                   calibration=calibration)
        summary["calibration"] = calibration.summary() if calibration is not None else None
        if sweep.result is not None:
            summary["sweep"] = [{k: r[k] for k in ("row", "auc", "auc_lo", "auc_hi", "rps",
                                                   "speedup", "mean_exit_layer")}
                                for r in sweep.result["rows"]]
            summary["chosen"] = sweep.result["chosen"]
        write_json(ctx.out_dir / "summary.json", summary)
    return summary
