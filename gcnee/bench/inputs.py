"""What the benchmarks read from a trained run: its prompts (the run itself is opened through
:class:`gcnee.run.TrainedRun`, which names any missing output and the ``--stages`` that writes
it)."""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig

from gcnee.run import TrainedRun


def open_run(cfg: DictConfig, full_depth: bool = False) -> TrainedRun:
    """The run of ``cfg`` with its tuned model (and exit heads), placed on its device; no data
    tables (the benches read prompts from the token cache)."""
    return TrainedRun.open(cfg, full_depth=full_depth, tables=False, serving=False).place()


def eval_requests(dm: Any, n: int) -> list[list[int]]:
    """The first ``n`` test prompts (token ids) of the data module's (seeded) test subset."""
    ids = dm.datasets["test"].input_ids
    if not ids:
        raise ValueError("the test split has no prompts (eval.max_samples, data.split_ratios)")
    return [list(x) for x in ids[: max(1, int(n))]]


def mean_tokens(requests: list[list[int]]) -> float:
    return float(np.mean([len(r) for r in requests]))
