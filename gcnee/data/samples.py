"""CTR samples from an interactions table: histories, labels, the split, the graph, few-shot.

Rules (docs/method.md §1), all deterministic for a given seed:

- **Order.** Each user's interactions are sorted by ``(timestamp, row index)``: the row index of
  the interactions table (the reader's file order) breaks timestamp ties, so equal timestamps keep
  the order they had in the raw file.
- **Samples.** An interaction becomes a sample when the user has at least ``data.min_history``
  *usable* earlier interactions; its history is the last ``data.max_history`` of them, oldest
  first. Usable means "not the same item as the target": a repeated rating of the target item is
  left out of its own history (otherwise the history would give the answer away), and it does not
  count towards ``min_history`` either.
- **Label.** ``rating <data.label_op> data.label_threshold`` (``>`` or ``>=``) -> 1, else 0.
- **Sample id.** The target interaction's row index in the interactions table, so anything keyed
  on interactions (the graph) can exclude a sample's target by index.
- **Split.** ``random``: one seeded permutation of all samples cut ``data.split_ratios`` (8:1:1),
  so users stay warm. ``global_time``: samples sorted by ``(timestamp, sample_id)``, the earliest
  share is train, then val, then test. On ML-100K this leaves most test samples with users who
  have no training sample at all (86 % measured, docs/method.md §1): a retriever keyed on graph
  membership finds nothing for them unless it derives cold-user embeddings from the history.
- **Graph.** Every interaction except the targets of val/test samples, and except any other
  rating of the same (user, item) pair as such a target (a repeated rating would put the
  evaluation pair into the retriever's graph).
- **Few-shot.** ``data.few_shot_count`` or ``data.few_shot_fraction`` of train, seeded; both
  null means all of train. ``data.few_shot_balance`` decides its classes: ``none`` (a plain
  draw: the split's imbalance), ``stratified`` (the split's rate exactly) or ``balanced`` (as
  many negatives as positives where the data allows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from gcnee.config import ConfigError
from gcnee.data.errors import DataError
from gcnee.data.tables import SPLITS, Interactions, Items, Sample
from gcnee.progress import lines_wanted, progress

LABEL_OPS = (">", ">=")
SPLIT_KINDS = ("random", "global_time")
# Separate random streams per use, so changing the few-shot size never changes the split.
_SPLIT_STREAM, _FEW_SHOT_STREAM = 1, 2


def _check_sample_cfg(data_cfg: DictConfig) -> None:
    if data_cfg.label_op not in LABEL_OPS:
        raise ConfigError(
            f"data.label_op must be one of {', '.join(LABEL_OPS)}, got {data_cfg.label_op!r}"
        )
    if data_cfg.max_history < 1:
        raise ConfigError(f"data.max_history must be >= 1, got {data_cfg.max_history}")
    if data_cfg.min_history < 0:
        raise ConfigError(f"data.min_history must be >= 0, got {data_cfg.min_history}")


def user_order(inter: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """Row indices sorted by (user, timestamp, row index), and the start of each user's run.

    Returns ``(order, starts)``: ``order`` has shape (n,); ``starts`` has shape (users + 1,) with
    ``order[starts[u]:starts[u + 1]]`` the u-th user's rows in chronological order.
    """
    rows = np.arange(len(inter))
    order = np.lexsort((rows, inter.timestamp, inter.user))
    users = inter.user[order]
    change = np.flatnonzero(users[1:] != users[:-1]) + 1 if len(users) else np.array([], int)
    starts = np.concatenate([[0], change, [len(users)]]).astype(np.int64)
    return order, starts


def build_samples(inter: Interactions, items: Items, data_cfg: DictConfig) -> list[Sample]:
    """All CTR samples of ``inter``, ordered by user then time (see the module docstring).

    Every item in ``inter`` must have a title in ``items`` (the readers guarantee it; a missing
    one raises ``DataError``). Raises ``DataError`` when no interaction has enough history.
    """
    _check_sample_cfg(data_cfg)
    missing = sorted(set(np.unique(inter.item).tolist()) - set(items.titles))
    if missing:
        raise DataError(
            f"{len(missing)} item(s) in the interactions have no entry in the items table "
            f"(e.g. {', '.join(missing[:5])}); see data.missing_title"
        )
    max_h, min_h = int(data_cfg.max_history), int(data_cfg.min_history)
    thr, ge = float(data_cfg.label_threshold), data_cfg.label_op == ">="
    titles = items.titles
    order, starts = user_order(inter)
    item_col = inter.item.tolist()  # Python lists: far faster than numpy scalars in the loop
    rating_col = inter.rating.tolist()
    ts_col = inter.timestamp.tolist()
    user_col = inter.user.tolist()

    samples: list[Sample] = []
    n_users = len(starts) - 1
    users = range(n_users)
    if lines_wanted():  # a log file: plain lines, and only if the build is slow
        users = progress(users, "data: building samples", unit="user", only_if_slow=True)
    else:
        users = tqdm(users, desc="samples", unit="user", disable=len(inter) < 200_000)
    for u in users:
        rows = order[starts[u]:starts[u + 1]].tolist()
        seen: dict[str, int] = {}  # item -> earlier ratings of it by this user
        for j, row in enumerate(rows):
            item = item_col[row]
            usable = j - seen.get(item, 0)
            seen[item] = seen.get(item, 0) + 1
            if usable < min_h:
                continue
            hist: list[int] = []
            k = j - 1
            while k >= 0 and len(hist) < max_h:
                if item_col[rows[k]] != item:
                    hist.append(rows[k])
                k -= 1
            hist.reverse()
            rating = rating_col[row]
            samples.append(Sample(
                sample_id=row,
                user=user_col[row],
                item=item,
                title=titles[item],
                rating=rating,
                label=int(rating >= thr if ge else rating > thr),
                timestamp=ts_col[row],
                history_items=[item_col[h] for h in hist],
                history_titles=[titles[item_col[h]] for h in hist],
                history_ratings=[rating_col[h] for h in hist],
            ))
    if not samples:
        raise DataError(
            f"no samples: no user has at least data.min_history={min_h} earlier interactions "
            f"(with a different item) before any of their {len(inter)} interactions "
            f"({n_users} users)"
        )
    return samples


def _check_ratios(data_cfg: DictConfig) -> list[float]:
    ratios = [float(r) for r in data_cfg.split_ratios]
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(
            "data.split_ratios must be three non-negative shares (train, val, test) summing to "
            f"1, got {ratios}"
        )
    return ratios


def split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test sizes: val and test rounded, train takes the rest (each within 1 of exact)."""
    n_val, n_test = round(n * ratios[1]), round(n * ratios[2])
    return n - n_val - n_test, n_val, n_test


def split_samples(
    samples: list[Sample], data_cfg: DictConfig, seed: int
) -> dict[str, list[Sample]]:
    """``{"train"|"val"|"test": samples}`` per ``data.split``; each list keeps the input order.

    Raises ``ConfigError`` for a bad ``data.split``/``data.split_ratios`` and ``DataError`` when
    a split with a non-zero ratio ends up empty.
    """
    ratios = _check_ratios(data_cfg)
    n = len(samples)
    if data_cfg.split == "random":
        order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    elif data_cfg.split == "global_time":
        ids = np.array([s.sample_id for s in samples], dtype=np.int64)
        ts = np.array([s.timestamp for s in samples], dtype=np.int64)
        order = np.lexsort((ids, ts))
    else:
        raise ConfigError(
            f"data.split must be one of {', '.join(SPLIT_KINDS)}, got {data_cfg.split!r}"
        )
    n_train, n_val, _ = split_sizes(n, ratios)
    which = np.empty(n, dtype=np.int64)
    which[order[:n_train]] = 0
    which[order[n_train:n_train + n_val]] = 1
    which[order[n_train + n_val:]] = 2
    out = {name: [s for s, w in zip(samples, which) if w == i] for i, name in enumerate(SPLITS)}
    for name, ratio in zip(SPLITS, ratios):
        if ratio > 0 and not out[name]:
            raise DataError(
                f"the {name} split is empty: {n} samples with data.split_ratios={ratios}; "
                "use more data, lower data.min_history or change data.split_ratios"
            )
    return out


def graph_interactions(inter: Interactions, splits: dict[str, list[Sample]]) -> Interactions:
    """The interactions allowed as known context: all but val/test targets (and their pairs)."""
    held_out = [s for name in ("val", "test") for s in splits[name]]
    keep = np.ones(len(inter), dtype=bool)
    keep[[s.sample_id for s in held_out]] = False
    pairs = {(s.user, s.item) for s in held_out}
    if pairs:
        # Repeated ratings of a held-out (user, item) pair: rare, so a Python pass is fine.
        for i in np.flatnonzero(keep).tolist():
            if (inter.user[i], inter.item[i]) in pairs:
                keep[i] = False
    return inter.take(keep)


FEW_SHOT_BALANCES = ("none", "stratified", "balanced")


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """``{"samples", "positives", "negatives"}`` of ``samples``."""
    pos = sum(1 for s in samples if s.label)
    return {"samples": len(samples), "positives": pos, "negatives": len(samples) - pos}


def _class_sizes(k: int, n_pos: int, n_neg: int, balance: str) -> tuple[int, int]:
    """(positives, negatives) of a ``k``-sample draw from ``n_pos`` + ``n_neg`` samples."""
    if balance == "stratified":
        pos = min(n_pos, max(0, round(k * n_pos / (n_pos + n_neg))))
        neg = min(n_neg, k - pos)
        return min(n_pos, k - neg), neg
    # balanced: half each; where one class is short, all of it and the rest from the other
    neg = min(n_neg, k // 2)
    pos = min(n_pos, k - neg)
    return pos, min(n_neg, k - pos)


def balanced_draw(ids: np.ndarray, labels: np.ndarray, k: int, balance: str,
                  rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``ids`` drawn without replacement; ``balance`` as ``data.few_shot_balance``.

    ``none``: a plain draw (``rng.choice``); ``stratified``: the positive share of ``labels``
    exactly (rounded); ``balanced``: as many negatives as positives, or, where one class has
    fewer than k/2, all of it and the rest from the other.
    """
    if balance not in FEW_SHOT_BALANCES:
        raise ConfigError(f"data.few_shot_balance must be one of {', '.join(FEW_SHOT_BALANCES)}, "
                          f"got {balance!r}")
    if balance == "none":
        return rng.choice(ids, size=k, replace=False)
    pos, neg = ids[labels == 1], ids[labels == 0]
    n_pos, n_neg = _class_sizes(k, len(pos), len(neg), balance)
    return np.concatenate([rng.choice(pos, size=n_pos, replace=False),
                           rng.choice(neg, size=n_neg, replace=False)])


def few_shot_ids(train: list[Sample], data_cfg: DictConfig, seed: int) -> list[int]:
    """Sorted sample ids of the training samples the LLM is tuned on (seeded subset of train).

    Its size is ``data.few_shot_count`` / ``data.few_shot_fraction`` (both null: all of train);
    its classes follow ``data.few_shot_balance`` (``balanced_draw``). With both null and
    ``balanced``, the majority class is cut down to the minority's size (all of the minority
    kept); with ``stratified`` all of train already has the split's rate. ``none`` draws exactly
    as before the option existed, so its few-shot sets are unchanged.
    """
    count, frac = data_cfg.few_shot_count, data_cfg.few_shot_fraction
    balance = str(data_cfg.get("few_shot_balance", "none"))
    ids = np.array([s.sample_id for s in train], dtype=np.int64)
    labels = np.array([s.label for s in train], dtype=np.int64)
    if count is not None and frac is not None:
        raise ConfigError(
            "set only one of data.few_shot_count and data.few_shot_fraction (both are set: "
            f"{count} and {frac})"
        )
    rng = np.random.default_rng([seed, _FEW_SHOT_STREAM])
    if count is None and frac is None:
        if balance != "balanced":
            return sorted(ids.tolist())
        minority = int(min(labels.sum(), len(labels) - labels.sum()))
        if minority == 0:  # one class only: nothing to balance (the summary warns)
            return sorted(ids.tolist())
        return sorted(balanced_draw(ids, labels, 2 * minority, balance, rng).tolist())
    if count is not None:
        if not 1 <= count <= len(ids):
            raise ConfigError(
                f"data.few_shot_count must be between 1 and the {len(ids)} training samples, "
                f"got {count}"
            )
        k = int(count)
    else:
        if not 0 < frac <= 1:
            raise ConfigError(f"data.few_shot_fraction must be in (0, 1], got {frac}")
        k = max(1, round(len(ids) * float(frac)))
    return sorted(balanced_draw(ids, labels, k, balance, rng).tolist())


def capped_train(few_shot: list[Sample], cap: int | None, balance: str, seed: int
                 ) -> list[Sample]:
    """The few-shot samples an ``llm.max_train_samples`` cap keeps, in few-shot order.

    ``balance="none"`` is the llm stage's seeded permutation (its current rule, kept exactly);
    ``stratified`` / ``balanced`` keep the few-shot set's classes as ``balanced_draw`` does, so
    a balanced few-shot set stays balanced after the cap.
    """
    if cap is None or cap >= len(few_shot):
        return list(few_shot)
    rng = np.random.default_rng(seed)
    if balance == "none":
        pick = rng.permutation(len(few_shot))[:cap]
    else:
        labels = np.array([s.label for s in few_shot], dtype=np.int64)
        pick = balanced_draw(np.arange(len(few_shot)), labels, int(cap), balance, rng)
    return [few_shot[i] for i in sorted(pick.tolist())]


def eval_subset(samples: Sequence[Sample], max_samples: int | None, seed: int) -> list[Sample]:
    """A deterministic subset of ``max_samples`` samples (all if None), in sample_id order: the
    evaluation subsets of every stage (here, without torch, so the data stage can count their
    classes)."""
    if max_samples is None or max_samples >= len(samples):
        return list(samples)
    if max_samples <= 0:
        raise ValueError(f"eval.max_samples must be positive or null, got {max_samples}")
    pick = np.random.default_rng(seed).choice(len(samples), size=max_samples, replace=False)
    return sorted((samples[i] for i in pick), key=lambda s: s.sample_id)
