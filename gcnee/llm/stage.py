"""The ``llm`` stage: LoRA-tune the CTR language model and report it beside simple scorers.

Order: load backbone -> build/load the token cache (``CTRDataModule``) -> score the UNTUNED model
on the validation and test subsets (cached per prompt set, so reruns that only change training
settings skip it) -> simple scorers (train item-mean, history-mean) on the same samples -> LoRA
training (resumes from ``ckpt/last.ckpt`` of the same configuration) -> score the tuned model ->
save the adapter (``adapter/``, peft format) and, unless the base is quantized, a merged copy
(``merged/``, plain HF folder with tokenizer, read by the exit stage; a quantized run serves the
adapter on its quantized base: ``gcnee.llm.backbone.load_tuned``) -> ``scores_{val,test}.csv``
(one row per sample) and ``summary.json`` (AUC with 95% bootstrap CI per scorer, log-loss,
accuracy, truncations, seconds).
TensorBoard: ``logs/<run>/llm/``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

import gcnee.retrieval.stage  # noqa: F401  (registers "data" and "retriever" first)
from gcnee.config import TRAINER_RESULT_KEYS
from gcnee.distributed import is_global_zero
from gcnee.llm.datamodule import EVAL_SPLITS, CTRDataModule
from gcnee.metrics import summarize
from gcnee.simple_scorers import SCORERS, score_simple
from gcnee.stages import StageContext, read_json, register, write_json
from gcnee.training import checkpoint_step, resumable_checkpoint, trainer_from_config

PROB_SCORERS = ("tuned", "untuned")


def build_trainer(cfg: DictConfig, *, fit: bool, logger: Any = None,
                  callbacks: list[Any] | None = None) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` (+ ``llm`` epochs/steps when ``fit``).

    Fitting never validates (validation is run explicitly before and after), and Lightning's
    distributed sampler is off: ``CTRDataModule`` shards evaluation itself without duplicates.
    """
    extra: dict[str, Any] = {}
    if fit:
        extra = dict(max_steps=int(cfg.llm.max_steps), limit_val_batches=0,
                     accumulate_grad_batches=int(cfg.llm.accumulate_grad_batches))
    return trainer_from_config(cfg.trainer, max_epochs=int(cfg.llm.epochs) if fit else None,
                               logger=logger, callbacks=callbacks, enable_model_summary=fit,
                               use_distributed_sampler=False, **extra)


# Where every rank writes its shard of the recorded states during the tuned evaluation (in the
# stage folder, so on the filesystem all nodes share); merged and removed by rank 0.
STATE_SHARDS = "states.tmp"


def exit_layers_to_record(cfg: DictConfig, num_layers: int) -> list[int]:
    """``exits.layers`` that exist in a model of ``num_layers`` decoder layers (the exit stage
    validates them itself)."""
    return sorted({int(x) for x in cfg.exits.layers if 1 <= int(x) <= num_layers})


def save_hidden(out_dir: Path, split: str, shards: Path, layers: list[int],
                world: int) -> Path | None:
    """Merge the ``world`` ranks' shards (``shards``) of ``split``'s recorded exit-layer states
    into ``out_dir/hidden_<split>.{npy,json}`` for the exit stage: ``(n, len(layers), hidden)``
    float32 in ascending sample-id order, a bounded chunk in memory at a time
    (:func:`gcnee.llm.states.merge_shards`). With no layer recorded, an earlier run's states are
    removed, so the exit stage never reads another model's. Returns the index path or None."""
    from gcnee.llm.states import clear, merge_shards

    if not layers:
        clear(out_dir, split)
        return None
    return merge_shards(shards, split, layers, out_dir, world)


def _evaluate(trainer: L.Trainer, module: Any, dm: CTRDataModule) -> dict[str, dict]:
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return {s: {k: v.tolist() for k, v in module.results[s].items() if k != "hidden"}
            for s in EVAL_SPLITS}


def _untuned_cache(ctx: StageContext, dm: CTRDataModule) -> Path:
    cfg = ctx.cfg
    key = f"{dm.cache_path().stem}-{cfg.llm.quantization}-{cfg.trainer.precision}"
    n = cfg.eval.get("untuned_max_samples")
    return ctx.out_dir / f"untuned-{key}{'' if n is None else f'-n{int(n)}'}.json"


def _check_alignment(split: str, got: dict[str, list], ids: np.ndarray) -> np.ndarray:
    sid = np.asarray(got["sample_id"])
    if not np.array_equal(sid, ids):
        raise RuntimeError(f"{split}: scored samples differ from the split's samples "
                           f"({len(sid)} scored, {len(ids)} expected)")
    return np.asarray(got["score"], dtype=np.float64)


def _spread(split: str, got: dict[str, list], ids: np.ndarray, expected: np.ndarray
            ) -> np.ndarray:
    """Scores of the samples ``expected`` (a subset of ``ids``, both sorted) placed at their
    rows of ``ids``; NaN elsewhere (samples that scorer was not run on)."""
    scores = _check_alignment(split, got, expected)
    out = np.full(len(ids), np.nan)
    out[np.searchsorted(ids, expected)] = scores
    return out


def _summaries(labels: np.ndarray, cols: dict[str, np.ndarray], n_boot: int, seed: int
               ) -> dict[str, dict[str, float]]:
    """Per scorer: :func:`gcnee.metrics.summarize` on the samples it scored; a scorer run on a
    subset (the untuned model) also gets the tuned model's AUC on that subset and the paired
    bootstrap CI of tuned minus it (``tuned_minus_auc``, ``_lo``, ``_hi``)."""
    from gcnee.metrics import auc, auc_diff_ci

    out = {}
    for name, c in cols.items():
        scored = ~np.isnan(c)
        m = summarize(labels[scored], c[scored], n_boot=n_boot, seed=seed,
                      probabilities=name in PROB_SCORERS)
        if name != "tuned" and not scored.all():
            tuned = cols["tuned"][scored]
            m["tuned_auc_same_samples"] = auc(labels[scored], tuned)
            d, lo, hi = auc_diff_ci(labels[scored], tuned, c[scored], n_boot=n_boot, seed=seed)
            m.update(tuned_minus_auc=d, tuned_minus_auc_lo=lo, tuned_minus_auc_hi=hi)
        out[name] = m
    return out


def _write_scores(path: Path, ids: np.ndarray, labels: np.ndarray,
                  columns: dict[str, np.ndarray]) -> None:
    from gcnee.stages import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label", *columns])
        for i in range(len(ids)):
            w.writerow([int(ids[i]), int(labels[i]),
                        *("" if np.isnan(c[i]) else f"{float(c[i]):.6g}"
                          for c in columns.values())])


def format_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (split, scorer): AUC [95% CI], log-loss, accuracy, n."""
    lines = [f"{'split':<6}{'scorer':<14}{'AUC':>7}  {'95% CI':<16}{'log-loss':>9}"
             f"{'acc':>7}{'n':>7}"]
    for split, by_scorer in metrics.items():
        for name, m in by_scorer.items():
            ll = f"{m['log_loss']:.4f}" if "log_loss" in m else "-"
            acc = f"{m['accuracy']:.3f}" if "accuracy" in m else "-"
            lines.append(f"{split:<6}{name:<14}{m['auc']:>7.4f}  "
                         f"[{m['auc_lo']:.3f}, {m['auc_hi']:.3f}]  {ll:>9}{acc:>7}{m['n']:>7}")
    return "\n".join(lines)


@register("llm", config_keys=["llm", "prompt", "eval.max_samples", "eval.val_max_samples",
                              "eval.untuned_max_samples",
                              "eval.bootstrap", "run.seed", *TRAINER_RESULT_KEYS],
          requires=["data", "retriever"], distributed=True,
          help="LoRA-tune the CTR LLM; AUC of tuned/untuned/simple scorers with 95% CIs")
def run(ctx: StageContext) -> dict[str, Any]:
    from gcnee.data.tables import PreparedData
    from gcnee.llm.backbone import answer_token_ids, load_backbone, prepare_for_training
    from gcnee.llm.load_plan import plan_of
    from gcnee.llm.module import CTRLLMModule

    cfg = ctx.cfg
    seconds: dict[str, float] = {}
    t0 = time.time()
    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    data_dir, retriever_dir = ctx.input_dir("data"), ctx.input_dir("retriever")
    model, tokenizer = load_backbone(cfg.llm, cfg.run.checkpoints_dir, plan=plan_of(cfg))
    model = prepare_for_training(model, cfg.llm)
    yes_id, no_id = answer_token_ids(tokenizer, list(cfg.llm.answer_words),
                                     cfg.llm.use_chat_template)
    seconds["load"] = time.time() - t0

    t0 = time.time()
    dm = CTRDataModule(cfg, data_dir, retriever_dir, ctx.out_dir, tokenizer)
    dm.prepare_data()
    dm.setup()
    seconds["prompts"] = time.time() - t0
    module = CTRLLMModule(model, yes_id, no_id, cfg.llm)
    logger = TensorBoardLogger(save_dir=str(ctx.log_dir), name="", version="",
                               default_hp_metric=False)

    # Untuned: LoRA's B matrices start at zero, so the wrapped model equals the base model.
    t0 = time.time()
    untuned_path = _untuned_cache(ctx, dm)
    untuned_dm = dm.restricted(cfg.eval.get("untuned_max_samples"), int(cfg.run.seed))
    eval_trainer = build_trainer(cfg, fit=False, logger=logger)
    if untuned_path.is_file():
        untuned = read_json(untuned_path)
    else:
        module.tag = "untuned"
        untuned = _evaluate(eval_trainer, module, untuned_dm)
        if eval_trainer.is_global_zero:
            write_json(untuned_path, untuned)
    seconds["untuned_eval"] = time.time() - t0

    t0 = time.time()
    checkpoint, resume = resumable_checkpoint(ctx, cfg.trainer.checkpoint_every_n_steps)
    resumed_from = checkpoint_step(resume)
    if resume and is_global_zero():
        print(f"[gcnee] llm: resuming training from {resume} (step {resumed_from})")
    fit_trainer = build_trainer(cfg, fit=True, logger=logger, callbacks=[checkpoint])
    module.tag = "tuned"
    fit_trainer.fit(module, datamodule=dm, ckpt_path=resume)
    # A kill during the evaluation below must not redo the steps after the last periodic save.
    fit_trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")
    seconds["train"] = time.time() - t0

    t0 = time.time()
    module.record_layers = exit_layers_to_record(cfg, module.num_layers)
    module.record_dir = ctx.out_dir / STATE_SHARDS
    tuned_trainer = build_trainer(cfg, fit=False, logger=logger)
    tuned = _evaluate(tuned_trainer, module, dm)
    seconds["tuned_eval"] = time.time() - t0

    # Every rank holds all scores (gathered), so every rank returns the same summary; only rank
    # zero writes files.
    zero = fit_trainer.is_global_zero
    t0 = time.time()
    if zero:
        module.save_adapter(ctx.out_dir / "adapter")
        if cfg.llm.quantization is None:  # a quantized base serves the adapter unmerged
            module.save_merged(ctx.out_dir / "merged", tokenizer)
        from gcnee.llm.states import remove_shards

        for split in EVAL_SPLITS:
            save_hidden(ctx.out_dir, split, module.record_dir, module.record_layers,
                        int(tuned_trainer.world_size))
        remove_shards(module.record_dir)
    seconds["export"] = time.time() - t0
    prepared = PreparedData.load(data_dir)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for split in EVAL_SPLITS:
        samples = dm.samples[split]
        ids = np.array([s.sample_id for s in samples])
        order = np.argsort(ids)
        ids, labels = ids[order], np.array([s.label for s in samples])[order]
        untuned_ids = np.sort([s.sample_id for s in untuned_dm.samples[split]])
        cols = {"tuned": _check_alignment(split, tuned[split], ids),
                "untuned": _spread(split, untuned[split], ids, untuned_ids)}
        for name in SCORERS:
            cols[name] = score_simple(name, prepared, samples)[order]
        if zero:
            _write_scores(ctx.out_dir / f"scores_{split}.csv", ids, labels, cols)
        metrics[split] = _summaries(labels, cols, int(cfg.eval.bootstrap), int(cfg.run.seed))
    seconds["total"] = sum(seconds.values())
    summary = {
        "metrics": metrics,
        "train_samples": len(dm.samples["train"]),
        "truncated": dm.truncations(),
        "prompt_tokens": dm.lengths(),
        "final_train_loss": _last_loss(fit_trainer),
        "resumed_from_step": resumed_from,
        "global_step": int(fit_trainer.global_step),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "untuned_cached": bool(seconds["untuned_eval"] < 1.0),
    }
    if zero:
        write_json(ctx.out_dir / "summary.json", summary)
        print(f"\n[gcnee] llm stage: {summary['train_samples']} training samples, "
              f"truncated prompts {summary['truncated']}, seconds {summary['seconds']}")
        print(format_table(metrics))
    return summary


def _last_loss(trainer: L.Trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss")
    return None if value is None else round(float(value), 4)
