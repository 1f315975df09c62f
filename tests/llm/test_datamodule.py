from types import SimpleNamespace

import numpy as np
import pytest

from gcnee.config import load_config
from gcnee.data.tables import Interactions, Items, PreparedData, Sample
from gcnee.llm.datamodule import CTRDataModule, EvalShardSampler, collate_left, eval_subset
from gcnee.retrieval.similar import SimilarUsers
from gcnee.simple_scorers import score_simple
from gcnee.stages import MARKER, StageError, write_json

from tiny import make_tiny_tokenizer

TITLES = {"m1": "good Movie", "m2": "bad Movie", "m3": "great Book", "m4": "Game",
          "m5": "Yes Movie"}


def make_prepared() -> PreparedData:
    """6 users x 5 items; each user's last 2 interactions become samples (ids 0..11)."""
    rng = np.random.default_rng(0)
    users, items, ratings, stamps = [], [], [], []
    for u in range(6):
        for t, it in enumerate(TITLES):
            users.append(f"u{u}")
            items.append(it)
            ratings.append(float(rng.integers(1, 6)))
            stamps.append(100 * u + t)
    inter = Interactions(users, items, ratings, stamps)
    samples = []
    for idx in range(len(inter)):
        u, t = int(inter.user[idx][1:]), idx % 5
        if t < 3:
            continue  # need 3 earlier interactions
        hist = slice(idx - t, idx)
        samples.append(Sample(
            sample_id=len(samples), user=str(inter.user[idx]), item=str(inter.item[idx]),
            title=TITLES[str(inter.item[idx])], rating=float(inter.rating[idx]),
            label=int(inter.rating[idx] > 3), timestamp=int(inter.timestamp[idx]),
            history_items=inter.item[hist].tolist(),
            history_titles=[TITLES[i] for i in inter.item[hist]],
            history_ratings=inter.rating[hist].tolist()))
    splits = {"train": samples[:6], "val": samples[6:8], "test": samples[8:]}
    eval_ids = {(s.user, s.item) for s in splits["val"] + splits["test"]}
    keep = np.array([(u, i) not in eval_ids for u, i in zip(inter.user, inter.item)])
    return PreparedData(inter, inter.take(keep), Items(TITLES), splits, [0, 1, 2])


@pytest.fixture
def folders(tmp_path):
    data_dir, retr_dir = tmp_path / "data", tmp_path / "retriever"
    make_prepared().save(data_dir)
    write_json(data_dir / MARKER, {"fingerprint": "d1"})
    users = np.array([f"u{i}" for i in range(6)])
    SimilarUsers("gcn", 1, users, np.array([[1], [0], [3], [2], [5], [4]]),
                 np.ones((6, 1))).save(retr_dir)
    write_json(retr_dir / MARKER, {"fingerprint": "r1"})
    return data_dir, retr_dir, tmp_path / "llm"


def make_cfg(**over):
    items = {"eval.max_samples": 3, "llm.max_length": 120, "trainer.enable_progress_bar": False,
             "llm.batch_size": 2, "llm.eval_batch_size": 3, **over}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def test_collate_left_pads():
    batch = collate_left([{"input_ids": [5, 6, 7], "label": 1, "sample_id": 9},
                          {"input_ids": [8], "label": 0, "sample_id": 4}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["label"].tolist() == [1, 0] and batch["sample_id"].tolist() == [9, 4]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_each_sample_exactly_once(world):
    order = list(np.random.default_rng(0).permutation(10))
    shards = [list(EvalShardSampler(order, world, r)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(10))  # no padding, no duplicates
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        EvalShardSampler(order, world, world)


def test_eval_subset_is_deterministic():
    samples = make_prepared().splits["test"]
    a, b = eval_subset(samples, 3, seed=0), eval_subset(samples, 3, seed=0)
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert len(a) == 3 and [s.sample_id for s in a] == sorted(s.sample_id for s in a)
    assert len(eval_subset(samples, None, 0)) == len(samples)


def test_datamodule_builds_caches_and_batches(folders, monkeypatch):
    data_dir, retr_dir, cache_dir = folders
    tok = make_tiny_tokenizer()
    cfg = make_cfg()
    dm = CTRDataModule(cfg, data_dir, retr_dir, cache_dir, tok)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3  # the few-shot ids
    assert len(dm.datasets["val"]) == 2 and len(dm.datasets["test"]) == 3
    assert dm.cache_path().is_file()
    assert set(dm.truncations()) == {"train", "val", "test"}

    # the similar user's rating of the target is in the prompt (u1's neighbour is u0)
    sample = dm.samples["test"][0]
    text = tok.decode(dm.datasets["test"].input_ids[0])
    assert "User A rated" in text and TITLES[sample.item].split()[0] in text

    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        seen = []
        for batch in loader:
            assert batch["attention_mask"][:, -1].eq(1).all()  # answer read at the last column
            lens = batch["attention_mask"].sum(1)
            for row, n in enumerate(lens.tolist()):  # left padding: pads then tokens
                assert batch["attention_mask"][row, -n:].eq(1).all()
                assert batch["input_ids"][row, :-n].eq(tok.pad_token_id).all()
            seen += batch["sample_id"].tolist()
        ids = [s.sample_id for s in dm.samples[split]]
        assert sorted(seen) == sorted(ids)
        labels = {s.sample_id: s.label for s in dm.samples[split]}
        assert all(labels[i] in (0, 1) for i in seen)

    # a second module with the same settings reads the cache instead of rebuilding
    def fail(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(CTRDataModule, "_build", fail)
    again = CTRDataModule(cfg, data_dir, retr_dir, cache_dir, tok)
    again.setup("test")
    assert again.datasets["test"].input_ids == dm.datasets["test"].input_ids
    # another prompt setting -> another cache file
    other = CTRDataModule(make_cfg(**{"prompt.examples_per_user": 1}), data_dir, retr_dir,
                          cache_dir, tok)
    assert other.cache_path() != dm.cache_path()


@pytest.mark.parametrize("world", [2, 3])
def test_eval_loaders_under_ddp_score_every_sample_once(folders, world):
    data_dir, retr_dir, cache_dir = folders
    dm = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, make_tiny_tokenizer())
    dm.setup("test")
    seen = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        seen += [i for b in dm.test_dataloader() for i in b["sample_id"].tolist()]
    assert sorted(seen) == sorted(s.sample_id for s in dm.samples["test"])


def test_missing_upstream_stage_is_a_clear_error(folders):
    data_dir, retr_dir, cache_dir = folders
    (retr_dir / MARKER).unlink()
    dm = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, make_tiny_tokenizer())
    with pytest.raises(StageError, match="retriever.*has not finished"):
        dm.prepare_data()


def test_simple_scorers_hand_checked():
    prepared = make_prepared()
    s = prepared.splits["test"][0]
    hist = score_simple("history_mean", prepared, [s])
    assert hist[0] == pytest.approx(np.mean(s.history_ratings))
    g = prepared.graph
    item_r = g.rating[g.item == s.item]
    expected = (item_r.sum() + 5.0 * g.rating.mean()) / (len(item_r) + 5.0)
    assert score_simple("item_mean", prepared, [s])[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown simple scorer"):
        score_simple("nope", prepared, [s])


def test_exit_heads_can_train_on_more_samples_than_the_llm(folders):
    """train_samples (exits.max_train_samples) keeps the LLM's few-shot samples and adds seeded
    further training samples; val/test are unchanged; its own token cache."""
    data_dir, retr_dir, cache_dir = folders
    tok = make_tiny_tokenizer()
    base = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, tok)
    base.setup()
    more = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, tok, train_samples=5)
    more.setup()
    few = [s.sample_id for s in base.samples["train"]]
    got = [s.sample_id for s in more.samples["train"]]
    assert few == [0, 1, 2] and len(got) == 5 and set(few) <= set(got)
    assert set(got) <= {s.sample_id for s in make_prepared().splits["train"]}
    assert got == sorted(got) and len(more.datasets["train"]) == 5
    for split in ("val", "test"):
        assert more.datasets[split].input_ids == base.datasets[split].input_ids
    assert more.cache_path() != base.cache_path()
    again = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, tok, train_samples=5)
    assert [s.sample_id for s in again.split_samples()["train"]] == got  # seeded
    capped = CTRDataModule(make_cfg(), data_dir, retr_dir, cache_dir, tok, train_samples=2)
    assert [s.sample_id for s in capped.split_samples()["train"]] == few  # never fewer
