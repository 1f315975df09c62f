"""Ranks of a pipeline that runs as several processes (DDP), and how they wait for each other.

Two ways to launch (README, "Multi-GPU and multi-node"):

* one node: ``gcnee fit ... trainer.strategy=ddp trainer.devices=N``. Rank 0 runs alone until the
  first distributed ``Trainer``; Lightning then starts ranks 1..N-1 by re-running the same command
  with ``LOCAL_RANK`` set, and they walk the pipeline from the start (finished stages are skipped).
* ``torchrun`` or SLURM ``srun``: every rank runs the command from the start.

Stages are either *distributed* (every rank runs them; Lightning synchronises the training and
``CTRDataModule`` shards evaluation) or *single-process* (data preparation, LightGCN training and
the similar-user search, the baselines): rank 0 runs those while the other ranks wait for the
stage's completion marker. Rank 0 alone writes stage files (each rank writes only its own shard
of the llm stage's recorded states, :mod:`gcnee.llm.states`, which rank 0 merges). Ranks on
several nodes must therefore see the same ``run.checkpoints_dir`` (a shared filesystem, as on
most clusters).

``gcnee predict ... trainer.strategy=ddp`` starts or joins its processes with the same launch
semantics through Lightning Fabric (:func:`launch_processes`); each rank writes its share of the
records to a part file that rank 0 merges in line order (:func:`merge_rank_parts`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Environment variables by which Lightning recognises a launcher (torchrun, SLURM, its own).
_LAUNCH_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                "NODE_RANK")
# Set by rank 0 when the pipeline starts; Lightning copies the environment to the ranks it starts,
# so a marker written before they existed still counts as this run's.
START_VAR = "GCNEE_PIPELINE_START"


def _env_int(key: str) -> int | None:
    value = os.environ.get(key)
    return int(value) if value not in (None, "") else None


def global_rank() -> int:
    """This process's rank across all nodes (0 in a plain single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):  # torchrun / SLURM
        if (rank := _env_int(key)) is not None:
            return rank
    local = _env_int("LOCAL_RANK")  # Lightning's own launcher sets LOCAL_RANK and NODE_RANK
    if local is None:
        return 0
    # Without LOCAL_WORLD_SIZE the exact rank on node > 0 is unknown; it is nonzero, which is
    # all the pipeline asks.
    node = _env_int("NODE_RANK") or 0
    return node * (_env_int("LOCAL_WORLD_SIZE") or 1) + local


def world_size() -> int:
    """Number of processes of the run (1 in a plain single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE") or _env_int("SLURM_NTASKS") or 1


def is_global_zero() -> bool:
    """Rank zero of a (possibly) distributed run; True in a plain single process."""
    return global_rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists; otherwise nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def pipeline_start() -> float:
    """When this pipeline run started (inherited by the ranks Lightning starts later)."""
    if START_VAR not in os.environ:
        os.environ[START_VAR] = repr(time.time())
    return float(os.environ[START_VAR])


@contextmanager
def single_process_env() -> Iterator[None]:
    """Hide the launcher's variables so a ``Trainer`` built inside is a plain one-device trainer.

    Rank 0 runs the single-process stages with it: under torchrun or SLURM, Lightning would
    otherwise insist that ``devices * num_nodes`` equals the launched world size.
    """
    hidden = {k: v for k, v in os.environ.items()
              if k in _LAUNCH_VARS or k.startswith("SLURM_")}
    for k in hidden:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(hidden)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` when a process group is running, else ``[obj]``
    (picklable objects; for small per-sample results, not for hidden states)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def wants_processes(trainer_cfg: Any) -> bool:
    """Whether a scoring command (``gcnee predict``) runs as several processes: when
    ``trainer.strategy`` names DDP (``ddp``, ``ddp_spawn``, ...; with ``trainer.devices`` and
    ``trainer.num_nodes`` saying how many), as ``gcnee fit`` does."""
    return str(trainer_cfg.get("strategy", "auto")).startswith("ddp")


def launch_processes(trainer_cfg: Any) -> Any:
    """Start or join the processes of ``trainer_cfg`` (``cfg.trainer``) and return a started
    ``lightning.fabric.Fabric``: ``global_rank``, ``world_size``, ``device`` (this rank's local
    device: ``cuda:<LOCAL_RANK>`` on GPU nodes, the CPU otherwise), ``barrier()``.

    The launch semantics are ``gcnee fit``'s (module docstring): on one node the first process
    re-runs the same command for ranks 1..N-1; under ``torchrun`` or SLURM every rank already
    runs it and joins. The process group is gloo on the CPU, nccl on CUDA. Precision stays
    with the caller (the scorer's autocast), so Fabric is built with ``32-true``.
    """
    from lightning.fabric import Fabric

    strategy = str(trainer_cfg.get("strategy", "ddp"))
    if strategy == "ddp_spawn":  # a spawned function would not return the caller's objects
        strategy = "ddp"
    fabric = Fabric(accelerator=str(trainer_cfg.get("accelerator", "auto")),
                    devices=trainer_cfg.get("devices", 1),
                    num_nodes=int(trainer_cfg.get("num_nodes", 1)), strategy=strategy,
                    precision="32-true")
    fabric.launch()
    return fabric


def end_processes() -> None:
    """Tear down the process group that :func:`launch_processes` started (if any)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_part(path: str | os.PathLike, rank: int) -> Path:
    """The file beside ``path`` where rank ``rank`` writes its part of ``path``'s records."""
    path = Path(path)
    return path.with_name(f".{path.name}.rank{int(rank)}.part")


def merge_rank_parts(parts: list[Path], out: Any) -> int:
    """Write the records of ``parts`` to the open text file ``out`` in key order; returns the
    count. Each part holds lines ``<int key>\\t<record>`` in increasing key order (one rank's
    share of the records); the merge streams them (one line per part in memory)."""
    import heapq

    def lines(path: Path) -> Iterator[tuple[int, str]]:
        with open(path, encoding="utf-8") as f:
            for text in f:
                key, rec = text.split("\t", 1)
                yield int(key), rec

    count = 0
    for _, rec in heapq.merge(*(lines(p) for p in parts), key=lambda kv: kv[0]):
        out.write(rec)
        count += 1
    return count
