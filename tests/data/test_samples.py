"""Sample rules (docs/method.md §1): history cap, min history, labels, split, graph, few-shot."""

from __future__ import annotations

import numpy as np
import pytest

from gcnee.config import ConfigError, load_config
from gcnee.data.errors import DataError
from gcnee.data.samples import (
    build_samples,
    few_shot_ids,
    graph_interactions,
    split_samples,
    split_sizes,
)
from gcnee.data.tables import Interactions, Items


def data_cfg(*overrides: str):
    return load_config(None, list(overrides)).data


def make_table(rows: list[tuple[str, str, float, int]]) -> tuple[Interactions, Items]:
    users, items, ratings, ts = zip(*rows)
    return Interactions(users, items, ratings, ts), Items({i: f"Title {i}" for i in set(items)})


def chain(user: str, n: int, start: int = 0, rating: float = 4.0) -> list[tuple]:
    """``n`` interactions of ``user`` with items u-0, u-1, ... at increasing timestamps."""
    return [(user, f"{user}-{k}", rating, start + k) for k in range(n)]


def big_table(n_users: int = 40, per_user: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for k in range(per_user):
            rows.append((f"u{u}", f"i{rng.integers(200)}", float(rng.integers(1, 6)),
                         int(rng.integers(10**6))))
    return make_table(rows)


def test_history_cap_and_order():
    inter, items = make_table(chain("a", 20))
    samples = build_samples(inter, items, data_cfg("data.max_history=15", "data.min_history=3"))
    assert [s.item for s in samples] == [f"a-{k}" for k in range(3, 20)]
    last = samples[-1]
    assert last.history_items == [f"a-{k}" for k in range(4, 19)]  # 15 most recent, oldest first
    assert last.history_titles == [f"Title a-{k}" for k in range(4, 19)]
    assert [len(s.history_items) for s in samples[:3]] == [3, 4, 5]
    assert max(len(s.history_items) for s in samples) == 15


def test_chronological_order_ignores_file_order_and_ties_keep_row_order():
    rows = [("a", "x3", 5.0, 30), ("a", "x1", 2.0, 10), ("a", "x2a", 4.0, 20),
            ("a", "x2b", 1.0, 20), ("a", "x4", 3.0, 40)]
    inter, items = make_table(rows)
    samples = build_samples(inter, items, data_cfg("data.min_history=3"))
    assert [s.item for s in samples] == ["x3", "x4"]
    assert samples[0].history_items == ["x1", "x2a", "x2b"]
    assert samples[0].history_ratings == [2.0, 4.0, 1.0]
    assert samples[1].history_items == ["x1", "x2a", "x2b", "x3"]
    assert samples[0].sample_id == 0 and samples[1].sample_id == 4  # row index in the table


def test_min_history_drops_short_users():
    inter, items = make_table(chain("short", 3) + chain("long", 5))
    samples = build_samples(inter, items, data_cfg("data.min_history=3"))
    assert {s.user for s in samples} == {"long"}
    assert len(samples) == 2
    assert len(build_samples(inter, items, data_cfg("data.min_history=2"))) == 1 + 3


def test_empty_after_min_history_names_filter():
    inter, items = make_table(chain("a", 3) + chain("b", 2))
    with pytest.raises(DataError, match=r"data.min_history=3"):
        build_samples(inter, items, data_cfg("data.min_history=3"))


@pytest.mark.parametrize("op,expected", [(">", [0, 0, 1]), (">=", [0, 1, 1])])
def test_label_threshold_ops(op, expected):
    rows = chain("a", 3) + [("a", "t2", 2.0, 10), ("a", "t3", 3.0, 11), ("a", "t5", 5.0, 12)]
    inter, items = make_table(rows)
    samples = build_samples(inter, items, data_cfg(f"data.label_op='{op}'",
                                                   "data.label_threshold=3"))
    assert [s.label for s in samples[-3:]] == expected
    assert [s.rating for s in samples[-3:]] == [2.0, 3.0, 5.0]


def test_bad_label_op_is_config_error():
    inter, items = make_table(chain("a", 5))
    with pytest.raises(ConfigError, match="data.label_op"):
        build_samples(inter, items, data_cfg("data.label_op='<'"))


def test_no_target_in_its_own_history():
    # "m" rated twice: the second rating's history must not contain the first one.
    rows = [("a", "m", 2.0, 1), ("a", "p", 4.0, 2), ("a", "q", 4.0, 3), ("a", "r", 4.0, 4),
            ("a", "m", 5.0, 5), ("a", "s", 4.0, 6)]
    inter, items = make_table(rows)
    samples = build_samples(inter, items, data_cfg("data.min_history=3"))
    by_id = {s.sample_id: s for s in samples}
    assert by_id[4].history_items == ["p", "q", "r"]  # 4 earlier rows, one is the target item
    assert by_id[5].history_items == ["m", "p", "q", "r", "m"]
    for s in samples:
        assert s.item not in s.history_items
    # The repeat does not count towards min_history either.
    samples4 = build_samples(inter, items, data_cfg("data.min_history=4"))
    assert [s.sample_id for s in samples4] == [5]


def test_missing_item_title_is_reported():
    inter, _ = make_table(chain("a", 5))
    with pytest.raises(DataError, match="no entry in the items table"):
        build_samples(inter, Items({"a-0": "t"}), data_cfg())


@pytest.mark.parametrize("ratios", [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.25, 0.15]])
def test_random_split_ratios_and_partition(ratios):
    inter, items = big_table()
    samples = build_samples(inter, items, data_cfg())
    cfg = data_cfg(f"data.split_ratios={ratios}")
    splits = split_samples(samples, cfg, seed=0)
    n = len(samples)
    for name, r in zip(("train", "val", "test"), ratios):
        assert abs(len(splits[name]) - n * r) <= 1
    ids = [s.sample_id for name in splits for s in splits[name]]
    assert sorted(ids) == sorted(s.sample_id for s in samples)  # a partition
    # Lists keep the builder's order (user, then time).
    pos = {s.sample_id: i for i, s in enumerate(samples)}
    for part in splits.values():
        assert [pos[s.sample_id] for s in part] == sorted(pos[s.sample_id] for s in part)


def test_split_sizes_rounding():
    assert split_sizes(10, [0.8, 0.1, 0.1]) == (8, 1, 1)
    assert split_sizes(17, [0.8, 0.1, 0.1]) == (13, 2, 2)
    assert sum(split_sizes(12345, [0.8, 0.1, 0.1])) == 12345


def test_random_split_deterministic_per_seed():
    inter, items = big_table()
    samples = build_samples(inter, items, data_cfg())
    ids = lambda seed: [s.sample_id for s in split_samples(samples, data_cfg(), seed)["test"]]  # noqa: E731
    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


def test_global_time_split_is_chronological():
    inter, items = big_table()
    samples = build_samples(inter, items, data_cfg())
    splits = split_samples(samples, data_cfg("data.split=global_time"), seed=0)
    assert max(s.timestamp for s in splits["train"]) <= min(s.timestamp for s in splits["val"])
    assert max(s.timestamp for s in splits["val"]) <= min(s.timestamp for s in splits["test"])
    assert abs(len(splits["train"]) - 0.8 * len(samples)) <= 1


@pytest.mark.parametrize("override,key", [
    ("data.split=weekly", "data.split"),
    ("data.split_ratios=[0.8,0.1]", "data.split_ratios"),
    ("data.split_ratios=[0.8,0.1,0.2]", "data.split_ratios"),
])
def test_bad_split_config(override, key):
    inter, items = big_table(5)
    samples = build_samples(inter, items, data_cfg())
    with pytest.raises(ConfigError, match=key):
        split_samples(samples, data_cfg(override), seed=0)


def test_empty_split_names_ratios():
    inter, items = make_table(chain("a", 6))
    samples = build_samples(inter, items, data_cfg())
    with pytest.raises(DataError, match="split_ratios"):
        split_samples(samples, data_cfg(), seed=0)  # 3 samples: val and test round to 0


def test_graph_excludes_val_test_targets_and_their_repeats():
    rows = chain("a", 12) + chain("b", 12) + [("b", "b-1", 5.0, 100)]  # b re-rates b-1 last
    inter, items = make_table(rows)
    samples = build_samples(inter, items, data_cfg())
    splits = split_samples(samples, data_cfg("data.split=global_time"), seed=0)
    test_ids = {s.sample_id for s in splits["test"]}
    assert len(inter) - 1 in test_ids  # the repeat is the latest, so it is a test target
    graph = graph_interactions(inter, splits)
    held = {(s.user, s.item, s.timestamp) for n in ("val", "test") for s in splits[n]}
    in_graph = set(zip(graph.user.tolist(), graph.item.tolist(), graph.timestamp.tolist()))
    assert not held & in_graph
    assert ("b", "b-1") not in set(zip(graph.user.tolist(), graph.item.tolist()))
    n_held = len(splits["val"]) + len(splits["test"])
    assert len(graph) == len(inter) - n_held - 1  # the earlier b-1 rating goes too
    train = {(s.user, s.item, s.timestamp) for s in splits["train"]}
    assert train - {("b", "b-1", 1)} <= in_graph


def test_few_shot_count_fraction_and_all():
    inter, items = big_table()
    samples = build_samples(inter, items, data_cfg())
    train = split_samples(samples, data_cfg(), seed=0)["train"]
    train_ids = {s.sample_id for s in train}
    assert few_shot_ids(train, data_cfg(), 0) == sorted(train_ids)
    ids = few_shot_ids(train, data_cfg("data.few_shot_count=50"), 0)
    assert len(ids) == 50 and len(set(ids)) == 50 and set(ids) <= train_ids
    assert ids == sorted(ids)
    assert ids == few_shot_ids(train, data_cfg("data.few_shot_count=50"), 0)
    assert ids != few_shot_ids(train, data_cfg("data.few_shot_count=50"), 1)
    frac = few_shot_ids(train, data_cfg("data.few_shot_fraction=0.05"), 0)
    assert len(frac) == round(0.05 * len(train))


@pytest.mark.parametrize("overrides,match", [
    (("data.few_shot_count=5", "data.few_shot_fraction=0.1"),
     "data.few_shot_count and data.few_shot_fraction"),
    (("data.few_shot_count=0",), "data.few_shot_count"),
    (("data.few_shot_count=100000",), "data.few_shot_count"),
    (("data.few_shot_fraction=1.5",), "data.few_shot_fraction"),
])
def test_few_shot_config_errors(overrides, match):
    inter, items = big_table(5)
    samples = build_samples(inter, items, data_cfg())
    with pytest.raises(ConfigError, match=match):
        few_shot_ids(samples, data_cfg(*overrides), 0)


def test_eval_subset_and_capped_train():
    """The evaluation subsets and the LLM's training cap (one rule each, used by the data stage
    to count classes and by the llm stage to pick samples)."""
    from gcnee.data.samples import capped_train, eval_subset

    inter, items = big_table()
    samples = build_samples(inter, items, data_cfg())
    sub = eval_subset(samples, 37, 3)
    assert len(sub) == 37 and sub == sorted(sub, key=lambda s: s.sample_id)
    assert sub == eval_subset(samples, 37, 3) and eval_subset(samples, None, 3) == samples
    assert eval_subset(samples, len(samples) + 5, 3) == samples
    # the llm stage's cap: rng(seed).permutation(n)[:cap], in few-shot order
    pick = np.random.default_rng(3).permutation(len(samples))[:50]
    assert capped_train(samples, 50, "none", 3) == [samples[i] for i in sorted(pick)]
    balanced = capped_train(samples, 50, "balanced", 3)
    assert len(balanced) == 50 and sum(s.label for s in balanced) == 25
