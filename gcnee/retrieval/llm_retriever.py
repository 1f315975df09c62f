"""The paper's "LLM-retriever" baseline: users embedded by a causal LM from their history text.

Each user's history (training-graph interactions, oldest first) is rendered as one text
(:func:`render_history`), run through the LM, and the last hidden layer is mean-pooled over the
non-pad tokens (:func:`embed_texts`); similar users are the cosine top-k of those vectors
(:func:`gcnee.retrieval.search.topk_cosine`). Texts longer than ``max_length`` tokens keep their
most recent part (left truncation). Batches are formed from texts sorted by length so padding
stays small, right-padded so that (causal attention) every row's hidden states equal its
unbatched ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

HISTORY_PREFIX = "The user rated: "


def render_history(titles: Sequence[str], ratings: Sequence[float]) -> str:
    """``"The user rated: Title A (5 stars); Title B (3 stars)."`` (chronological order)."""
    parts = [f"{t} ({r:g} stars)" for t, r in zip(titles, ratings)]
    return HISTORY_PREFIX + "; ".join(parts) + "."


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (no vocab projection is needed)."""
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else model


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8,
                max_length: int = 512, progress: bool = True) -> np.ndarray:
    """(n, hidden) float32 mean-pooled last-hidden-layer embeddings of ``texts``.

    ``model`` is a causal LM (``AutoModelForCausalLM``); its decoder (``model.base_model``) is
    run once per batch. Rows come back in the order of ``texts``.
    """
    if batch_size < 1:
        raise ValueError(f"retriever.llm_batch_size must be >= 1, got {batch_size}")
    n = len(texts)
    if n == 0:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        ids = tokenizer(list(texts), add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        decoder = _backbone(model)
        device = next(model.parameters()).device
        out = np.zeros((n, model.config.hidden_size), dtype=np.float32)
        bar = tqdm(total=n, desc="LLM retriever: embedding users", disable=not progress,
                   unit="user")
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer.pad({"input_ids": [ids[r] for r in rows]}, padding=True,
                                return_tensors="pt")
            am = enc["attention_mask"].to(device)
            hidden = decoder(input_ids=enc["input_ids"].to(device),
                             attention_mask=am).last_hidden_state  # (b, t, h)
            m = am.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out[rows] = pooled.float().cpu().numpy()
            bar.update(len(rows))
        bar.close()
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
    return out


def user_history_texts(user_ids: Sequence[str], users: np.ndarray, items: np.ndarray,
                       ratings: np.ndarray, timestamps: np.ndarray,
                       titles: dict[str, str]) -> list[str]:
    """One history text per user of ``user_ids``, from interaction columns (all (E,)).

    Interactions are ordered by (timestamp, original position); unknown titles fall back to the
    item id.
    """
    order = np.lexsort((np.arange(len(users)), timestamps))
    by_user: dict[str, tuple[list[str], list[float]]] = {u: ([], []) for u in user_ids}
    for j in order:
        entry = by_user.get(users[j])
        if entry is not None:
            entry[0].append(titles.get(items[j], str(items[j])))
            entry[1].append(float(ratings[j]))
    return [render_history(*by_user[u]) for u in user_ids]
