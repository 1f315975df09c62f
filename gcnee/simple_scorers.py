"""Simple non-LLM scorers on the LLM's own evaluation samples, so a weak LLM is never mistaken
for a strong one (docs/measurements.md §4).

- ``item_mean``: the target item's mean rating in the context graph (``PreparedData.graph``:
  training interactions only, no evaluation target), shrunk toward the global mean.
- ``history_mean``: the mean of the ratings in the sample's own history (what the prompt shows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gcnee.data.tables import Interactions, PreparedData, Sample

SCORERS = ("item_mean", "history_mean")


def item_mean_table(graph: Interactions, shrinkage: float = 5.0) -> tuple[dict[str, float], float]:
    """({item: shrunk mean rating}, global mean): ``(sum + k * global) / (count + k)``."""
    if len(graph) == 0:
        return {}, 0.0
    global_mean = float(graph.rating.mean())
    items, inverse = np.unique(graph.item, return_inverse=True)
    sums = np.bincount(inverse, weights=graph.rating.astype(np.float64))
    counts = np.bincount(inverse)
    means = (sums + shrinkage * global_mean) / (counts + shrinkage)
    return dict(zip(items.tolist(), means.tolist(), strict=True)), global_mean


def score_simple(name: str, prepared: PreparedData, samples: Sequence[Sample],
                 shrinkage: float = 5.0) -> np.ndarray:
    """Scores (shape (len(samples),), float64, rating scale) of scorer ``name`` for ``samples``.

    Items absent from the graph, and samples with an empty history, get the global mean.
    """
    table, global_mean = item_mean_table(prepared.graph, shrinkage)
    if name == "item_mean":
        return np.array([table.get(s.item, global_mean) for s in samples], dtype=np.float64)
    if name == "history_mean":
        return np.array([float(np.mean(s.history_ratings)) if s.history_ratings else global_mean
                         for s in samples], dtype=np.float64)
    raise ValueError(f"unknown simple scorer {name!r}; known: {', '.join(SCORERS)}")
