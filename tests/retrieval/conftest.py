"""Synthetic data for the retriever tests: users in planted communities, each preferring the
items of its own community (Zipf-skewed so popularity is a real baseline)."""

from __future__ import annotations

import numpy as np
import pytest

from gcnee.config import load_config
from gcnee.data.samples import build_samples, few_shot_ids, graph_interactions, split_samples
from gcnee.data.tables import Interactions, Items, PreparedData
from gcnee.stages import MARKER, write_json


def community_interactions(n_comm: int = 4, users_per: int = 40, items_per: int = 30,
                           per_user: int = 16, p_in: float = 0.9, seed: int = 0
                           ) -> tuple[Interactions, Items, dict[str, int]]:
    """Interactions where user ``u{c}_{j}`` rates mostly items ``i{c}_{*}`` of community c."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, items_per + 1) ** 0.8
    zipf /= zipf.sum()
    users, items, ratings, stamps, comm = [], [], [], [], {}
    for c in range(n_comm):
        for j in range(users_per):
            user = f"u{c}_{j}"
            comm[user] = c
            chosen: set[tuple[int, int]] = set()
            while len(chosen) < per_user:
                cc = c if rng.random() < p_in else int(rng.integers(n_comm))
                chosen.add((cc, int(rng.choice(items_per, p=zipf))))
            for t, (cc, i) in enumerate(rng.permutation(sorted(chosen))):
                users.append(user)
                items.append(f"i{cc}_{i}")
                ratings.append(float(rng.integers(1, 6)))
                stamps.append(1000 + t)
    titles = {f"i{c}_{i}": f"Movie {c} {i}" for c in range(n_comm) for i in range(items_per)}
    return Interactions(users, items, ratings, stamps), Items(titles), comm


def prepare(inter: Interactions, items: Items, seed: int = 0) -> PreparedData:
    """The data stage's own functions on in-memory interactions (no files)."""
    cfg = load_config(None, ["data.min_history=2", "data.max_history=10"])
    samples = build_samples(inter, items, cfg.data)
    splits = split_samples(samples, cfg.data, seed)
    return PreparedData(interactions=inter, graph=graph_interactions(inter, splits), items=items,
                        splits=splits, few_shot_ids=few_shot_ids(splits["train"], cfg.data, seed))


def save_as_data_stage(data: PreparedData, checkpoints_dir, run_name: str) -> None:
    """Write ``data`` where the retriever stage reads it, with a completion marker."""
    folder = checkpoints_dir / run_name / "data"
    folder.mkdir(parents=True, exist_ok=True)
    data.save(folder)
    write_json(folder / MARKER, {"stage": "data", "fingerprint": "test", "summary": {}})


@pytest.fixture(scope="session")
def community():
    """(PreparedData, {user: community}) for 160 users, 120 items, ~2.5k interactions."""
    inter, items, comm = community_interactions()
    return prepare(inter, items), comm
