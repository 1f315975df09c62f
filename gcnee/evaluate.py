"""``gcnee evaluate``: the threshold/window sweep of a trained run, without training.

Opens the run through :class:`gcnee.run.TrainedRun` (its tuned model and exit heads; the prompts
of its token cache), sweeps the current ``eval.*`` settings (rule, thresholds, windows, batch
size, ...) and writes the sweep files to ``<run.logs_dir>/<run>/evaluate/``. The exit stage's
recorded per-head probabilities are replayed when they are for the same test samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gcnee.run import TrainedRun


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the sweep of ``cfg.eval`` on the run of ``cfg``; prints the table, returns the result
    of :func:`gcnee.exits.sweep.run_sweep`."""
    from gcnee.exits.sweep import HEAD_PROBS, format_sweep, load_head_probs, run_sweep, write_sweep

    run = TrainedRun.open(cfg, tables=False).place()
    test = run.datamodule().datasets["test"]
    probs = load_head_probs(run.folder / "exits" / HEAD_PROBS, test.sample_ids, run.heads.layers)
    result = run_sweep(run.scorer(), test.input_ids, test.labels, run.cfg.eval,
                       seed=int(run.cfg.run.seed), head_probs=probs)
    out = Path(run.cfg.run.logs_dir) / run.name / "evaluate"
    write_sweep(result, out)
    print(format_sweep(result))
    print(f"[gcnee] sweep written to {out}")
    return result
