"""LightGCN wrapper: layer combinations against a hand computation, CSR vs edge_index, graph."""

import numpy as np
import pytest
import torch
from torch_geometric.nn.models import LightGCN

from gcnee.data.tables import Interactions
from gcnee.retrieval.lightgcn import (
    BipartiteGraph,
    LightGCNRetriever,
    cold_user_embedding,
    layer_weights,
)

# users a, b, c; items x, y, z: a-x, a-y, b-y, c-y, c-z (plus a duplicate a-x rating)
INTER = Interactions(["a", "a", "b", "c", "c", "a"], ["x", "y", "y", "y", "z", "x"],
                     [5, 2, 4, 1, 5, 3], [1, 2, 3, 4, 5, 6])


def hand_layers(e0: np.ndarray, num_layers: int) -> list[np.ndarray]:
    """E^(k) = D^-1/2 A D^-1/2 E^(k-1), written out for the 6-node graph above."""
    a = np.zeros((6, 6))
    for u, i in [(0, 0), (0, 1), (1, 1), (2, 1), (2, 2)]:
        a[u, 3 + i] = a[3 + i, u] = 1.0
    d = a.sum(1)  # degrees a=2 b=1 c=2 x=1 y=3 z=1
    norm = a / np.sqrt(np.outer(d, d))
    layers = [e0]
    for _ in range(num_layers):
        layers.append(norm @ layers[-1])
    return layers


@pytest.fixture
def setup():
    g = BipartiteGraph.from_interactions(INTER)
    torch.manual_seed(0)
    model = LightGCNRetriever(g.num_users, g.num_items, embedding_dim=4, num_layers=2)
    e0 = model.gcn.embedding.weight.detach().double().numpy()
    return g, model, hand_layers(e0, 2)


def test_graph_dedups_and_sorts():
    g = BipartiteGraph.from_interactions(INTER)
    assert g.user_ids.tolist() == ["a", "b", "c"] and g.item_ids.tolist() == ["x", "y", "z"]
    assert list(zip(g.edge_user.tolist(), g.edge_item.tolist())) == [
        (0, 0), (0, 1), (1, 1), (2, 1), (2, 2)]
    assert g.item_degree.tolist() == [1, 3, 1]
    pos = BipartiteGraph.from_interactions(INTER, edges="positive", label_threshold=3)
    assert pos.user_ids.tolist() == ["a", "b", "c"]  # a-x (5), b-y (4), c-z (5)
    assert pos.num_edges == 3
    with pytest.raises(ValueError, match="retriever.edges"):
        BipartiteGraph.from_interactions(INTER, edges="bogus")


def test_layers_match_hand_computation(setup):
    g, model, hand = setup
    with torch.no_grad():
        layers = model.layer_embeddings(g.adjacency()).double().numpy()
    for k in range(3):
        np.testing.assert_allclose(layers[k], hand[k], atol=1e-6)
    # user b (degree 1, only item y of degree 3): e_b^(1) = e_y^(0) / sqrt(1*3)
    np.testing.assert_allclose(layers[1][1], hand[0][4] / np.sqrt(3), atol=1e-6)


@pytest.mark.parametrize("mode,layer0,weights", [
    ("average", True, [1 / 3, 1 / 3, 1 / 3]),
    ("average", False, [0, 0.5, 0.5]),
    ("last", True, [0, 0, 1]),
])
def test_combinations_match_hand_computation(setup, mode, layer0, weights):
    g, base, hand = setup
    model = LightGCNRetriever(g.num_users, g.num_items, 4, 2, mode, layer0)
    model.gcn.embedding.load_state_dict(base.gcn.embedding.state_dict())
    assert model.alpha.tolist() == pytest.approx(weights)
    with torch.no_grad():
        out = model(g.adjacency()).double().numpy()
    np.testing.assert_allclose(out, sum(w * h for w, h in zip(weights, hand)), atol=1e-6)


def test_average_and_last_differ(setup):
    g, avg, _ = setup
    last = LightGCNRetriever(g.num_users, g.num_items, 4, 2, "last")
    last.gcn.embedding.load_state_dict(avg.gcn.embedding.state_dict())
    with torch.no_grad():
        a, b = avg(g.adjacency()), last(g.adjacency())
    assert (a - b).abs().max() > 1e-2


def test_csr_adjacency_equals_pyg_edge_index(setup):
    g, model, _ = setup
    ref = LightGCN(g.num_users + g.num_items, 4, 2)  # PyG default: normalise edge_index per call
    ref.embedding.load_state_dict(model.gcn.embedding.state_dict())
    u = torch.from_numpy(g.edge_user)
    i = torch.from_numpy(g.edge_item) + g.num_users
    edge_index = torch.cat([torch.stack([u, i]), torch.stack([i, u])], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(g.adjacency()), ref.get_embedding(edge_index))


def test_cold_user_rule_reproduces_graph_users(setup):
    """Applied to a graph user's own items, the query-time rule gives its propagated layers."""
    g, model, _ = setup
    last = LightGCNRetriever(g.num_users, g.num_items, 4, 2, "last")
    last.gcn.embedding.load_state_dict(model.gcn.embedding.state_dict())
    with torch.no_grad():
        layers = last.layer_embeddings(g.adjacency())
        combined = last(g.adjacency())
    items = last.split(layers)[1].numpy()
    for user, hist in [(0, [0, 1]), (2, [1, 2, 2])]:  # duplicates ignored
        got = cold_user_embedding(items, g.item_degree, last.alpha.numpy(), hist)
        np.testing.assert_allclose(got, combined[user].numpy(), atol=1e-6)
    # layer 0 of a cold user is the mean of its items' layer-0 embeddings
    only0 = cold_user_embedding(items, g.item_degree, np.array([1.0, 0, 0]), [0, 2])
    np.testing.assert_allclose(only0, items[0, [0, 2]].mean(0), atol=1e-6)
    assert cold_user_embedding(items, g.item_degree, last.alpha.numpy(), []) is None


def test_layer_weights_errors():
    with pytest.raises(ValueError, match="retriever.layers_mode"):
        layer_weights(3, "first", True)
    with pytest.raises(ValueError, match="include_layer0"):
        layer_weights(0, "average", False)


def test_bpr_loss_is_pygs(setup):
    g, model, _ = setup
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 0])
    loss = model.bpr_loss(g.adjacency(), users, pos, neg, lambda_reg=0.0)
    emb = model(g.adjacency())
    diff = (emb[users] * emb[pos + 3]).sum(-1) - (emb[users] * emb[neg + 3]).sum(-1)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(diff).mean())
    loss.backward()
    assert model.gcn.embedding.weight.grad.abs().sum() > 0
