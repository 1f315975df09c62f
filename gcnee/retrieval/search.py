"""Chunked cosine top-k search: the most similar rows of a key matrix for every query row.

Memory stays O(chunk × keys): queries are processed ``chunk`` rows at a time and a full
queries × keys similarity matrix is never built (the paper's larger datasets have ~300 k users).
Ties are broken deterministically: equal scores rank the lower key index first, whatever the
chunk size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def normalize_rows(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows scaled to unit L2 norm, float32 (all-zero rows stay zero: cosine 0 to everyone)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    return F.normalize(x, p=2.0, dim=1, eps=1e-12)


def _topk_rows(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``sims`` (c, n): top-k column indices and values, ties -> lower index first.

    ``torch.topk`` leaves the order of equal values unspecified, so every value tied with the
    k-th largest is gathered and the candidates are ordered by (score desc, index asc).
    """
    c, n = sims.shape
    kth = torch.topk(sims, k, dim=1, sorted=True).values[:, k - 1 : k]  # (c, 1)
    rows, cols = (sims >= kth).nonzero(as_tuple=True)  # row-major: cols ascending per row
    vals = sims[rows, cols]
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]  # group rows, keep (val, col)
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = torch.bincount(rows, minlength=c)
    starts = torch.cumsum(counts, 0) - counts
    pick = (starts.unsqueeze(1) + torch.arange(k).unsqueeze(0)).reshape(-1)  # first k per row
    return cols[pick].view(c, k), vals[pick].view(c, k)


@torch.no_grad()
def topk_cosine(
    queries: torch.Tensor | np.ndarray,
    keys: torch.Tensor | np.ndarray,
    k: int,
    chunk: int = 1024,
    query_index: torch.Tensor | np.ndarray | None = None,
    normalized: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k keys by cosine similarity for every query.

    Args:
        queries: (m, d) query vectors.
        keys: (n, d) key vectors.
        k: neighbours per query; clamped to the number of candidate keys.
        chunk: query rows per block; peak extra memory is about ``chunk × n`` floats.
        query_index: (m,) optional key index of each query itself, excluded from its result
            (self-exclusion when queries are the keys' own rows); -1 means "not a key".
        normalized: rows are already unit-norm (skip normalisation).

    Returns:
        ``(indices, scores)``: int64 (m, k') key indices, best first, and float32 (m, k')
        cosine scores, with ``k' = min(k, n - 1 if query_index is given else n)``.
    """
    q = torch.as_tensor(queries, dtype=torch.float32)
    kv = torch.as_tensor(keys, dtype=torch.float32)
    if not normalized:
        q, kv = normalize_rows(q), normalize_rows(kv)
    m, n = q.shape[0], kv.shape[0]
    if chunk < 1:
        raise ValueError(f"retriever.search_chunk must be >= 1, got {chunk}")
    qi = None if query_index is None else torch.as_tensor(query_index, dtype=torch.long)
    k = max(0, min(k, n - 1 if qi is not None else n))
    out_idx = np.zeros((m, k), dtype=np.int64)
    out_val = np.zeros((m, k), dtype=np.float32)
    if k == 0 or m == 0:
        return out_idx, out_val
    kt = kv.t().contiguous()
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        sims = q[start:stop] @ kt  # (c, n)
        if qi is not None:
            own = qi[start:stop]
            rows = torch.nonzero(own >= 0, as_tuple=True)[0]
            sims[rows, own[rows]] = float("-inf")
        idx, val = _topk_rows(sims, k)
        out_idx[start:stop] = idx.numpy()
        out_val[start:stop] = val.numpy()
    return out_idx, out_val
