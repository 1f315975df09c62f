"""``RetrieverModule``: LightGCN trained with BPR, validated by recall@k on held-out interactions.

Training: every graph edge (user, item) is a positive; each is paired with
``retriever.num_negatives`` items drawn uniformly among the items the user has no edge to; the
loss is PyG's BPR loss (with its L2 term, ``retriever.weight_decay``) on the full-graph LightGCN
propagation (one propagation per batch, as in LightGCN).

Validation: recall@k (PyG's ``LinkPredRecall``) of the held-out positives — the validation
samples' (user, target item) pairs, see :func:`held_out_pairs` — ranking all graph items except
those the user already has in the graph. :func:`recall_at_k` computes the same number for any
scorer (the stage uses it for the popularity baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from torch_geometric.metrics import LinkPredRecall

from gcnee.data.tables import Sample
from gcnee.retrieval.lightgcn import BipartiteGraph, LightGCNRetriever, positive_mask
from gcnee.training import trainer_from_config


@dataclass
class HeldOut:
    """Held-out positives: ``users`` (m,) distinct graph-user indices and ``label_index``
    (2, P) int64 rows ``[position in users, item index]``."""

    users: np.ndarray
    label_index: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


def held_out_pairs(graph: BipartiteGraph, samples: list[Sample], edges: str = "all",
                   label_threshold: float = 3.0, label_op: str = ">") -> HeldOut:
    """The (user, item) targets of ``samples`` that would be graph edges, as held-out positives.

    With ``edges="all"`` every target counts (an interaction is a positive, as in the graph);
    with ``"positive"`` only targets whose rating passes the label rule. Pairs whose user or item
    is not in the graph, or that are already graph edges, cannot be ranked and are left out.
    """
    uidx, iidx = graph.user_index, graph.item_index
    ratings = np.array([s.rating for s in samples], dtype=np.float32)
    keep = (np.ones(len(samples), bool) if edges == "all"
            else positive_mask(ratings, label_threshold, label_op))
    existing = set((graph.edge_user * graph.num_items + graph.edge_item).tolist())
    pairs = set()
    for s, ok in zip(samples, keep):
        u, i = uidx.get(s.user), iidx.get(s.item)
        if ok and u is not None and i is not None and u * graph.num_items + i not in existing:
            pairs.add((u, i))
    if not pairs:
        return HeldOut(np.zeros(0, np.int64), np.zeros((2, 0), np.int64))
    arr = np.array(sorted(pairs), dtype=np.int64)
    users, rows = np.unique(arr[:, 0], return_inverse=True)
    return HeldOut(users, np.stack([rows.ravel(), arr[:, 1]]))


def _user_ptr(graph: BipartiteGraph) -> np.ndarray:
    """(U+1,) CSR row pointer of the (user-sorted) edges."""
    return np.searchsorted(graph.edge_user, np.arange(graph.num_users + 1))


def _mask_seen(scores: torch.Tensor, users: np.ndarray, ptr: np.ndarray,
               edge_item: np.ndarray) -> None:
    """Set ``scores[r, i] = -inf`` for every graph item i of ``users[r]`` (in place)."""
    counts = ptr[users + 1] - ptr[users]
    rows = np.repeat(np.arange(len(users)), counts)
    cols = np.concatenate([edge_item[ptr[u]:ptr[u + 1]] for u in users]) if len(users) else []
    scores[torch.as_tensor(rows), torch.as_tensor(np.asarray(cols, dtype=np.int64))] = -np.inf


def _update_recall(metric: LinkPredRecall, scores: torch.Tensor, rows: np.ndarray,
                   held: HeldOut, ptr: np.ndarray, edge_item: np.ndarray) -> None:
    """Rank ``scores`` (b, I) for ``held.users[rows]`` (contiguous rows) and update ``metric``."""
    _mask_seen(scores, held.users[rows], ptr, edge_item)
    top = torch.topk(scores, min(metric.k, scores.shape[1]), dim=1).indices
    lo, hi = rows[0], rows[-1] + 1
    sel = (held.label_index[0] >= lo) & (held.label_index[0] < hi)
    labels = torch.as_tensor(held.label_index[:, sel] - np.array([[lo], [0]]))
    metric.update(top, labels)


@torch.no_grad()
def recall_at_k(score_fn: Callable[[np.ndarray], torch.Tensor], graph: BipartiteGraph,
                held: HeldOut, k: int = 20, batch_users: int = 1024) -> float:
    """Mean recall@k over held-out users; ``score_fn(users (b,)) -> (b, I)`` item scores."""
    if len(held) == 0:
        return float("nan")
    metric, ptr = LinkPredRecall(k), _user_ptr(graph)
    for start in range(0, len(held), batch_users):
        rows = np.arange(start, min(start + batch_users, len(held)))
        scores = score_fn(held.users[rows]).float().clone()
        _update_recall(metric, scores, rows, held, ptr, graph.edge_item)
    return float(metric.compute())


def popularity_scorer(graph: BipartiteGraph) -> Callable[[np.ndarray], torch.Tensor]:
    """Scores every item by its graph degree (number of training users), same for all users."""
    deg = torch.as_tensor(graph.item_degree, dtype=torch.float32)
    return lambda users: deg.expand(len(users), -1)


class RetrieverModule(L.LightningModule):
    """LightGCN + BPR with sampled negatives; logs ``train/bpr_loss`` and ``val/recall@k``.

    Args:
        graph: the training graph. held: validation positives (``None``/empty: no validation).
        embedding_dim, num_layers, layers_mode, include_layer0: the model (LightGCNRetriever).
        lr: Adam learning rate. batch_size: positive edges per step. num_negatives: negatives
        per positive. weight_decay: BPR L2 strength. recall_k: k of the validation recall.
    """

    def __init__(self, graph: BipartiteGraph, held: HeldOut | None = None, embedding_dim: int = 64,
                 num_layers: int = 3, layers_mode: str = "average", include_layer0: bool = True,
                 lr: float = 1e-3, batch_size: int = 2048, num_negatives: int = 1,
                 weight_decay: float = 1e-4, recall_k: int = 20):
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"retriever.num_negatives must be >= 1, got {num_negatives}")
        self.save_hyperparameters(ignore=["graph", "held"])
        self.graph, self.held = graph, held
        self.model = LightGCNRetriever(graph.num_users, graph.num_items, embedding_dim,
                                       num_layers, layers_mode, include_layer0)
        self.recall = LinkPredRecall(min(recall_k, graph.num_items))
        self._edge_user = torch.from_numpy(graph.edge_user)
        self._edge_item = torch.from_numpy(graph.edge_item)
        self._edge_keys = self._edge_user * graph.num_items + self._edge_item  # sorted
        self._ptr = _user_ptr(graph)
        self._adj: torch.Tensor | None = None
        self._val_emb: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def recall_name(self) -> str:
        return f"val/recall@{self.recall.k}"

    def adjacency(self) -> torch.Tensor:
        if self._adj is None or self._adj.device != self.device:
            self._adj = self.graph.adjacency().to(self.device)
        return self._adj

    def sample_negatives(self, users: torch.Tensor, rounds: int = 10) -> torch.Tensor:
        """(B,) uniform item indices with no edge to the matching user (redrawn up to
        ``rounds`` times; a user connected to almost every item may keep a positive)."""
        n_items = self.graph.num_items
        neg = torch.randint(0, n_items, users.shape)
        keys = self._edge_keys
        for _ in range(rounds):
            q = users * n_items + neg
            pos = torch.searchsorted(keys, q).clamp(max=len(keys) - 1)
            bad = keys[pos] == q
            if not bool(bad.any()):
                break
            neg[bad] = torch.randint(0, n_items, (int(bad.sum()),))
        return neg

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.graph.num_edges)),
                          batch_size=self.hparams.batch_size, shuffle=True)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        e = batch[0].cpu().repeat(self.hparams.num_negatives)
        users, pos = self._edge_user[e], self._edge_item[e]
        neg = self.sample_negatives(users)
        users, pos, neg = (t.to(self.device) for t in (users, pos, neg))
        loss = self.model.bpr_loss(self.adjacency(), users, pos, neg, self.hparams.weight_decay)
        self.log("train/bpr_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(e))
        return loss

    def val_dataloader(self) -> DataLoader:
        n = len(self.held) if self.held is not None else 0
        return DataLoader(TensorDataset(torch.arange(n)), batch_size=1024)

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            self._val_emb = self.model.split(self.model(self.adjacency()))

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        rows = batch[0].cpu().numpy()
        user_emb, item_emb = self._val_emb
        users = torch.as_tensor(self.held.users[rows], device=self.device)
        scores = (user_emb[users] @ item_emb.t()).cpu()
        _update_recall(self.recall, scores, rows, self.held, self._ptr, self.graph.edge_item)

    def on_validation_epoch_end(self) -> None:
        self.log(self.recall_name, self.recall.compute(), prog_bar=True)
        self.recall.reset()
        self._val_emb = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)


def fit_retriever(module: RetrieverModule, *, epochs: int, patience: int, ckpt_dir: str | Path,
                  log_dir: str | Path | None, trainer_cfg: Any = None,
                  limit_train_batches: int | float | None = None,
                  extra_callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train ``module`` with Lightning (early stopping + best checkpoint on val recall@k).

    The graph is propagated whole on one device (``devices=1``); ``trainer_cfg`` supplies the
    accelerator, precision, determinism, progress bar and log interval (None: the defaults).
    Loads the best weights back into ``module`` and returns ``{"best_checkpoint", "best_recall",
    "epochs", "seconds"}``.
    """
    has_val = module.held is not None and len(module.held) > 0
    monitor = module.recall_name if has_val else None
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=monitor,
                           mode="max", save_top_k=1, save_last=False, enable_version_counter=False)
    callbacks: list[Any] = [ckpt, *(extra_callbacks or [])]
    if has_val:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=patience))
    steps = max(1, -(-module.graph.num_edges // module.hparams.batch_size))
    tc = trainer_cfg
    trainer = trainer_from_config(
        tc, max_epochs=epochs, callbacks=callbacks, progress_name="retriever",
        # the whole graph propagates on one device, whatever trainer.devices says for the LLM
        devices=1, strategy="auto", num_nodes=1,
        logger=TensorBoardLogger(str(log_dir), name="", version="") if log_dir else False,
        log_every_n_steps=min(int(getattr(tc, "log_every_n_steps", 10)), steps),
        limit_val_batches=1.0 if has_val else 0, limit_train_batches=limit_train_batches,
        gradient_clip_val=None,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start
    best = ckpt.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    score = ckpt.best_model_score
    return {"best_checkpoint": best, "best_recall": None if score is None else float(score),
            "epochs": trainer.current_epoch, "seconds": round(seconds, 2)}
