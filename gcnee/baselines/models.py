"""The traditional CTR baselines of the paper's Table 2: DeepFM, DIN, GRU4Rec and SIM.

Compact re-implementations (no maintained PyPI library covers all four with these inputs at a
reasonable dependency cost: deepctr-torch has DeepFM/DIN only and its own training loop plus
scikit-learn; torch-rechub has DeepFM/DIN and GRU4Rec only as a retrieval model, no SIM; fuxictr
has SIM but pulls ray, polars, pyarrow and h5py; RecBole is not a dependency: gcnee only reads
its ml-100k files).

Every model maps a batch (see ``gcnee.baselines.data``) to one logit per row:

- ``user`` (B,) int64, ``item`` (B,) int64 — the target item,
- ``hist_items`` (B, T) int64, ``hist_ratings`` (B, T) int64 — rating-value ids,
- ``hist_mask`` (B, T) bool — True at the row's real behaviours, which come first (right padding),

and returns ``(B,)`` float logits. Index 0 of every id is padding and 1 is out-of-vocabulary.
A behaviour (one history entry) is embedded as ``e_item + e_rating`` when ``use_ratings`` (the
user's own ratings are known at prediction time; the paper's baselines use the history ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gcnee.baselines.layers import MLP, BehaviourEmbedding, LocalActivationUnit, masked_mean

Batch = dict[str, torch.Tensor]
MODELS = ("deepfm", "din", "gru4rec", "sim")


class DeepFM(nn.Module):
    """DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
    Prediction", IJCAI 2017).

    ``y = sigmoid(y_FM + y_DNN)`` with embeddings shared by both parts. Fields here: user, target
    item, history items (mean of their embeddings over the real behaviours) and, with
    ``use_ratings``, history ratings (mean). With field vectors ``V_f`` and first-order weights
    ``w_f`` (multi-valued fields mean-pooled, as deepctr's "mean" combiner):

    ``y_FM = b + sum_f w_f + sum_{f<g} <V_f, V_g>``, computed as
    ``1/2 * sum_d ((sum_f V_fd)^2 - sum_f V_fd^2)``; ``y_DNN = MLP(concat_f V_f)`` (ReLU, dropout;
    the paper's best setting is 400-400-400 with dropout 0.5). History and target share the item
    table, so ``<V_item, V_history>`` scores how the target resembles what the user watched.
    """

    def __init__(self, n_users: int, n_items: int, n_ratings: int, dim: int = 16,
                 hidden: Sequence[int] = (400, 400, 400), dropout: float = 0.5,
                 use_ratings: bool = True) -> None:
        super().__init__()
        self.emb = BehaviourEmbedding(n_users, n_items, n_ratings, dim, use_ratings)
        self.w_user = nn.Embedding(n_users, 1, padding_idx=0)
        self.w_item = nn.Embedding(n_items, 1, padding_idx=0)
        self.w_rating = nn.Embedding(n_ratings, 1, padding_idx=0) if use_ratings else None
        for w in (self.w_user, self.w_item, self.w_rating):
            if w is not None:
                nn.init.zeros_(w.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        n_fields = 4 if use_ratings else 3
        self.dnn = MLP(n_fields * dim, hidden, "relu", dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        mask, hist = batch["hist_mask"], batch["hist_items"]
        fields = [self.emb.user(batch["user"]), self.emb.item(batch["item"]),
                  masked_mean(self.emb.item(hist), mask)]
        first = (self.w_user(batch["user"]) + self.w_item(batch["item"])
                 + masked_mean(self.w_item(hist), mask))
        if self.w_rating is not None:
            fields.append(masked_mean(self.emb.rating(batch["hist_ratings"]), mask))
            first = first + masked_mean(self.w_rating(batch["hist_ratings"]), mask)
        v = torch.stack(fields, dim=1)  # (B, F, D)
        second = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1)
        return self.bias + first.squeeze(-1) + second + self.dnn(v.flatten(1)).squeeze(-1)


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., "Deep Interest Network for Click-Through Rate
    Prediction", KDD 2018).

    The history is pooled by the local activation unit w.r.t. the target item:
    ``v_U(A) = sum_j a(e_j, v_A) e_j`` (un-normalised weights, padding excluded), then
    ``logit = MLP([e_user, v_A, v_U(A)])``. Activation: Dice (paper eq. 9) in both the activation
    unit and the MLP by default (``activation="prelu"`` gives the paper's PReLU variant); sizes:
    MLP 200-80 and activation unit 80-40 as in the paper's and official code's settings.
    """

    def __init__(self, n_users: int, n_items: int, n_ratings: int, dim: int = 16,
                 attention_hidden: Sequence[int] = (80, 40), hidden: Sequence[int] = (200, 80),
                 activation: str = "dice", dropout: float = 0.0, use_ratings: bool = True) -> None:
        super().__init__()
        self.emb = BehaviourEmbedding(n_users, n_items, n_ratings, dim, use_ratings)
        self.attention = LocalActivationUnit(dim, attention_hidden, activation)
        self.head = MLP(3 * dim, hidden, activation, dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        keys = self.emb.behaviours(batch["hist_items"], batch["hist_ratings"])
        target = self.emb.item(batch["item"])
        pooled = self.attention(keys, target, batch["hist_mask"])
        x = torch.cat([self.emb.user(batch["user"]), target, pooled], dim=-1)
        return self.head(x).squeeze(-1)


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks",
    ICLR 2016), used as a CTR scorer.

    A GRU reads the history behaviours oldest first; its final state ``h`` (of the last REAL
    behaviour, via packed sequences, zeros for an empty history) is the session state. The
    original scores every item with an output layer, ``r_i = <W h, e_i>``; here, as a pointwise
    CTR model, that product is one input of an MLP that scores the target item:
    ``logit = MLP([h, e_A, (W h) * e_A])`` (ReLU). Like the original (session-based), it has no
    user-id feature. The paper's GRU layer has 100 units.
    """

    def __init__(self, n_items: int, n_ratings: int, dim: int = 16, gru_hidden: int = 100,
                 hidden: Sequence[int] = (200, 80), dropout: float = 0.0,
                 use_ratings: bool = True) -> None:
        super().__init__()
        self.emb = BehaviourEmbedding(0, n_items, n_ratings, dim, use_ratings)
        self.gru = nn.GRU(dim, gru_hidden, batch_first=True)
        self.out = nn.Linear(gru_hidden, dim, bias=False)
        self.head = MLP(gru_hidden + 2 * dim, hidden, "relu", dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        mask = batch["hist_mask"]
        lengths = mask.sum(1)
        x = self.emb.behaviours(batch["hist_items"], batch["hist_ratings"])
        # An empty history still needs one step for packing; its state is zeroed below.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h_n = self.gru(packed)
        h = h_n[-1] * (lengths > 0).unsqueeze(-1).to(x.dtype)
        target = self.emb.item(batch["item"])
        return self.head(torch.cat([h, target, self.out(h) * target], dim=-1)).squeeze(-1)


class SIM(nn.Module):
    """Search-based Interest Model (Pi et al., "Search-based User Interest Modeling with Lifelong
    Sequential Behavior Data for Click-Through Rate Prediction", CIKM 2020).

    Two stages over the user's behaviours:

    1. **General Search Unit** picks at most ``topk`` behaviours relevant to the target A.
       Hard search (the paper's deployed variant): ``r_j = Sign(C_j = C_A)``, behaviours of the
       target's category; items here may have several categories (MovieLens genres), so
       ``r_j`` = number of shared categories, behaviours sharing none are excluded, ties go to
       the more recent. Soft search: ``r_j = <e_j, e_A>`` over all behaviours, with the model's
       own item embeddings (detached; the paper trains separate ones with an auxiliary loss).
       ``search="auto"`` = hard when item categories are known, else soft.
    2. **Exact Search Unit**: multi-head target attention over the selected behaviours, each
       concatenated with an embedding of its time interval, ``z_j = [e_j, e_{t_j}]``; histories
       here carry no timestamps, so ``t_j`` = position from the most recent behaviour.
       ``a_i = softmax_j(<W_b^i z_j, W_a^i e_A> / sqrt(D))``, ``head_i = sum_j a_ij z_j``,
       ``u_long = concat_i head_i``.

    The paper models short-term behaviour with the production DIEN/DIN model; here it is DIN's
    local activation unit over the ``short_len`` most recent behaviours, and
    ``logit = MLP([e_user, e_A, u_long, u_short])`` (Dice, 200-80, as DIN).

    ``item_genres``: (n_items, G) float multi-hot categories per item id (None: soft search).
    """

    def __init__(self, n_users: int, n_items: int, n_ratings: int, dim: int = 16,
                 item_genres: torch.Tensor | None = None, search: str = "auto", topk: int = 8,
                 heads: int = 2, short_len: int = 5, max_positions: int = 64,
                 attention_hidden: Sequence[int] = (80, 40), hidden: Sequence[int] = (200, 80),
                 activation: str = "dice", dropout: float = 0.0, use_ratings: bool = True) -> None:
        super().__init__()
        has_genres = item_genres is not None and bool(item_genres.sum() > 0)
        if search == "auto":
            search = "hard" if has_genres else "soft"
        if search not in ("hard", "soft"):
            raise ValueError(f"baselines.sim_search must be hard, soft or auto, got {search!r}")
        if search == "hard" and not has_genres:
            raise ValueError("baselines.sim_search=hard needs item categories (Items.extra), "
                             "and these items have none: use soft or auto")
        if topk < 1 or heads < 1 or short_len < 1:
            raise ValueError("baselines.sim_topk, sim_heads and sim_short_len must be >= 1")
        self.search, self.topk, self.heads, self.short_len = search, topk, heads, short_len
        self.dim, self.max_positions = dim, max_positions
        if search == "hard":
            self.register_buffer("item_genres", item_genres.float(), persistent=False)
        self.emb = BehaviourEmbedding(n_users, n_items, n_ratings, dim, use_ratings)
        self.position = nn.Embedding(max_positions, dim)
        nn.init.normal_(self.position.weight, std=0.01)
        self.w_target = nn.Linear(dim, heads * dim, bias=False)
        self.w_behaviour = nn.Linear(2 * dim, heads * dim, bias=False)
        self.short = LocalActivationUnit(dim, attention_hidden, activation)
        self.head = MLP(3 * dim + heads * 2 * dim, hidden, activation, dropout)

    def general_search(self, batch: Batch, target: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, K) of the selected behaviours and their mask (B, K), K = min(topk, T)."""
        mask, hist = batch["hist_mask"], batch["hist_items"]
        if self.search == "hard":
            shared = (self.item_genres[hist] * self.item_genres[batch["item"]].unsqueeze(1)).sum(-1)
            eligible = mask & (shared > 0)
            # 1/(p+2) < 1 breaks ties toward recent behaviours without outranking a shared genre
            score = shared + 1.0 / (positions.to(shared.dtype) + 2.0)
        else:
            eligible = mask
            score = (self.emb.item(hist) * target.unsqueeze(1)).sum(-1).detach()
        score = score.masked_fill(~eligible, float("-inf"))
        k = min(self.topk, mask.shape[1])
        # stable: tied scores keep position order, so padding never changes the choice
        idx = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        return idx, torch.gather(eligible, 1, idx)

    def forward(self, batch: Batch) -> torch.Tensor:
        mask = batch["hist_mask"]
        steps = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        positions = (mask.sum(1, keepdim=True) - 1 - steps).clamp(min=0)  # 0 = most recent
        target = self.emb.item(batch["item"])
        behaviours = self.emb.behaviours(batch["hist_items"], batch["hist_ratings"])

        idx, sel = self.general_search(batch, target, positions)
        picked = torch.gather(behaviours, 1, idx.unsqueeze(-1).expand(-1, -1, self.dim))
        t_emb = self.position(torch.gather(positions, 1, idx).clamp(max=self.max_positions - 1))
        z = torch.cat([picked, t_emb], dim=-1)  # (B, K, 2D)
        b, k = idx.shape
        keys = self.w_behaviour(z).view(b, k, self.heads, self.dim)
        query = self.w_target(target).view(b, 1, self.heads, self.dim)
        logits = (keys * query).sum(-1) / self.dim ** 0.5  # (B, K, H)
        # finite fill: a row with nothing selected gets all-zero weights, not NaN
        logits = logits.masked_fill(~sel.unsqueeze(-1), torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * sel.unsqueeze(-1).to(logits.dtype)
        long_term = torch.einsum("bkh,bkd->bhd", weights, z).flatten(1)  # (B, H * 2D)

        short_mask = mask & (positions < self.short_len)
        short_term = self.short(behaviours, target, short_mask)
        user = self.emb.user(batch["user"])
        x = torch.cat([user, target, long_term, short_term], dim=-1)
        return self.head(x).squeeze(-1)


def build_model(name: str, sizes: dict[str, int], cfg: Any,
                item_genres: torch.Tensor | None = None) -> nn.Module:
    """The baseline ``name`` (one of ``MODELS``) for vocabularies ``sizes`` (``n_users``,
    ``n_items``, ``n_ratings``, ``max_history``) and settings ``cfg`` (the ``baselines`` section).
    """
    dim, use_r = int(cfg.embedding_dim), bool(cfg.use_ratings)
    nu, ni, nr = sizes["n_users"], sizes["n_items"], sizes["n_ratings"]
    hidden, act = list(cfg.mlp_hidden), str(cfg.din_activation)
    if act not in ("dice", "prelu"):
        raise ValueError(f"baselines.din_activation must be dice or prelu, got {act!r}")
    if name == "deepfm":
        return DeepFM(nu, ni, nr, dim, list(cfg.deepfm_hidden), float(cfg.deepfm_dropout), use_r)
    if name == "din":
        return DIN(nu, ni, nr, dim, list(cfg.din_attention_hidden), hidden, act,
                   float(cfg.dropout), use_r)
    if name == "gru4rec":
        return GRU4Rec(ni, nr, dim, int(cfg.gru_hidden), hidden, float(cfg.dropout), use_r)
    if name == "sim":
        return SIM(nu, ni, nr, dim, item_genres, str(cfg.sim_search), int(cfg.sim_topk),
                   int(cfg.sim_heads), int(cfg.sim_short_len), max(sizes["max_history"], 1),
                   list(cfg.din_attention_hidden), hidden, act, float(cfg.dropout), use_r)
    raise ValueError(f"unknown baseline {name!r} in baselines.models; known: {', '.join(MODELS)}")
