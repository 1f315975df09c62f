"""``SimilarUsers``: the retriever stage's output, one interface for every ``retriever.kind``.

Files in the folder:

* ``similar_users.npz``: ``user_ids`` (n,) graph users, ``neighbors`` (n, k) int64 row indices
  into ``user_ids`` (best first, self excluded, -1 = none), ``scores`` (n, k) float32 cosine
  similarities (0 for ``random``), and ``meta`` (JSON: kind, k, seed);
* ``cold.npz`` (``gcn`` only): what a user absent from the graph needs — ``item_ids`` (I,),
  ``item_layers`` (K+1, I, d) item layer embeddings, ``item_degree`` (I,), ``alpha`` (K+1,) and
  ``user_emb`` (n, d) unit-norm combined user embeddings to search against.

Cold start (a user not in the graph): ``gcn`` derives the user's embedding from their history
items (:func:`gcnee.retrieval.lightgcn.cold_user_embedding`) and searches all graph users;
``llm`` does the same through an attached history encoder (:meth:`SimilarUsers.attach_encoder`,
since embedding a new history needs the LM at query time), and returns ``[]`` without one;
``random`` draws k graph users seeded by (seed, user); ``none`` always returns ``[]``. A cold user
with no history item known to the graph gets ``[]``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gcnee.retrieval.lightgcn import cold_user_embedding
from gcnee.retrieval.search import normalize_rows, topk_cosine
from gcnee.stages import atomic_path

KINDS = ("gcn", "llm", "random", "none")
TABLE = "similar_users.npz"
COLD = "cold.npz"


def user_rng(seed: int, user: str) -> np.random.Generator:
    """A generator seeded by (seed, user), stable across processes (crc32, not ``hash``)."""
    return np.random.default_rng([seed, zlib.crc32(user.encode("utf-8"))])


def random_neighbors(num_users: int, k: int, seed: int, user: str,
                     exclude: int | None = None) -> np.ndarray:
    """(k',) distinct random user indices, ``exclude`` left out, seeded by (seed, user)."""
    pool = num_users - (exclude is not None)
    k = max(0, min(k, pool))
    pick = user_rng(seed, user).choice(pool, size=k, replace=False)
    if exclude is not None:
        pick = pick + (pick >= exclude)
    return pick.astype(np.int64)


class SimilarUsers:
    """Top-k similar graph users per user, plus what cold-start queries need.

    Args:
        kind: gcn | llm | random | none. k: neighbours per user. seed: for ``random``.
        user_ids: (n,) graph users. neighbors: (n, k) int64 (-1 padded). scores: (n, k).
        cold: ``gcn`` only, arrays described in the module docstring.
    """

    def __init__(self, kind: str, k: int, user_ids: np.ndarray, neighbors: np.ndarray,
                 scores: np.ndarray, seed: int = 0, cold: dict[str, np.ndarray] | None = None):
        if kind not in KINDS:
            raise ValueError(f"retriever.kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.k, self.seed = kind, int(k), int(seed)
        self.user_ids = np.asarray(user_ids, dtype=str)
        self.neighbors = np.asarray(neighbors, dtype=np.int64).reshape(len(self.user_ids), -1)
        self.scores = np.asarray(scores, dtype=np.float32).reshape(self.neighbors.shape)
        self.cold = cold
        self._index = {u: i for i, u in enumerate(self.user_ids.tolist())}
        self._item_index = ({it: i for i, it in enumerate(cold["item_ids"].tolist())}
                            if cold is not None else {})
        self._encoder: Callable[[list[str]], np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def __contains__(self, user: str) -> bool:
        return user in self._index

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.dumps({"kind": self.kind, "k": self.k, "seed": self.seed})
        with atomic_path(folder / TABLE) as tmp, open(tmp, "wb") as f:
            np.savez(f, user_ids=self.user_ids, neighbors=self.neighbors, scores=self.scores,
                     meta=np.array(meta))
        if self.cold is not None:
            with atomic_path(folder / COLD) as tmp, open(tmp, "wb") as f:
                np.savez(f, **self.cold)

    @classmethod
    def load(cls, folder: str | Path) -> SimilarUsers:
        folder = Path(folder)
        path = folder / TABLE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run the retriever stage (`gcnee fit --config ... "
                f"--stages retriever`, config key retriever.kind)")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("user_ids", "neighbors", "scores")}
        cold = None
        if (folder / COLD).is_file():
            with np.load(folder / COLD, allow_pickle=False) as z:
                cold = {k: z[k] for k in z.files}
        return cls(meta["kind"], meta["k"], seed=meta["seed"], cold=cold, **arrays)

    def attach_encoder(self, encode: Callable[[list[str]], np.ndarray | None],
                       user_emb: np.ndarray) -> None:
        """For ``llm``: ``encode(history_items) -> (d,)`` embeds a cold user's history, searched
        against ``user_emb`` (n, d), the graph users' embeddings in ``user_ids`` order."""
        self._encoder = encode
        self._llm_user_emb = normalize_rows(user_emb)

    def cold_status(self, user: str, history_items: list[str]) -> str:
        """How :meth:`get` answers: ``in_graph``, ``cold_embedded`` (derived from history),
        ``cold_random``, or ``cold_empty`` (the fallback: no similar users)."""
        if self.kind == "none":
            return "cold_empty" if user not in self._index else "in_graph"
        if user in self._index:
            return "in_graph"
        if self.kind == "random":
            return "cold_random" if len(self) else "cold_empty"
        if self.kind == "gcn":
            known = [it for it in history_items if it in self._item_index]
            return "cold_embedded" if known and self.cold is not None else "cold_empty"
        return "cold_embedded" if self._encoder is not None and history_items else "cold_empty"

    def get(self, user: str, history_items: list[str]) -> list[tuple[str, float]]:
        """Top-k other users ``(user id, score)``, best first (see the module docstring).

        ``history_items`` is used only for users absent from the graph.
        """
        if self.kind == "none" or self.k == 0:
            return []
        row = self._index.get(user)
        if row is not None:
            nb, sc = self.neighbors[row], self.scores[row]
            return [(str(self.user_ids[j]), float(s)) for j, s in zip(nb, sc) if j >= 0]
        if self.kind == "random":
            pick = random_neighbors(len(self), self.k, self.seed, user)
            return [(str(self.user_ids[j]), 0.0) for j in pick]
        vec, keys = None, None
        if self.kind == "gcn" and self.cold is not None:
            hist = [self._item_index[it] for it in history_items if it in self._item_index]
            vec = cold_user_embedding(self.cold["item_layers"], self.cold["item_degree"],
                                      self.cold["alpha"], hist)
            keys = self.cold["user_emb"]
        elif self.kind == "llm" and self._encoder is not None and history_items:
            vec, keys = self._encoder(history_items), self._llm_user_emb
        if vec is None:
            return []
        idx, val = topk_cosine(np.asarray(vec)[None], keys, self.k)
        return [(str(self.user_ids[j]), float(s)) for j, s in zip(idx[0], val[0])]
