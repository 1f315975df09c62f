"""The ``baselines`` stage: the traditional CTR models of the paper's Table 2.

Each model in ``baselines.models`` (deepfm, din, gru4rec, sim) is trained on ALL of the training
split (the LLM is few-shot), early-stopped on validation AUC, and scored on the test split: on
the same deterministic subset the LLM stage evaluates (``eval.max_samples``, ``run.seed``;
``gcnee.data.samples.eval_subset``) and on the full test split. Outputs in
``checkpoints/<run>/baselines/``: ``summary.json`` (per model: AUC with 95% bootstrap CI,
log-loss and accuracy on both test sets, best validation AUC, epochs, seconds, parameters),
``table.md`` (Table 2 rows), ``scores_test.csv`` (one row per test sample, one column per model,
``in_eval_subset``). TensorBoard: ``logs/<run>/baselines/<model>/``. An empty model list makes the
stage a no-op that says so.
"""

from __future__ import annotations

import csv
import time
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

import gcnee.data.stage  # noqa: F401  (registers "data", which this stage requires)
from gcnee.config import ConfigError
from gcnee.distributed import is_global_zero
from gcnee.stages import StageContext, atomic_path, register, write_json

NAMES = {"deepfm": "DeepFM", "din": "DIN", "gru4rec": "GRU4Rec", "sim": "SIM"}


def format_table(results: dict[str, dict[str, Any]], n_subset: int, n_test: int) -> str:
    """Table 2 as markdown: AUC [95% CI] and log-loss on the eval subset and the full test."""
    lines = [
        f"| model | AUC, eval subset (n={n_subset}) [95% CI] | log-loss | "
        f"AUC, full test (n={n_test}) [95% CI] | log-loss | best val AUC | best epoch / run "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, t = r["subset"], r["test"]
        val = "-" if r["best_val_auc"] is None else f"{r['best_val_auc']:.4f}"
        lines.append(
            f"| {NAMES.get(name, name)} | {s['auc']:.4f} [{s['auc_lo']:.3f}, {s['auc_hi']:.3f}] "
            f"| {s['log_loss']:.4f} | {t['auc']:.4f} [{t['auc_lo']:.3f}, {t['auc_hi']:.3f}] "
            f"| {t['log_loss']:.4f} | {val} | {r['best_epoch'] or '-'} / {r['epochs']} "
            f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def _write_scores(path: Any, ids: np.ndarray, labels: np.ndarray, in_subset: np.ndarray,
                  columns: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label", "in_eval_subset", *columns])
        for i in range(len(ids)):
            w.writerow([int(ids[i]), int(labels[i]), int(in_subset[i]),
                        *(f"{float(c[i]):.6g}" for c in columns.values())])


@register("baselines", config_keys=["baselines", "run.seed", "eval.max_samples", "eval.bootstrap"],
          requires=["data"],
          help="DeepFM, DIN, GRU4Rec, SIM on all of train: test AUC with 95% CIs (Table 2)")
def run(ctx: StageContext) -> dict[str, Any]:
    from gcnee.baselines.data import FeatureEncoder
    from gcnee.baselines.models import MODELS, build_model
    from gcnee.baselines.module import fit_baseline, predict_proba, torch_threads
    from gcnee.data.samples import eval_subset
    from gcnee.data.tables import PreparedData
    from gcnee.metrics import summarize

    cfg = ctx.cfg
    bc = cfg.baselines
    names = [str(m).lower() for m in bc.models]
    if not names:
        print("[gcnee] baselines stage: baselines.models is empty, nothing to train "
              f"(list some of {', '.join(MODELS)} to get Table 2)")
        summary: dict[str, Any] = {"models": {}, "note": "baselines.models is empty"}
        write_json(ctx.out_dir / "summary.json", summary)
        return summary
    unknown = [m for m in names if m not in MODELS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"baselines.models: unknown or repeated model(s) {unknown or names}; "
                          f"choose from {', '.join(MODELS)}")
    seed = int(cfg.run.seed)
    prepared = PreparedData.load(ctx.input_dir("data"))
    splits = prepared.splits
    encoder = FeatureEncoder.fit(splits["train"], prepared.items)
    tensors = {name: encoder.encode(splits[name]) for name in ("train", "val", "test")}
    test_ids = tensors["test"]["sample_id"].numpy()
    labels = tensors["test"]["label"].numpy().astype(np.int64)
    subset_ids = {s.sample_id for s in eval_subset(splits["test"], cfg.eval.max_samples, seed)}
    in_subset = np.isin(test_ids, list(subset_ids))
    order = np.argsort(test_ids)  # the CSV in sample_id order, as the LLM stage writes it

    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {}
    n_boot = int(cfg.eval.bootstrap)
    for name in names:
        L.seed_everything(seed, workers=True, verbose=False)  # each model independent of order
        start = time.perf_counter()
        model = build_model(name, encoder.sizes(), bc, encoder.genre_tensor())
        logger = TensorBoardLogger(save_dir=str(ctx.log_dir), name=name, version="",
                                   default_hp_metric=False)
        with torch_threads(bc.num_threads):
            module, info = fit_baseline(model, tensors["train"], tensors["val"], bc, cfg.trainer,
                                        ctx.out_dir / "ckpt" / name, logger=logger, seed=seed)
            p = predict_proba(module.model, tensors["test"], int(bc.eval_batch_size))
        seconds = time.perf_counter() - start
        scores[name] = p
        results[name] = {
            "subset": summarize(labels[in_subset], p[in_subset], n_boot=n_boot, seed=seed),
            "test": summarize(labels, p, n_boot=n_boot, seed=seed),
            **info,
            "seconds": round(seconds, 3),
            "parameters": int(sum(t.numel() for t in module.model.parameters())),
        }
        if name == "sim":
            results[name]["search"] = module.model.search
        print(f"[gcnee] baselines: {NAMES[name]} test AUC {results[name]['test']['auc']:.4f} "
              f"(eval subset {results[name]['subset']['auc']:.4f}), {seconds:.1f} s")

    table = format_table(results, int(in_subset.sum()), len(labels))
    summary = {
        "models": results,
        "table_markdown": table,
        "train_samples": len(splits["train"]),
        "eval_subset": int(in_subset.sum()),
        "test_samples": len(labels),
        "vocabulary": encoder.sizes(),
        "categories": len(encoder.categories),
        "oov_test": encoder.oov_rates(splits["test"]),
    }
    if is_global_zero():
        _write_scores(ctx.out_dir / "scores_test.csv", test_ids[order], labels[order],
                      in_subset[order], {k: v[order] for k, v in scores.items()})
        with atomic_path(ctx.out_dir / "table.md") as tmp:
            tmp.write_text(table + "\n")
        write_json(ctx.out_dir / "summary.json", summary)
        print(table)
    return summary
