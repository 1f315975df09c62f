"""``BaselineModule``: trains any baseline CTR model of ``gcnee.baselines.models``.

Loss: binary cross-entropy on the model's logits; optimizer: AdamW; validation: AUC
(``torchmetrics`` ``BinaryAUROC``, logged as ``val/auc``, which early stopping and the best
checkpoint follow) and loss. ``fit_baseline`` runs the whole recipe and keeps the best epoch.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC

from gcnee.baselines.data import EncodedSplit, collate_batch
from gcnee.training import trainer_from_config

MONITOR = "val/auc"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"baselines.num_threads must be >= 1 or null, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BaselineModule(L.LightningModule):
    """Wraps a model mapping a batch dict to logits (B,); batches also hold ``label`` (B,)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay = model, lr, weight_decay
        self.val_auc = BinaryAUROC()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self.model(batch), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch)
        n = len(batch["label"])
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
        self.val_auc.update(torch.sigmoid(logits), batch["label"].long())
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log(MONITOR, self.val_auc, prog_bar=True, batch_size=n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@torch.no_grad()
def predict_proba(model: nn.Module, tensors: dict[str, torch.Tensor],
                  batch_size: int = 2048) -> np.ndarray:
    """P(click) per row of an encoded split, shape (N,) float64, in the split's row order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    n = len(tensors["label"])
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size].to(device) for k, v in tensors.items()}
        out.append(torch.sigmoid(model(batch)).double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def fit_baseline(model: nn.Module, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
                 cfg: Any, trainer_cfg: Any, ckpt_dir: str | Path, logger: Any = None,
                 seed: int = 0) -> tuple[BaselineModule, dict[str, Any]]:
    """Train ``model`` on ``train`` with early stopping on ``val`` AUC; restore the best epoch.

    ``cfg`` is the ``baselines`` section (lr, weight_decay, epochs, batch sizes, patience),
    ``trainer_cfg`` the ``trainer`` section. Returns the module (best weights, on CPU) and
    ``{"best_val_auc", "best_epoch" (1-based; its weights are kept), "epochs" (run),
    "train_seconds"}``.
    """
    ckpt_dir = Path(ckpt_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # a best.ckpt of an earlier config must not load
    module = BaselineModule(model, float(cfg.lr), float(cfg.weight_decay))
    generator = torch.Generator().manual_seed(seed)
    nw = int(getattr(trainer_cfg, "num_workers", 0))
    train_loader = DataLoader(EncodedSplit(train), batch_size=int(cfg.batch_size), shuffle=True,
                              generator=generator, collate_fn=collate_batch, num_workers=nw)
    val_loader = DataLoader(EncodedSplit(val), batch_size=int(cfg.eval_batch_size),
                            collate_fn=collate_batch, num_workers=nw)
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=MONITOR,
                                 mode="max", save_top_k=1, enable_version_counter=False)
    stopping = EarlyStopping(monitor=MONITOR, mode="max", patience=int(cfg.patience))
    steps = max(1, len(train_loader))
    trainer = trainer_from_config(
        trainer_cfg, max_epochs=int(cfg.epochs), logger=logger,
        callbacks=[checkpoint, stopping], devices=1, strategy="auto", num_nodes=1,
        # float32 whatever trainer.precision (set for the LLM) says: these models are small,
        # and Dice's running statistics are float32 buffers.
        precision="32-true",
        log_every_n_steps=min(int(trainer_cfg.log_every_n_steps), steps))
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    seconds = time.perf_counter() - start
    best_epoch = None
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        best_epoch = int(state["epoch"]) + 1  # saved at the end of 0-based epoch e
    module.cpu()
    best = checkpoint.best_model_score
    return module, {"best_val_auc": None if best is None else float(best),
                    "best_epoch": best_epoch, "epochs": int(trainer.current_epoch),
                    "train_seconds": round(seconds, 3)}
