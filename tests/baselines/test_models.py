"""The baseline models: each learns a planted signal, ignores padding, survives empty histories."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gcnee.baselines.layers import Dice
from gcnee.baselines.models import MODELS, build_model
from gcnee.baselines.module import fit_baseline, predict_proba, torch_threads
from gcnee.metrics import auc

N_USERS, N_ITEMS, N_RATINGS, T = 30, 40, 5, 8  # real ids; +2 for padding and OOV


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster on a busy machine."""
    with torch_threads(1):
        yield


def small_cfg(**kw):
    base = dict(models=list(MODELS), embedding_dim=8, use_ratings=True, lr=1e-2,
                weight_decay=0.0, epochs=4, batch_size=64, eval_batch_size=512, patience=4,
                mlp_hidden=[32, 16], dropout=0.0, deepfm_hidden=[32, 32], deepfm_dropout=0.0,
                din_attention_hidden=[16, 8], din_activation="dice", gru_hidden=16,
                sim_search="auto", sim_topk=4, sim_heads=2, sim_short_len=3,
                num_threads=1)
    base.update(kw)
    return OmegaConf.create(base)


TRAINER = OmegaConf.create(dict(accelerator="cpu", devices=1, strategy="auto", num_nodes=1,
                                precision="32-true", log_every_n_steps=10, deterministic=False,
                                enable_progress_bar=False, gradient_clip_val=None,
                                num_workers=0))
SIZES = {"n_users": N_USERS + 2, "n_items": N_ITEMS + 2, "n_ratings": N_RATINGS + 2,
         "max_history": T}


def item_group(ids: np.ndarray) -> np.ndarray:
    return ids % 2


def genres() -> torch.Tensor:
    """Two categories = the items' groups; padding and OOV have none."""
    g = torch.zeros(N_ITEMS + 2, 2)
    ids = torch.arange(2, N_ITEMS + 2)
    g[ids, ids % 2] = 1.0
    return g


def toy(n: int, seed: int, user_pref: np.ndarray, unknown_users: float) -> dict[str, torch.Tensor]:
    """Planted signal: label = 1 iff the target's group is the user's preferred group; 90 % of a
    history's items come from that group, so both the user id and the history reveal it. A share
    ``unknown_users`` of the rows carry the OOV user id: only their history tells."""
    rng = np.random.default_rng(seed)
    users = rng.integers(2, N_USERS + 2, n)
    pref = user_pref[users]
    users[rng.random(n) < unknown_users] = 1
    items = rng.integers(2, N_ITEMS + 2, n)
    lengths = rng.integers(2, T + 1, n)
    lengths[rng.random(n) < 0.03] = 0  # a few empty histories
    hist = np.zeros((n, T), dtype=np.int64)
    mask = np.arange(T)[None, :] < lengths[:, None]
    for r in range(n):
        same = rng.random(lengths[r]) < 0.9
        group = np.where(same, pref[r], 1 - pref[r])
        hist[r, :lengths[r]] = 2 + 2 * rng.integers(0, N_ITEMS // 2, lengths[r]) + group
    ratings = np.where(mask, rng.integers(2, N_RATINGS + 2, (n, T)), 0)
    return {"user": torch.as_tensor(users), "item": torch.as_tensor(items),
            "hist_items": torch.as_tensor(hist), "hist_ratings": torch.as_tensor(ratings),
            "hist_mask": torch.as_tensor(mask),
            "label": torch.as_tensor((item_group(items) == pref).astype(np.float32)),
            "sample_id": torch.arange(n)}


@pytest.fixture(scope="module")
def toy_data():
    pref = np.random.default_rng(0).integers(0, 2, N_USERS + 2)
    return toy(2000, 1, pref, 0.5), toy(400, 2, pref, 0.5), toy(600, 3, pref, 1.0)


@pytest.mark.parametrize("name", MODELS)
def test_learns_planted_signal(name, toy_data, tmp_path):
    """Test rows all have an unknown user: the signal must be read from the history."""
    torch.manual_seed(0)
    train, val, test = toy_data
    cfg = small_cfg()
    model = build_model(name, SIZES, cfg, genres())
    module, info = fit_baseline(model, train, val, cfg, TRAINER, tmp_path / name, seed=0)
    p = predict_proba(module.model, test)
    assert p.shape == (600,) and ((p >= 0) & (p <= 1)).all()
    assert auc(test["label"].numpy(), p) > 0.9, name
    assert info["best_val_auc"] > 0.9 and 1 <= info["best_epoch"] <= info["epochs"] <= cfg.epochs


def test_best_epoch_weights_are_restored(toy_data, tmp_path):
    """lr = 0: every epoch scores the same, so the first (1-based) stays the best one."""
    torch.manual_seed(0)
    train, val, _ = toy_data
    cfg = small_cfg(lr=0.0, epochs=2, patience=5)
    model = build_model("deepfm", SIZES, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module, info = fit_baseline(model, train, val, cfg, TRAINER, tmp_path / "ck", seed=0)
    assert info["best_epoch"] == 1 and info["epochs"] == 2
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _widen(batch: dict, extra: int, seed: int = 0) -> dict:
    """The same rows with ``extra`` more padding columns holding junk ids (mask False)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    n = len(batch["label"])
    out["hist_items"] = torch.cat([batch["hist_items"],
                                   torch.randint(2, N_ITEMS + 2, (n, extra), generator=g)], 1)
    out["hist_ratings"] = torch.cat([batch["hist_ratings"],
                                     torch.randint(2, N_RATINGS + 2, (n, extra), generator=g)], 1)
    out["hist_mask"] = torch.cat([batch["hist_mask"], torch.zeros(n, extra, dtype=torch.bool)], 1)
    return out


def _spread_embeddings(model: torch.nn.Module) -> None:
    """Large random embeddings, so outputs differ between rows (a freshly built model's are
    nearly constant, which would let an invariance check pass trivially)."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=1.0)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


@pytest.mark.parametrize("name,search", [(m, "auto") for m in MODELS] + [("sim", "soft")])
def test_extra_padding_does_not_change_outputs(name, search, toy_data):
    torch.manual_seed(0)
    model = build_model(name, SIZES, small_cfg(sim_search=search), genres()).eval()
    _spread_embeddings(model)
    batch = {k: v[:64] for k, v in toy_data[0].items()}
    with torch.no_grad():
        base = model(batch)
        wide = model(_widen(batch, 5))
        # the check is not vacuous: changing a real behaviour changes that row's output
        changed = dict(batch, hist_items=batch["hist_items"].clone())
        rows = batch["hist_mask"][:, 0]
        changed["hist_items"][rows, 0] = 2 + (changed["hist_items"][rows, 0] - 1) % N_ITEMS
        moved = model(changed)
    assert base.shape == (64,)
    torch.testing.assert_close(wide, base, atol=1e-5, rtol=1e-5)
    assert (moved - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_empty_histories_are_finite_in_training_and_eval(name, toy_data):
    torch.manual_seed(0)
    model = build_model(name, SIZES, small_cfg(), genres())
    batch = {k: v[:16].clone() for k, v in toy_data[0].items()}
    batch["hist_mask"][:8] = False  # half the rows: nothing but padding
    batch["hist_items"][:8] = 0
    batch["hist_ratings"][:8] = 0
    model.train()
    out = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(out, batch["label"]).backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        all_pad = dict(batch, hist_mask=torch.zeros_like(batch["hist_mask"]))
        assert torch.isfinite(model(all_pad)).all()


def test_sim_hard_search_keeps_shared_category_most_recent_first():
    model = build_model("sim", SIZES, small_cfg(sim_search="hard", sim_topk=2), genres())
    assert model.search == "hard"
    # target item 2 (group 0); history items: 4 (g0), 3 (g1), 6 (g0), 8 (g0), padding
    batch = {"user": torch.tensor([2]), "item": torch.tensor([2]),
             "hist_items": torch.tensor([[4, 3, 6, 8, 0]]),
             "hist_ratings": torch.tensor([[2, 2, 2, 2, 0]]),
             "hist_mask": torch.tensor([[True, True, True, True, False]])}
    positions = torch.tensor([[3, 2, 1, 0, 0]])
    idx, sel = model.general_search(batch, model.emb.item(batch["item"]), positions)
    assert sorted(idx[0].tolist()) == [2, 3] and sel.all()  # the two most recent of group 0
    model_soft = build_model("sim", SIZES, small_cfg(sim_search="auto"), None)
    assert model_soft.search == "soft"
    with pytest.raises(ValueError, match="sim_search=hard"):
        build_model("sim", SIZES, small_cfg(sim_search="hard"), None)


def test_unknown_model_and_activation_named():
    with pytest.raises(ValueError, match="baselines.models"):
        build_model("xgboost", SIZES, small_cfg())
    with pytest.raises(ValueError, match="baselines.din_activation"):
        build_model("din", SIZES, small_cfg(din_activation="tanh"))


def test_dice_uses_batch_statistics_in_training_and_running_ones_in_eval():
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.fill_(0.5)
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]])
    y = dice.train()(x)
    p = torch.sigmoid((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-8))
    torch.testing.assert_close(y, p * x + (1 - p) * 0.5 * x)
    torch.testing.assert_close(dice.running_mean, 0.1 * x.mean(0))
    one = dice.train()(x[:1])  # one row: running statistics, no error
    assert torch.isfinite(one).all()
    p_eval = torch.sigmoid((x - dice.running_mean) / torch.sqrt(dice.running_var + 1e-8))
    torch.testing.assert_close(dice.eval()(x), p_eval * x + (1 - p_eval) * 0.5 * x)
