"""``gcnee evaluate``: the threshold/window sweep of a trained run, without training.

Opens the run through :class:`gcnee.run.TrainedRun` (its tuned model and exit heads; the prompts
of its token cache), sweeps the current ``eval.*`` settings (rule, thresholds, windows, batch
size, ...) and writes the sweep files to ``<run.logs_dir>/<run>/evaluate/``. The exit stage's
recorded per-head probabilities (test and validation) are replayed when they are for the same
samples; the heads' calibration is the one fitted by the exit stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gcnee.run import TrainedRun


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the sweep of ``cfg.eval`` on the run of ``cfg``; prints the table, returns the result
    of :func:`gcnee.exits.sweep.run_sweep`."""
    from gcnee.exits.sweep import HEAD_PROBS, load_head_probs, run_sweep
    from gcnee.exits.sweep_output import format_sweep, write_sweep

    run = TrainedRun.open(cfg, tables=False, serving=False).place()
    dm = run.datamodule()
    test, val = dm.datasets["test"], dm.datasets["val"]
    layers, folder, bs = run.heads.layers, run.folder / "exits", int(run.cfg.eval.batch_size)
    probs = load_head_probs(folder / HEAD_PROBS, test.sample_ids, layers)
    vprobs = load_head_probs(folder / "head_probs_val.pt", val.sample_ids, layers)
    if vprobs is None and len(val):  # validation probabilities choose the setting: compute them
        vprobs = run.scorer().score_requests(val.input_ids, bs, mode="all").head_probs
    kind = str(run.cfg.exits.calibration) if run.calibration is not None else "none"
    result = run_sweep(run.scorer(), test.input_ids, test.labels, run.cfg.eval,
                       seed=int(run.cfg.run.seed), head_probs=probs, val_probs=vprobs,
                       val_labels=val.labels, calibration=run.calibration,
                       calibration_kind=kind)
    out = Path(run.cfg.run.logs_dir) / run.name / "evaluate"
    write_sweep(result, out)
    print(format_sweep(result))
    print(f"[gcnee] sweep written to {out}")
    return result
