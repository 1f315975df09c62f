"""Progress as plain log lines when the output is not a terminal (nohup, CI, SLURM logs).

Progress bars only draw on a terminal; in a log file a long step would print nothing for
minutes. Everything long in gcnee reports through this module instead:

- ``ProgressLog``: a counter that prints ``[gcnee] <what>: 120/500 (24%), loss 0.4123,
  elapsed 1m02s, ETA 3m15s`` on the first update, then at most every ``every_s`` seconds
  (``GCNEE_PROGRESS_EVERY_S``, default 30), and once at the end (``done()``);
- ``progress(iterable, what, total)``: the same around any loop (reading, scoring, a sweep);
- ``ProgressLogCallback``: a Lightning callback with one ``ProgressLog`` per phase: training
  steps (epoch, step, loss), every validation/test/predict pass (batches scored), and a line per
  finished epoch with its logged metrics.

``lines_wanted()`` decides: lines when stdout is not a terminal (``GCNEE_PROGRESS=lines`` forces
them, ``off`` silences them, ``bar`` keeps bars only). ``gcnee.training.trainer_from_config``
adds the callback (and turns Lightning's bar off) exactly then.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_EVERY_S = 30.0


def lines_wanted() -> bool:
    """Whether progress goes out as plain lines: stdout is not a terminal, or
    ``GCNEE_PROGRESS=lines``; never with ``GCNEE_PROGRESS=off`` or ``bar``."""
    mode = os.environ.get("GCNEE_PROGRESS", "auto").lower()
    if mode in ("off", "bar"):
        return False
    if mode == "lines":
        return True
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return True


def every_seconds() -> float:
    """Seconds between two lines of one ``ProgressLog`` (``GCNEE_PROGRESS_EVERY_S``)."""
    try:
        return max(0.0, float(os.environ.get("GCNEE_PROGRESS_EVERY_S", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _value(v: Any) -> str:
    if hasattr(v, "item"):  # a tensor or numpy scalar
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class ProgressLog:
    """Rate-limited progress lines for one long step.

    Args:
        what: the step's name in each line (``"retriever: training"``).
        total: units expected (None: unknown, no percentage or ETA).
        unit: what is counted (``"step"``, ``"batch"``, ``"line"``); shown in the lines.
        every_s: seconds between lines (default ``every_seconds()``).
        enabled: print at all (default ``lines_wanted()``).
        only_if_slow: no line at the first update; the first comes after ``every_s`` and the
            final one only if an earlier one was printed (short, frequent passes stay silent).
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "step",
                 every_s: float | None = None, enabled: bool | None = None,
                 only_if_slow: bool = False) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_seconds() if every_s is None else every_s
        self.enabled = lines_wanted() if enabled is None else enabled
        self.only_if_slow = only_if_slow
        self.count = 0
        self.start = time.perf_counter()
        self._last: float | None = self.start if only_if_slow else None
        self.lines = 0

    def update(self, n: int = 1, *, count: int | None = None, **fields: Any) -> None:
        """Advance by ``n`` (or to ``count``); print a line if one is due. ``fields`` (loss,
        epoch, ...) are shown as ``name value``."""
        self.count = count if count is not None else self.count + n
        now = time.perf_counter()
        if self._last is None or now - self._last >= self.every_s:
            self._emit(now, fields)

    def done(self, **fields: Any) -> None:
        """Print the final line (once something was counted or a field is given; with
        ``only_if_slow``, only after an earlier line)."""
        if self.only_if_slow and not self.lines:
            return
        if self.count or fields:
            self._emit(time.perf_counter(), fields, final=True)

    def _emit(self, now: float, fields: dict[str, Any], final: bool = False) -> None:
        self._last = now
        if not self.enabled:
            return
        elapsed = now - self.start
        parts = []
        if self.total:
            parts.append(f"{self.unit} {self.count:,}/{self.total:,} "
                         f"({100 * self.count / self.total:.0f}%)")
        else:
            parts.append(f"{self.unit} {self.count:,}")
        parts += [f"{k} {_value(v)}" for k, v in fields.items() if v is not None]
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if final:
            parts.append("done")
        elif self.total and self.count:
            left = elapsed / self.count * max(0, self.total - self.count)
            parts.append(f"ETA {format_seconds(left)}")
        print(f"[gcnee] {self.what}: {', '.join(parts)}", flush=True)
        self.lines += 1


def progress(iterable: Iterable[T], what: str, total: int | None = None, unit: str = "item",
             every_s: float | None = None, enabled: bool | None = None,
             only_if_slow: bool = False) -> Iterator[T]:
    """Yield from ``iterable`` with ``ProgressLog`` lines (``total`` defaults to ``len``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    log = ProgressLog(what, total, unit, every_s, enabled, only_if_slow)
    for item in iterable:
        yield item
        log.update()
    log.done()


MAX_METRICS = 4  # logged metrics shown per line (the exit stage logs three per head)


def _metrics(trainer: Any, prefixes: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key, value in getattr(trainer, "callback_metrics", {}).items():
        if key.startswith(prefixes) and not key.endswith("_step") and "/lr" not in key:
            out[key.removesuffix("_epoch")] = value
        if len(out) == MAX_METRICS:
            break
    return out


def _total(batches: Any) -> int | None:
    if isinstance(batches, list):  # one entry per dataloader
        batches = sum(b for b in batches if isinstance(b, int | float) and math.isfinite(b))
    if isinstance(batches, int | float) and math.isfinite(batches) and batches > 0:
        return int(batches)
    return None


def _loss(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return outputs.get("loss")
    return outputs if hasattr(outputs, "item") else None


try:  # a plain class when Lightning is absent: the module must stay importable without it
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


# Line prefix by LightningModule class, when the trainer's builder gave no name.
STAGE_OF_MODULE = {"CTRLLMModule": "llm", "ExitHeadsModule": "exits",
                   "RetrieverModule": "retriever", "BaselineModule": "baselines"}


class ProgressLogCallback(_Callback):  # type: ignore[misc,valid-type]
    """Lightning callback: ``ProgressLog`` lines for training steps, evaluation passes and
    epochs (rank 0 only).

    Args:
        name: prefix of every line (the stage, e.g. ``"llm"``); None: from the module's class
            (``STAGE_OF_MODULE``), else the class name.
        every_s: seconds between lines of one phase (default ``every_seconds()``).
        enabled: print at all (default ``lines_wanted()``).
    """

    def __init__(self, name: str | None = None, every_s: float | None = None,
                 enabled: bool | None = None) -> None:
        self._name = name
        self.every_s = every_s
        self.enabled = lines_wanted() if enabled is None else enabled
        self._train: ProgressLog | None = None
        self._eval: dict[str, ProgressLog] = {}
        self.name = name or "train"

    def _on(self, trainer: Any) -> bool:
        return self.enabled and getattr(trainer, "is_global_zero", True)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        cls = type(pl_module).__name__
        self.name = self._name or STAGE_OF_MODULE.get(cls, cls)

    # ---- training --------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = None
        if trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps
        else:
            per_epoch = _total(trainer.num_training_batches)
            accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
            if per_epoch and trainer.max_epochs and trainer.max_epochs > 0:
                total = -(-per_epoch // accumulate) * trainer.max_epochs
        self._train = ProgressLog(f"{self.name}: training", total, "step", self.every_s,
                                  self._on(trainer))
        self._epoch_log = ProgressLog(f"{self.name}: training", trainer.max_epochs
                                      if trainer.max_epochs and trainer.max_epochs > 0 else None,
                                      "epoch", self.every_s, self._on(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._train is not None:
            self._train.update(count=trainer.global_step, epoch=trainer.current_epoch + 1,
                               loss=_loss(outputs))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._train is not None:
            self._epoch_log.update(count=trainer.current_epoch + 1, step=trainer.global_step,
                                   **_metrics(trainer, ("train/", "val/", "train_", "val_")))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._train is not None:
            self._train.done(epoch=trainer.current_epoch,
                             **_metrics(trainer, ("val/", "val_")))
            self._train = None

    # ---- evaluation passes -----------------------------------------------------------------
    def _eval_start(self, trainer: Any, kind: str, batches: Any) -> None:
        if kind == "validation" and getattr(trainer, "sanity_checking", False):
            return
        # Validation inside fit runs every epoch: its lines only when a pass is slow (the epoch
        # lines carry its metrics); test/predict passes are the stage's scoring and always show.
        self._eval[kind] = ProgressLog(f"{self.name}: {kind}", _total(batches), "batch",
                                       self.every_s, self._on(trainer),
                                       only_if_slow=kind == "validation")

    def _eval_step(self, kind: str) -> None:
        if kind in self._eval:
            self._eval[kind].update()

    def _eval_end(self, kind: str) -> None:
        log = self._eval.pop(kind, None)
        if log is not None:
            log.done()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, "validation", trainer.num_val_batches)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("validation")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end("validation")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, "scoring", trainer.num_test_batches)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("scoring")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end("scoring")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer, "predicting", trainer.num_predict_batches)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("predicting")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._eval_end("predicting")
