"""Building blocks shared by the baseline CTR models: Dice, MLPs, behaviour embeddings, masked
pooling and DIN's local activation unit.

Histories are RIGHT-padded: ``hist_mask[b, t]`` is True for the ``length[b]`` real behaviours at
positions ``0 .. length-1`` (oldest first) and False for padding. Every block here reads only the
positions the mask marks, so a row's output does not depend on how much padding follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Dice(nn.Module):
    """Data-adaptive activation of DIN (Zhou et al., KDD 2018, eq. 9).

    ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``: per-unit mean and variance from the
    mini-batch in training and running averages at inference (as in batch normalization);
    ``alpha`` is learned per unit (initialised to 0). A training batch of one row cannot
    estimate a variance, so it uses the running statistics.

    Shapes: input (N, dim) -> output (N, dim).
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.training and s.shape[0] > 1:
            mean, var = s.mean(0), s.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((s - mean) / torch.sqrt(var + self.eps))
        return p * s + (1 - p) * self.alpha * s


def _activation(name: str, dim: int) -> nn.Module:
    if name == "dice":
        return Dice(dim)
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r} (dice | prelu | relu | sigmoid)")


class MLP(nn.Module):
    """``Linear -> activation -> dropout`` per hidden size, then a linear output of ``out_dim``.

    Shapes: (N, in_dim) -> (N, out_dim); ``out_dim=1`` gives one logit per row, squeezed to (N,)
    by the models.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, out_dim: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), _activation(activation, h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = h
        layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of ``x`` (B, T, D) with ``mask`` (B, T) -> (B, D).

    A row with no masked position gives zeros (an empty history contributes nothing).
    """
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class BehaviourEmbedding(nn.Module):
    """Embeddings of users, items and (optionally) rating values, and the history behaviours.

    Index 0 of every table is padding (a zero vector, no gradient) and index 1 the out-of-vocabulary
    id (see ``gcnee.baselines.data``). A behaviour is ``e_item + e_rating`` when ratings are used,
    so a history row keeps the embedding size of the target item it is compared with.
    """

    def __init__(self, n_users: int, n_items: int, n_ratings: int, dim: int,
                 use_ratings: bool = True, init_std: float = 0.01) -> None:
        super().__init__()
        self.dim, self.use_ratings = dim, use_ratings
        # n_users = 0: a model without a user feature (GRU4Rec is session-based)
        self.user = nn.Embedding(n_users, dim, padding_idx=0) if n_users > 0 else None
        self.item = nn.Embedding(n_items, dim, padding_idx=0)
        self.rating = nn.Embedding(n_ratings, dim, padding_idx=0) if use_ratings else None
        for table in (self.user, self.item, self.rating):
            if table is not None:
                nn.init.normal_(table.weight, std=init_std)
                with torch.no_grad():
                    table.weight[0].zero_()

    def behaviours(self, hist_items: torch.Tensor, hist_ratings: torch.Tensor) -> torch.Tensor:
        """(B, T) item ids and rating ids -> (B, T, dim) behaviour embeddings."""
        e = self.item(hist_items)
        if self.rating is not None:
            e = e + self.rating(hist_ratings)
        return e


class LocalActivationUnit(nn.Module):
    """DIN's attention (Zhou et al. 2018, eq. 3): ``v_U(A) = sum_j a(e_j, v_A) * e_j``.

    ``a`` is an MLP over ``[e_j, v_A, e_j - v_A, e_j * v_A]`` (the official implementation's
    input; the paper's figure draws an outer product) giving one weight per behaviour. As in the
    paper the weights are NOT softmax-normalised, so the pooled vector keeps the intensity of the
    user's interest. The MLP runs only on real (masked) behaviours: padding never enters it, nor
    Dice's batch statistics.

    Shapes: ``keys`` (B, T, D), ``query`` (B, D), ``mask`` (B, T) bool -> (B, D).
    """

    def __init__(self, dim: int, hidden: Sequence[int], activation: str = "dice") -> None:
        super().__init__()
        self.score = MLP(4 * dim, hidden, activation)

    def forward(self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        feats = torch.cat([keys, q, keys - q, keys * q], dim=-1)[mask]  # (N_real, 4D)
        weights = keys.new_zeros(mask.shape)
        if feats.shape[0] > 0:
            weights = weights.masked_scatter(mask, self.score(feats).squeeze(-1))
        return (weights.unsqueeze(-1) * keys).sum(1)
