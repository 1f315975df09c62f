"""A ``lightning.Trainer`` from the config's ``trainer`` section, for any stage that trains.

``trainer`` settings (accelerator, devices, strategy, nodes, precision, logging, determinism,
progress bar, gradient clipping) pass through unchanged; the stage adds its own epochs, logger
and callbacks. Checkpointing is on exactly when a ``ModelCheckpoint`` is among the callbacks.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gcnee import quiet
from gcnee.distributed import is_global_zero
from gcnee.precision import cpu_has_native_bf16
from gcnee.progress import ProgressLogCallback, lines_wanted


def uses_cuda(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` puts the run on a CUDA GPU on this machine."""
    return torch.cuda.is_available() and str(accelerator) in ("auto", "gpu", "cuda")


def trainer_from_config(trainer_cfg: Any, *, max_epochs: int | None = None, logger: Any = None,
                        callbacks: list[Any] | None = None, progress_name: str | None = None,
                        **overrides: Any) -> L.Trainer:
    """``L.Trainer`` built from ``trainer_cfg`` (``cfg.trainer``); ``overrides`` win.

    Defaults beyond the config: no sanity validation steps, no model summary, no logger unless
    one is given. When stdout is not a terminal (``gcnee.progress.lines_wanted``) the progress
    bar is off and a ``ProgressLogCallback`` prints plain progress lines instead, prefixed by
    ``progress_name`` (default: the stage of the LightningModule). In the CLI's quiet mode
    (``gcnee.quiet``, no ``--verbose``) the model summary table is not printed either.
    """
    t = _with_defaults(trainer_cfg)
    quiet.reapply()
    callbacks = list(callbacks or [])
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.num_nodes, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        gradient_clip_val=t.gradient_clip_val, logger=logger if logger is not None else False,
        callbacks=callbacks, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    if max_epochs is not None:
        kwargs["max_epochs"] = int(max_epochs)
    kwargs.update(overrides)
    if lines_wanted():
        # A bar in a log file is a stream of carriage returns; plain lines instead.
        kwargs["enable_progress_bar"] = False
        if not any(isinstance(c, ProgressLogCallback) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressLogCallback(progress_name)]
    if quiet.is_quiet():
        kwargs["enable_model_summary"] = False
    trainer = L.Trainer(**kwargs)
    _warn_slow_cpu_bf16(trainer)
    return trainer


def _with_defaults(trainer_cfg: Any) -> Any:
    """``trainer_cfg`` with every ``TrainerConfig`` key it lacks at its default (None: all)."""
    import dataclasses
    from types import SimpleNamespace

    from gcnee.config import TrainerConfig

    defaults = TrainerConfig()
    return SimpleNamespace(**{f.name: getattr(trainer_cfg, f.name, getattr(defaults, f.name))
                              for f in dataclasses.fields(TrainerConfig)})


_warned_bf16 = False


def _warn_slow_cpu_bf16(trainer: L.Trainer) -> None:
    # configs/ml100k.yaml trains and scores in bf16 on the CPU because this project's CPUs have
    # AVX-512 BF16 (1.6x faster scoring); without it bf16 is emulated and slower than fp32.
    global _warned_bf16
    if _warned_bf16 or not str(trainer.precision).startswith("bf16"):
        return
    if trainer.strategy.root_device.type != "cpu" or cpu_has_native_bf16() is not False:
        return
    _warned_bf16 = True
    warnings.warn(f"trainer.precision={trainer.precision} on a CPU without AVX-512 BF16 or "
                  "AMX: bf16 is emulated there and slower than fp32; set "
                  "trainer.precision=32-true", stacklevel=3)


def resumable_checkpoint(ctx: Any, every_n_steps: int | None) -> tuple[ModelCheckpoint, str | None]:
    """The stage's ``ckpt/last.ckpt`` callback and the checkpoint to resume from (or None).

    ``ckpt/`` belongs to one configuration (``ckpt/fingerprint.txt``): a checkpoint of another
    one, or any under ``--force``, is deleted rather than resumed. Every rank reaches the same
    decision from the same files; only rank 0 deletes and writes.
    ``last.ckpt`` is rewritten every ``every_n_steps`` optimizer steps (None: each epoch end).
    """
    from gcnee.stages import fingerprint

    ckpt_dir = ctx.out_dir / "ckpt"
    stamp = ckpt_dir / "fingerprint.txt"
    fp = fingerprint(ctx.cfg, ctx.stage.name)
    stale = ctx.force or not stamp.is_file() or stamp.read_text().strip() != fp
    last = ckpt_dir / "last.ckpt"
    resume = None if stale or not last.is_file() else str(last)
    if is_global_zero():
        if stale and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp + "\n")
    callback = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                               every_n_train_steps=every_n_steps or None)
    return callback, resume


def checkpoint_step(path: str | Path | None) -> int:
    """The optimizer step a Lightning checkpoint was saved at (0 for None)."""
    if path is None:
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
