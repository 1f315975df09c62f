"""The retriever stage end to end on synthetic PreparedData: files, summary, no leakage."""

import sys
import types

import numpy as np
import pytest

from gcnee.config import load_config
from gcnee.retrieval.similar import SimilarUsers
from gcnee.retrieval.stage import build_graph
from gcnee.stages import read_json, run_stage

from .conftest import community_interactions, prepare, save_as_data_stage


def config(tmp_path, *overrides):
    return load_config(None, [f"run.checkpoints_dir={tmp_path}/ckpt",
                              f"run.logs_dir={tmp_path}/logs", "run.name=t",
                              "trainer.enable_progress_bar=false", "retriever.embedding_dim=16",
                              "retriever.num_layers=2", "retriever.lr=0.01",
                              "retriever.batch_size=512", "retriever.epochs=3", *overrides])


@pytest.fixture
def staged(community, tmp_path):
    data, _ = community
    save_as_data_stage(data, tmp_path / "ckpt", "t")
    return data


def test_no_val_or_test_target_enters_the_graph(community):
    data, _ = community
    graph = build_graph(data, load_config(None))
    edges = set(zip(graph.user_ids[graph.edge_user], graph.item_ids[graph.edge_item]))
    held = {(s.user, s.item) for split in ("val", "test") for s in data.splits[split]}
    assert held and not edges & held
    train = {(s.user, s.item) for s in data.splits["train"]}
    assert train <= edges  # training targets are graph edges


def test_gcn_stage(staged, tmp_path):
    cfg = config(tmp_path)
    summary = run_stage(cfg, "retriever")
    out = tmp_path / "ckpt" / "t" / "retriever"
    for name in ("similar_users.npz", "cold.npz", "checkpoints/best.ckpt", "summary.json",
                 "_SUCCESS.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert list((tmp_path / "logs" / "t" / "retriever").glob("events.out.tfevents*"))
    assert summary == read_json(out / "summary.json")
    assert summary["users"] == 160 and summary["kind"] == "gcn"
    assert summary["val_recall@20_gcn"] > summary["val_recall@20_popularity"]
    assert summary["train_seconds"] > 0 and summary["search_seconds"] > 0
    val = summary["cold_start"]["val"]
    assert val["in_graph"] == val["samples"] == len(staged.splits["val"])
    sim = SimilarUsers.load(out)
    assert sim.neighbors.shape == (160, 4) and (sim.neighbors >= 0).all()
    assert not (sim.neighbors == np.arange(160)[:, None]).any()
    s = staged.splits["test"][0]
    assert len(sim.get(s.user, s.history_items)) == 4
    assert len(sim.get("brand-new-user", s.history_items)) == 4  # cold: from history items
    assert run_stage(cfg, "retriever") == summary  # up to date: skipped, same summary


def test_cold_users_counted(tmp_path):
    inter, items, _ = community_interactions(users_per=10, per_user=8)
    data = prepare(inter, items)
    # a user whose interactions are all val/test targets is absent from the graph
    gone = data.splits["test"][0].user
    data.graph = data.graph.take(data.graph.user != gone)
    save_as_data_stage(data, tmp_path / "ckpt", "t")
    summary = run_stage(config(tmp_path, "retriever.epochs=1"), "retriever")
    n_gone = sum(s.user == gone for s in data.splits["test"])
    assert summary["cold_start"]["test"]["cold_embedded"] == n_gone
    assert summary["cold_start"]["test"]["no_similar_users"] == 0


@pytest.mark.parametrize("kind", ["random", "none"])
def test_random_and_none(staged, tmp_path, kind):
    summary = run_stage(config(tmp_path, f"retriever.kind={kind}"), "retriever")
    sim = SimilarUsers.load(tmp_path / "ckpt" / "t" / "retriever")
    s = staged.splits["val"][0]
    assert len(sim.get(s.user, s.history_items)) == (4 if kind == "random" else 0)
    assert 0 < summary["val_recall@20_popularity"] < 1
    if kind == "none":
        assert summary["cold_start"]["val"]["no_similar_users"] == len(staged.splits["val"])


def test_llm_kind(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer):
    inter, items, _ = community_interactions(users_per=10, per_user=8)
    save_as_data_stage(prepare(inter, items), tmp_path / "ckpt", "t")
    fake = types.ModuleType("gcnee.llm.backbone")
    fake.load_backbone = lambda llm_cfg, checkpoints_dir, **kw: (tiny_llama, tiny_tokenizer)
    monkeypatch.setitem(sys.modules, "gcnee.llm.backbone", fake)
    summary = run_stage(config(tmp_path, "retriever.kind=llm"), "retriever")
    out = tmp_path / "ckpt" / "t" / "retriever"
    sim = SimilarUsers.load(out)
    assert sim.kind == "llm" and sim.neighbors.shape == (40, 4)
    assert np.load(out / "llm_user_emb.npy").shape == (40, tiny_llama.config.hidden_size)
    assert summary["search_seconds"] > 0


def test_bad_kind(staged, tmp_path):
    from gcnee.config import ConfigError
    from gcnee.stages import StageError

    # refused when the config is loaded (before any stage); the stage still checks its own
    with pytest.raises(ConfigError, match="retriever.kind must be one of gcn, llm"):
        config(tmp_path, "retriever.kind=knn")
    cfg = config(tmp_path)
    cfg.retriever.kind = "knn"
    with pytest.raises(StageError, match="retriever.kind"):
        run_stage(cfg, "retriever")
