"""A ``lightning.Trainer`` from the config's ``trainer`` section, for any stage that trains.

``trainer`` settings (accelerator, devices, strategy, nodes, precision, logging, determinism,
progress bar, gradient clipping) pass through unchanged; the stage adds its own epochs, logger
and callbacks. Checkpointing is on exactly when a ``ModelCheckpoint`` is among the callbacks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def trainer_from_config(trainer_cfg: Any, *, max_epochs: int | None = None, logger: Any = None,
                        callbacks: list[Any] | None = None, **overrides: Any) -> L.Trainer:
    """``L.Trainer`` built from ``trainer_cfg`` (``cfg.trainer``); ``overrides`` win.

    Defaults beyond the config: no sanity validation steps, no model summary, no logger unless
    one is given.
    """
    t = trainer_cfg
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
    return L.Trainer(**kwargs)
