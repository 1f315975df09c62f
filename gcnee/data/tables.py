"""The tables every stage shares: interactions, items, CTR samples, and the data stage's output.

Readers (``gcnee.data.readers``) produce ``Interactions`` + ``Items``; the sample builder
(``gcnee.data.samples``) turns them into ``Sample`` rows split into train/val/test; the data stage
saves all of it with ``PreparedData.save`` and later stages read it with ``PreparedData.load``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gcnee.stages import atomic_path, read_json, write_json

SPLITS = ("train", "val", "test")


@dataclass
class Interactions:
    """One row per (user, item) rating event. All arrays have shape (n,)."""

    user: np.ndarray  # str
    item: np.ndarray  # str
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64 (seconds, or a deterministic order index where none exists)

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=str)
        self.item = np.asarray(self.item, dtype=str)
        self.rating = np.asarray(self.rating, dtype=np.float32)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        n = len(self.user)
        if not (len(self.item) == len(self.rating) == len(self.timestamp) == n):
            raise ValueError("Interactions columns must have the same length")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask_or_index: np.ndarray) -> Interactions:
        return Interactions(self.user[mask_or_index], self.item[mask_or_index],
                            self.rating[mask_or_index], self.timestamp[mask_or_index])

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, user=self.user, item=self.item, rating=self.rating,
                         timestamp=self.timestamp)

    @classmethod
    def load(cls, path: str | Path) -> Interactions:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["user"], z["item"], z["rating"], z["timestamp"])

    @classmethod
    def empty(cls) -> Interactions:
        return cls([], [], [], [])


@dataclass
class Items:
    """Item metadata: every item id maps to a title; ``extra`` holds optional fields."""

    titles: dict[str, str]
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.titles)

    def save(self, path: str | Path) -> None:
        write_json(path, {"titles": self.titles, "extra": self.extra})

    @classmethod
    def load(cls, path: str | Path) -> Items:
        d = read_json(path)
        return cls(d["titles"], d.get("extra", {}))


@dataclass
class Sample:
    """A CTR sample: will ``user`` like ``item``? History is chronological, oldest first."""

    sample_id: int
    user: str
    item: str
    title: str
    rating: float
    label: int
    timestamp: int
    history_items: list[str]
    history_titles: list[str]
    history_ratings: list[float]


def save_samples(path: str | Path, samples: list[Sample]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for s in samples:
                f.write(json.dumps(vars(s), ensure_ascii=False) + "\n")


def load_samples(path: str | Path) -> list[Sample]:
    with open(path) as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]


@dataclass
class PreparedData:
    """Everything the data stage hands to later stages.

    ``graph`` holds the interactions that may be used as known context by retrieval and prompts:
    all interactions except the targets of validation and test samples (so no evaluation label
    ever enters the retriever's graph or a similar user's examples).
    """

    interactions: Interactions
    graph: Interactions
    items: Items
    splits: dict[str, list[Sample]]
    few_shot_ids: list[int]  # sample_ids of the training samples the LLM is tuned on

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.interactions.save(folder / "interactions.npz")
        self.graph.save(folder / "graph.npz")
        self.items.save(folder / "items.json")
        for name in SPLITS:
            save_samples(folder / f"{name}.jsonl", self.splits[name])
        write_json(folder / "few_shot.json", self.few_shot_ids)

    @classmethod
    def load(cls, folder: str | Path) -> PreparedData:
        folder = Path(folder)
        return cls(
            interactions=Interactions.load(folder / "interactions.npz"),
            graph=Interactions.load(folder / "graph.npz"),
            items=Items.load(folder / "items.json"),
            splits={name: load_samples(folder / f"{name}.jsonl") for name in SPLITS},
            few_shot_ids=read_json(folder / "few_shot.json"),
        )

    def few_shot(self) -> list[Sample]:
        keep = set(self.few_shot_ids)
        return [s for s in self.splits["train"] if s.sample_id in keep]
