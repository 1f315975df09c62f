"""Samples -> id tensors for the baseline CTR models.

Vocabularies (users, items, rating values, item categories) come from the TRAINING split only;
an id not seen there maps to ``OOV`` (1) and padding is ``PAD`` (0). Items of the training
vocabulary are those of the training samples' targets and histories.

``FeatureEncoder.encode(samples)`` gives one dict of tensors for a whole split:

- ``user``, ``item``: (N,) int64 ids; ``label``: (N,) float32; ``sample_id``: (N,) int64;
- ``hist_items``, ``hist_ratings``: (N, T) int64, the history oldest first, RIGHT-padded with
  ``PAD`` (the most recent ``max_history`` entries are kept);
- ``hist_mask``: (N, T) bool, True at the real behaviours (always a prefix of each row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from gcnee.data.tables import Items, Sample

PAD, OOV = 0, 1
# Items.extra fields read as item categories (SIM's hard search), first match wins
CATEGORY_FIELDS = ("class", "genre", "genres", "category", "categories")


def _index(values: Sequence) -> dict:
    """{value: id} with ids from 2 (0 = padding, 1 = out-of-vocabulary), in sorted order."""
    return {v: i + 2 for i, v in enumerate(sorted(set(values)))}


def item_categories(items: Items | None, item_ids: dict[str, int]) -> tuple[list[str], np.ndarray]:
    """(category names, multi-hot matrix (len(item_ids) + 2, n_categories) float32).

    Categories come from the first field of ``CATEGORY_FIELDS`` present in ``Items.extra`` (a
    list of strings or one string). No such field: no categories (a (n, 0) matrix).
    """
    n = len(item_ids) + 2
    extra = items.extra if items is not None else {}
    name = next((f for f in CATEGORY_FIELDS if any(f in e for e in extra.values())), None)
    if name is None:
        return [], np.zeros((n, 0), dtype=np.float32)

    def cats(item: str) -> list[str]:
        v = extra.get(item, {}).get(name)
        if v is None:
            return []
        return [str(c) for c in v] if isinstance(v, (list, tuple)) else [str(v)]

    names = sorted({c for item in item_ids for c in cats(item)})
    col = {c: j for j, c in enumerate(names)}
    matrix = np.zeros((n, len(names)), dtype=np.float32)
    for item, row in item_ids.items():
        for c in cats(item):
            matrix[row, col[c]] = 1.0
    return names, matrix


@dataclass
class FeatureEncoder:
    """Id vocabularies learned from the training split; encodes any split with them."""

    users: dict[str, int]
    items: dict[str, int]
    ratings: dict[float, int]
    max_history: int
    categories: list[str] = field(default_factory=list)
    item_categories: np.ndarray | None = None  # (n_items, n_categories) multi-hot

    @classmethod
    def fit(cls, train: Sequence[Sample], items: Items | None = None) -> FeatureEncoder:
        if not train:
            raise ValueError("the training split is empty: nothing to learn the baselines from")
        item_values = [s.item for s in train] + [i for s in train for i in s.history_items]
        enc = cls(users=_index([s.user for s in train]), items=_index(item_values),
                  ratings=_index([float(r) for s in train for r in s.history_ratings]),
                  max_history=max(len(s.history_items) for s in train))
        enc.categories, enc.item_categories = item_categories(items, enc.items)
        return enc

    def sizes(self) -> dict[str, int]:
        """Embedding-table sizes (vocabulary + padding + OOV) and the history length."""
        return {"n_users": len(self.users) + 2, "n_items": len(self.items) + 2,
                "n_ratings": len(self.ratings) + 2, "max_history": self.max_history}

    def genre_tensor(self) -> torch.Tensor | None:
        """Item categories as a float tensor (n_items, G), or None when there are none."""
        if self.item_categories is None or self.item_categories.shape[1] == 0:
            return None
        return torch.from_numpy(self.item_categories)

    def encode(self, samples: Sequence[Sample],
               width: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors of a split (shapes in the module docstring). ``width`` = T, the padded history
        length (default: the longest kept history of ``samples``; never less than that)."""
        n = len(samples)
        kept = [min(len(s.history_items), self.max_history) for s in samples]
        t = max(kept, default=0)
        if width is not None:
            if width < t:
                raise ValueError(f"width {width} is shorter than the longest history ({t})")
            t = width
        t = max(t, 1)  # models index at least one step
        hist_items = np.zeros((n, t), dtype=np.int64)
        hist_ratings = np.zeros((n, t), dtype=np.int64)
        for row, (s, k) in enumerate(zip(samples, kept, strict=True)):
            if k:
                hist_items[row, :k] = [self.items.get(i, OOV) for i in s.history_items[-k:]]
                hist_ratings[row, :k] = [self.ratings.get(float(r), OOV)
                                         for r in s.history_ratings[-k:]]
        steps = np.arange(t)[None, :]
        return {
            "user": torch.tensor([self.users.get(s.user, OOV) for s in samples], dtype=torch.long),
            "item": torch.tensor([self.items.get(s.item, OOV) for s in samples], dtype=torch.long),
            "hist_items": torch.from_numpy(hist_items),
            "hist_ratings": torch.from_numpy(hist_ratings),
            "hist_mask": torch.from_numpy(steps < np.asarray(kept, dtype=np.int64)[:, None]),
            "label": torch.tensor([float(s.label) for s in samples], dtype=torch.float32),
            "sample_id": torch.tensor([s.sample_id for s in samples], dtype=torch.long),
        }

    def oov_rates(self, samples: Sequence[Sample]) -> dict[str, float]:
        """Share of users, target items and history items of ``samples`` unknown to training."""
        if not samples:
            return {"users": 0.0, "items": 0.0, "history_items": 0.0}
        hist = [i for s in samples for i in s.history_items]
        return {
            "users": float(np.mean([s.user not in self.users for s in samples])),
            "items": float(np.mean([s.item not in self.items for s in samples])),
            "history_items": float(np.mean([i not in self.items for i in hist])) if hist else 0.0,
        }


class EncodedSplit(Dataset):
    """A split's tensors as a Dataset; ``__getitems__`` slices a whole batch at once."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.n = len(tensors["label"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``EncodedSplit.__getitems__`` already returns the batch: the DataLoader passes it on."""
    return batch
