r"""LightGCN on the bipartite user–item graph: the graph, the model wrapper, cold-user embeddings.

Nodes are users ``0..U-1`` followed by items ``U..U+I-1``. With the symmetric adjacency
:math:`A` (an edge per (user, item) interaction, both directions) and degrees :math:`D`, one
LightGCN layer (PyG's ``LGConv``) is

.. math::
    E^{(k+1)} = D^{-1/2} A D^{-1/2} E^{(k)}, \qquad
    e_u^{(k+1)} = \sum_{i \in N(u)} \frac{e_i^{(k)}}{\sqrt{|N(u)|\,|N(i)|}},

and :math:`E^{(0)}` is the learned embedding table. The representation used for training (BPR)
*and* for retrieval is PyG's weighted layer sum :math:`\bar e = \sum_{k=0}^{K} \alpha_k e^{(k)}`
with the weights set by the config:

* ``retriever.layers_mode: average`` and ``include_layer0: true`` (default, LightGCN's and PyG's
  default): :math:`\alpha_k = 1/(K+1)` for ``k = 0..K`` — layer 0 **is** in the average;
* ``average`` with ``include_layer0: false``: :math:`\alpha_0 = 0`, :math:`\alpha_k = 1/K` for
  ``k = 1..K`` — exactly the paper's :math:`\bar e_u = \frac1K \sum_{k=1}^{K} e_u^{(k)}`;
* ``last``: :math:`\alpha_K = 1`, all others 0 (the paper's "last layer" row of Table 3).

The adjacency is a ``torch.sparse_csr`` tensor normalised once by PyG's ``gcn_norm`` and the
convolutions run with ``normalize=False``: PyG 2.8's ``LightGCN``/``LGConv`` accept it (the
``spmm`` path), and it gives the same embeddings as ``edge_index`` ~8× faster here
(measured: 0.37 s vs 0.045 s per forward+backward, 1k users × 1.7k items, 100 k edges, dim 64,
3 layers, 2 cores).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.models import LightGCN
from torch_geometric.utils import to_torch_csr_tensor

from gcnee.data.tables import Interactions

EDGE_RULES = ("all", "positive")


def positive_mask(rating: np.ndarray, threshold: float, op: str) -> np.ndarray:
    """``rating <op> threshold`` with op ``>`` or ``>=`` (the data stage's label rule)."""
    if op == ">":
        return rating > threshold
    if op == ">=":
        return rating >= threshold
    raise ValueError(f"data.label_op must be '>' or '>=', got {op!r}")


@dataclass
class BipartiteGraph:
    """The user–item graph: sorted unique ids and unique (user, item) edges.

    ``edge_user``/``edge_item`` (E,) int64 index into ``user_ids``/``item_ids`` and are sorted by
    (user, item), one edge per pair however often it was rated.
    """

    user_ids: np.ndarray  # (U,) str, sorted
    item_ids: np.ndarray  # (I,) str, sorted
    edge_user: np.ndarray  # (E,) int64
    edge_item: np.ndarray  # (E,) int64

    @classmethod
    def from_interactions(
        cls, inter: Interactions, edges: str = "all", label_threshold: float = 3.0,
        label_op: str = ">",
    ) -> BipartiteGraph:
        """Build from the data stage's ``graph`` interactions (never from val/test targets).

        ``edges="all"``: every interaction is an edge (the paper: "edges represent
        interactions"); ``"positive"``: only those whose rating passes the label rule.
        """
        if edges not in EDGE_RULES:
            raise ValueError(f"retriever.edges must be one of {EDGE_RULES}, got {edges!r}")
        if edges == "positive":
            inter = inter.take(positive_mask(inter.rating, label_threshold, label_op))
        user_ids, eu = np.unique(inter.user, return_inverse=True)
        item_ids, ei = np.unique(inter.item, return_inverse=True)
        pairs = np.unique(np.stack([eu.ravel(), ei.ravel()], 1).astype(np.int64), axis=0)
        return cls(user_ids, item_ids, pairs[:, 0].copy(), pairs[:, 1].copy())

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_edges(self) -> int:
        return len(self.edge_user)

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids.tolist())}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.item_ids.tolist())}

    @cached_property
    def item_degree(self) -> np.ndarray:
        """(I,) int64 number of users per item."""
        return np.bincount(self.edge_item, minlength=self.num_items).astype(np.int64)

    def adjacency(self) -> torch.Tensor:
        """(U+I, U+I) symmetric ``D^-1/2 A D^-1/2`` as a ``torch.sparse_csr`` float32 tensor."""
        u = torch.from_numpy(self.edge_user)
        i = torch.from_numpy(self.edge_item) + self.num_users
        n = self.num_users + self.num_items
        edge_index = torch.cat([torch.stack([u, i]), torch.stack([i, u])], dim=1)
        with warnings.catch_warnings():  # torch: "sparse CSR is beta", "invariant checks off"
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
            adj = to_torch_csr_tensor(edge_index, size=(n, n))
            adj, _ = gcn_norm(adj, None, n, add_self_loops=False)
        return adj


def layer_weights(num_layers: int, layers_mode: str, include_layer0: bool) -> torch.Tensor:
    """(K+1,) the alpha of PyG's LightGCN for a layer combination (see the module docstring)."""
    if layers_mode == "last":
        alpha = torch.zeros(num_layers + 1)
        alpha[-1] = 1.0
        return alpha
    if layers_mode != "average":
        raise ValueError(f"retriever.layers_mode must be 'average' or 'last', got {layers_mode!r}")
    if include_layer0:
        return torch.full((num_layers + 1,), 1.0 / (num_layers + 1))
    if num_layers < 1:
        raise ValueError("retriever.include_layer0=false needs retriever.num_layers >= 1")
    alpha = torch.full((num_layers + 1,), 1.0 / num_layers)
    alpha[0] = 0.0
    return alpha


class LightGCNRetriever(nn.Module):
    """PyG ``LightGCN`` over users + items with a configurable layer combination.

    Args:
        num_users, num_items: node counts (users first, then items).
        embedding_dim: d. num_layers: K.
        layers_mode, include_layer0: the layer combination (module docstring).
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64,
                 num_layers: int = 3, layers_mode: str = "average", include_layer0: bool = True):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        alpha = layer_weights(num_layers, layers_mode, include_layer0)
        # normalize=False: the adjacency is normalised once in BipartiteGraph.adjacency()
        self.gcn = LightGCN(num_users + num_items, embedding_dim, num_layers, alpha=alpha,
                            normalize=False)

    @property
    def alpha(self) -> torch.Tensor:
        return self.gcn.alpha

    def forward(self, adj: torch.Tensor) -> torch.Tensor:
        """(N, d) combined node embeddings ``Σ_k α_k E^(k)`` for the normalised ``adj``."""
        # float32 whatever trainer.precision says: there are no bf16/fp16 sparse CSR matmul
        # kernels on the CPU, and this small model gains nothing from them elsewhere.
        with torch.autocast(adj.device.type, enabled=False):
            return self.gcn.get_embedding(adj)

    def layer_embeddings(self, adj: torch.Tensor) -> torch.Tensor:
        """(K+1, N, d) ``E^(0) .. E^(K)``, each layer through PyG's ``LGConv``."""
        x = self.gcn.embedding.weight
        layers = [x]
        with torch.autocast(adj.device.type, enabled=False):  # float32, as in forward
            for conv in self.gcn.convs:
                x = conv(x, adj)
                layers.append(x)
        return torch.stack(layers)

    def split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Node rows -> ((U, ...) users, (I, ...) items) along the node dimension (-2)."""
        return emb[..., : self.num_users, :], emb[..., self.num_users :, :]

    def bpr_loss(self, adj: torch.Tensor, users: torch.Tensor, pos: torch.Tensor,
                 neg: torch.Tensor, lambda_reg: float) -> torch.Tensor:
        """PyG's BPR loss for (B,) user, positive-item and negative-item indices.

        Item indices are 0-based within items. The L2 term covers the layer-0 embeddings of the
        batch's distinct nodes (PyG's ``recommendation_loss`` with ``node_id``).
        """
        emb = self(adj)
        pos_n, neg_n = pos + self.num_users, neg + self.num_users
        pos_rank = (emb[users] * emb[pos_n]).sum(-1)
        neg_rank = (emb[users] * emb[neg_n]).sum(-1)
        node_id = torch.unique(torch.cat([users, pos_n, neg_n]))
        return self.gcn.recommendation_loss(pos_rank, neg_rank, node_id=node_id,
                                            lambda_reg=lambda_reg)


def cold_user_embedding(item_layers: torch.Tensor | np.ndarray, item_degree: np.ndarray,
                        alpha: torch.Tensor | np.ndarray, history: list[int]) -> np.ndarray | None:
    """Embedding of a user absent from the graph, from the items of their history.

    The propagation rule applied at query time, as if the user were joined to the graph by
    edges to the (distinct, known) history items H, the item embeddings kept as trained:
    ``e_u^(k) = Σ_{i∈H} e_i^(k-1) / sqrt(|H| · deg(i))`` for ``k ≥ 1`` (graph degrees), and,
    for layer 0 (no learned free embedding exists), the mean ``e_u^(0) = mean_{i∈H} e_i^(0)``;
    then the same combination ``Σ_k α_k e_u^(k)``.

    Args:
        item_layers: (K+1, I, d) item layer embeddings. item_degree: (I,) graph degrees.
        alpha: (K+1,) layer weights. history: item indices (duplicates ignored).

    Returns:
        (d,) float32, or ``None`` when no history item is in the graph.
    """
    idx = np.unique(np.asarray(history, dtype=np.int64))
    if idx.size == 0:
        return None
    layers = np.asarray(item_layers, dtype=np.float32)[:, idx]  # (K+1, h, d)
    a = np.asarray(alpha, dtype=np.float32)
    w = 1.0 / np.sqrt(idx.size * np.maximum(item_degree[idx], 1).astype(np.float32))  # (h,)
    out = a[0] * layers[0].mean(0)
    for k in range(1, len(a)):
        out = out + a[k] * (w[:, None] * layers[k - 1]).sum(0)
    return out.astype(np.float32)
