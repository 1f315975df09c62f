"""What the benchmarks read from a trained run: the tuned model, its exit heads, its prompts.

Everything comes from the stage folders of ``checkpoints/<run>/`` (never retrained here); a
missing output is an error that names the file and the ``gcnee fit --stages`` that writes it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

import gcnee.pipeline  # noqa: F401  (registers the stages: gcnee.exits.stage needs them)
from gcnee.stages import MARKER, StageError


def run_dir(cfg: DictConfig) -> Path:
    """``<run.checkpoints_dir>/<run.name>``."""
    return Path(cfg.run.checkpoints_dir) / str(cfg.run.name)


def require(path: Path, what: str, stages: str) -> Path:
    """``path`` if it exists, else a :class:`StageError` saying which stages write it."""
    if not path.exists():
        raise StageError(f"{path} not found ({what}); run `gcnee fit --config <config> "
                         f"--stages {stages}` first (run.name / run.checkpoints_dir pick the run)")
    return path


def stage_dir(cfg: DictConfig, stage: str, stages: str) -> Path:
    """A finished stage's folder (its completion marker must exist); warns if it is outdated
    for ``cfg`` (the bench still measures what is on disk)."""
    from gcnee.stages import stage_status

    folder = run_dir(cfg) / stage
    require(folder / MARKER, f"the '{stage}' stage has not finished", stages)
    try:
        fresh, why = stage_status(cfg, stage)
    except KeyError:  # stage not registered (pipeline not imported)
        fresh, why = True, ""
    if not fresh:
        warnings.warn(f"stage '{stage}' in {folder} is not up to date for this config ({why}); "
                      "benchmarking its outputs as they are", stacklevel=2)
    return folder


def load_tuned_with_heads(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """``(merged model, tokenizer, exit heads)`` of a run: ``llm/merged`` and
    ``exits/heads.pt``."""
    from gcnee.exits.stage import load_heads, load_tuned

    llm_dir = stage_dir(cfg, "llm", "data,retriever,llm")
    require(llm_dir / "merged" / "config.json", "the llm stage's merged tuned model",
            "data,retriever,llm")
    heads_path = require(run_dir(cfg) / "exits" / "heads.pt", "the exit stage's trained heads",
                         "exits")
    model, tokenizer = load_tuned(llm_dir, cfg)
    return model, tokenizer, load_heads(heads_path, model)


def load_datamodule(cfg: DictConfig, tokenizer: Any, batch_size: int | None = None) -> Any:
    """The run's ``CTRDataModule`` (token cache in ``llm/``, as the llm and exit stages use it),
    set up; ``batch_size`` overrides ``llm.batch_size`` for its training loader."""
    from gcnee.llm.datamodule import CTRDataModule

    base = run_dir(cfg)
    data_dir = stage_dir(cfg, "data", "data")
    retriever_dir = stage_dir(cfg, "retriever", "data,retriever")
    llm_dir = require(base / "llm", "the llm stage's folder (token cache)", "data,retriever,llm")
    dm_cfg = cfg.copy()
    if batch_size is not None:
        dm_cfg.llm.batch_size = int(batch_size)
    dm = CTRDataModule(dm_cfg, data_dir, retriever_dir, llm_dir, tokenizer)
    dm.prepare_data()
    dm.setup()
    return dm


def eval_requests(dm: Any, n: int) -> list[list[int]]:
    """The first ``n`` test prompts (token ids) of the data module's (seeded) test subset."""
    ids = dm.datasets["test"].input_ids
    if not ids:
        raise ValueError("the test split has no prompts (eval.max_samples, data.split_ratios)")
    return [list(x) for x in ids[: max(1, int(n))]]


def mean_tokens(requests: list[list[int]]) -> float:
    return float(np.mean([len(r) for r in requests]))
