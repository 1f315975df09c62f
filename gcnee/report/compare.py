"""``gcnee compare``: the llm stage of several runs side by side, on the same samples.

Each run's ``checkpoints/<run>/llm/scores_<split>.csv`` holds one tuned P(yes) per sample. For
runs that scored the same samples, the table gives each run's tuned AUC with its 95 % bootstrap
interval and its difference to the FIRST run with a paired bootstrap interval (the same resample
for both runs, so the interval is for the difference itself: much narrower than comparing the
two runs' own intervals). Beside them: the config keys in which the run differs from the first
one (``llm``, ``prompt``, ``retriever.kind``, ``trainer.precision``), prompt tokens, training
samples and the stage's seconds. This is how a recipe search is read (README, "CTR LLM").
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from gcnee.metrics import auc_ci, auc_diff_ci
from gcnee.stages import StageError, read_json

# What distinguishes one llm-stage recipe from another (eval subsets must match anyway).
RECIPE_KEYS = ("llm", "prompt", "retriever.kind", "trainer.precision")


def read_scores(llm_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample_ids, labels, tuned P(yes))`` sorted by sample id, from ``scores_<split>.csv``."""
    path = llm_dir / f"scores_{split}.csv"
    if not path.is_file():
        raise StageError(f"{path} is missing: has the llm stage of this run finished?")
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["sample_id"]))
    return (np.array([int(r["sample_id"]) for r in rows]),
            np.array([int(r["label"]) for r in rows]),
            np.array([float(r["tuned"]) for r in rows]))


def _flat(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in RECIPE_KEYS:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            for k, v in _flat_dict(OmegaConf.to_container(value, resolve=True), key).items():
                out[k] = v
        else:
            out[key] = value
    return out


def _flat_dict(d: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def config_diff(base: Any, other: Any) -> list[str]:
    """``key=value`` for every recipe key in which ``other`` differs from ``base``."""
    a, b = _flat(base), _flat(other)
    return [f"{k}={b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def compare_runs(runs: list[str], checkpoints_dir: str | Path = "checkpoints",
                 split: str = "val", n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per run (the first is the reference); raises if the runs scored other samples."""
    if not runs:
        raise ValueError("gcnee compare: give at least one run")
    base_dir = Path(checkpoints_dir)
    rows: list[dict[str, Any]] = []
    ref = None
    for run in runs:
        llm_dir = base_dir / run / "llm"
        ids, y, p = read_scores(llm_dir, split)
        cfg = OmegaConf.load(llm_dir / "config.yaml")
        summary = read_json(llm_dir / "summary.json")
        if ref is None:
            ref = (run, ids, p, cfg)
        elif not np.array_equal(ids, ref[1]):
            raise ValueError(f"{run} scored other {split} samples than {ref[0]} ({len(ids)} vs "
                             f"{len(ref[1])}): compare runs with the same eval.* subsets")
        auc, lo, hi = auc_ci(y, p, n_boot=n_boot, seed=seed)
        diff = auc_diff_ci(y, p, ref[2], n_boot=n_boot, seed=seed) if rows else None
        tokens = summary.get("prompt_tokens", {}).get(split, {})
        rows.append({
            "run": run, "n": len(y), "auc": auc, "auc_lo": lo, "auc_hi": hi,
            "diff": diff, "changes": config_diff(ref[3], cfg) if rows else [],
            "tokens": tokens.get("mean"), "train_samples": summary.get("train_samples"),
            "epochs": OmegaConf.select(cfg, "llm.epochs"),
            "final_train_loss": summary.get("final_train_loss"),
            "seconds": summary.get("seconds", {}),
        })
    return rows


def format_compare(rows: list[dict[str, Any]], split: str) -> str:
    """A markdown table of :func:`compare_runs`'s rows."""
    from gcnee.bench.report import markdown_table

    def minutes(s: dict, key: str) -> str:
        return f"{s[key] / 60:.1f}" if key in s else "–"

    table = []
    for r in rows:
        d = r["diff"]
        table.append([
            r["run"], ", ".join(r["changes"]) or "(reference)",
            f"{r['tokens']:.0f}" if r["tokens"] is not None else "–",
            f"{r['train_samples']}×{r['epochs']}",
            f"{r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]",
            "–" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]",
            "–" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}",
            minutes(r["seconds"], "train"), minutes(r["seconds"], "total")])
    head = ["run", "differs from the first run in", "tokens", "samples×epochs",
            f"tuned {split} AUC [95% CI] (n={rows[0]['n']})", f"− {rows[0]['run']} [paired CI]",
            "final loss", "train min", "stage min"]
    return markdown_table(head, table, align="llrrlllrr")
