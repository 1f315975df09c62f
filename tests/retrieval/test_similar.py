"""SimilarUsers: save/load, graph users, cold users, random and none kinds."""

import numpy as np
import pytest

from gcnee.retrieval.similar import SimilarUsers, random_neighbors

USERS = np.array(["a", "b", "c", "d"])


def gcn_table() -> SimilarUsers:
    # user embeddings: a, b close; c, d close. items: x ~ a/b direction, y ~ c/d direction
    user_emb = np.array([[1, 0.1], [1, 0.2], [0.1, 1], [0.2, 1]], np.float32)
    user_emb /= np.linalg.norm(user_emb, axis=1, keepdims=True)
    item_layers = np.array([[[1, 0], [0, 1]], [[1, 0.1], [0.1, 1]]], np.float32)  # (2, 2, 2)
    cold = {"item_ids": np.array(["x", "y"]), "item_layers": item_layers,
            "item_degree": np.array([2, 2]), "alpha": np.array([0.5, 0.5], np.float32),
            "user_emb": user_emb}
    nb = np.array([[1, 3], [0, 3], [3, 1], [2, 1]])
    sc = np.array([[0.99, 0.3], [0.99, 0.4], [0.99, 0.3], [0.99, 0.4]], np.float32)
    return SimilarUsers("gcn", 2, USERS, nb, sc, seed=0, cold=cold)


def test_roundtrip_and_graph_users(tmp_path):
    sim = gcn_table()
    sim.save(tmp_path)
    back = SimilarUsers.load(tmp_path)
    assert back.kind == "gcn" and back.k == 2 and len(back) == 4
    assert back.get("a", []) == [("b", pytest.approx(0.99)), ("d", pytest.approx(0.3))]
    assert back.get("c", ["x"]) == sim.get("c", ["x"])  # history ignored for graph users
    np.testing.assert_array_equal(back.cold["item_layers"], sim.cold["item_layers"])


def test_cold_users(tmp_path):
    sim = gcn_table()
    sim.save(tmp_path)
    sim = SimilarUsers.load(tmp_path)
    near_x = sim.get("new", ["x", "unknown-item"])
    assert [u for u, _ in near_x] == ["a", "b"]  # x's direction: users a, b
    assert near_x[0][1] >= near_x[1][1]
    # by hand: 0.5 * e_y^(0) + 0.5 * e_y^(0)... layer 1 = e_y^(0) / sqrt(1 * deg 2)
    q = 0.5 * np.array([0, 1]) + 0.5 * np.array([0, 1]) / np.sqrt(2)
    got = sim.get("new2", ["y", "y"])
    assert [u for u, _ in got] == ["c", "d"]
    c = sim.cold["user_emb"][2]
    assert got[0][1] == pytest.approx(q @ c / np.linalg.norm(q), abs=1e-6)
    assert sim.cold_status("new", ["x"]) == "cold_embedded"
    assert sim.get("new", ["unknown-item"]) == [] and sim.get("new", []) == []
    assert sim.cold_status("new", []) == "cold_empty"
    assert sim.cold_status("a", []) == "in_graph"


def test_none_and_random(tmp_path):
    none = SimilarUsers("none", 4, USERS, np.zeros((4, 0)), np.zeros((4, 0)))
    assert none.get("a", ["x"]) == [] and none.get("zz", ["x"]) == []
    rows = [random_neighbors(4, 2, 7, u, exclude=i) for i, u in enumerate(USERS)]
    rnd = SimilarUsers("random", 2, USERS, np.stack(rows), np.zeros((4, 2)), seed=7)
    rnd.save(tmp_path)
    rnd = SimilarUsers.load(tmp_path)
    for u in USERS:
        got = [v for v, _ in rnd.get(u, [])]
        assert len(got) == 2 and u not in got and len(set(got)) == 2
    cold = rnd.get("stranger", [])
    assert len(cold) == 2 and cold == rnd.get("stranger", ["x"])  # seeded by (seed, user)
    again = random_neighbors(4, 2, 7, "stranger")
    assert [v for v, _ in cold] == USERS[again].tolist()
    r7, r8 = random_neighbors(1000, 4, 7, "u1"), random_neighbors(1000, 4, 8, "u1")
    assert r7.tolist() != r8.tolist()


def test_llm_kind_cold_needs_encoder():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    sim = SimilarUsers("llm", 2, USERS, np.array([[1, 3], [0, 3], [3, 1], [2, 1]]),
                       np.ones((4, 2)))
    assert sim.get("new", ["x"]) == [] and sim.cold_status("new", ["x"]) == "cold_empty"
    sim.attach_encoder(lambda items: np.array([0.0, 1.0]), emb)
    assert [u for u, _ in sim.get("new", ["x"])] == ["c", "d"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="retriever"):
        SimilarUsers.load(tmp_path)
    with pytest.raises(ValueError, match="retriever.kind"):
        SimilarUsers("knn", 2, USERS, np.zeros((4, 2)), np.zeros((4, 2)))
