"""Quiet console output for the CLI: third-party tips, banners and known deprecations off.

``install(verbose=False)`` is called once by ``gcnee.cli.main`` before anything heavy is
imported. It leaves gcnee's own messages and warnings alone and silences only what a run prints
on every trainer and every model load without the user being able to act on it:

- Lightning's info lines (``rank_zero_info``): the accelerator banner ("GPU available: ...",
  "TPU available: ..."), the "💡 Tip: ... litlogger" line, "`Trainer.fit` stopped: ...";
- deprecation and future warnings raised inside third-party packages (``THIRD_PARTY``), and a
  few Lightning hints that do not apply to this pipeline (``KNOWN_HINTS``);
- bitsandbytes' missing optional-kernel notice, and the transformers/hub progress bars of model
  loading and saving (instant for the models here; stage progress comes from gcnee.progress).

``install(verbose=True)`` (``--verbose``) changes nothing: everything is shown. Lightning sets
its own logger's level when it is imported, so ``reapply()`` (called by every trainer factory in
``gcnee.training``) sets it again after that import.
"""

from __future__ import annotations

import logging
import os
import warnings

# Packages whose DeprecationWarning / FutureWarning are hidden in quiet mode (module regex).
THIRD_PARTY = (r"(lightning|lightning_fabric|pytorch_lightning|torch|torchmetrics|transformers|"
               r"peft|torch_geometric|tensorboard|google|bitsandbytes|huggingface_hub|omegaconf|"
               r"matplotlib|gguf)(\.|$)")
# Lightning hints (UserWarning) that describe deliberate choices of this pipeline.
KNOWN_HINTS = (
    r"Found \d+ module\(s\) in eval mode",  # exit heads train on a frozen backbone in eval mode
    r".*does not have many workers",  # trainer.num_workers defaults to 0 on purpose
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
_LOGGERS = {  # logger -> level in quiet mode
    "lightning.pytorch": logging.WARNING,
    "lightning.fabric": logging.WARNING,
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    "lightning.fabric.utilities.rank_zero": logging.WARNING,
    "bitsandbytes": logging.ERROR,
}
_state = {"quiet": False}


def install(verbose: bool = False) -> None:
    """Quiet mode unless ``verbose`` (see the module docstring); idempotent."""
    _state["quiet"] = not verbose
    if verbose:
        return
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    for message in KNOWN_HINTS:
        warnings.filterwarnings("ignore", message=message)
    # Read by huggingface_hub (and so transformers) when first imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    reapply()


def reapply() -> None:
    """Set the quiet logger levels again (Lightning resets its own when imported)."""
    if not _state["quiet"]:
        return
    for name, level in _LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def is_quiet() -> bool:
    """Whether ``install`` put the process in quiet mode."""
    return _state["quiet"]
