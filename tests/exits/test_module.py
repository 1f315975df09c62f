"""ExitHeadsModule: per-head learning rates, frozen backbone, heads learn a toy task."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gcnee.exits import ExitHeads
from gcnee.exits.module import ExitHeadsModule, head_learning_rates

from tiny import make_tiny_llama, make_tiny_tokenizer


def toy_batches(tok, n=32, batch_size=8, seed=0, with_ids=False):
    """Random prompts ending in "good" (label 1) or "bad" (label 0), left-padded."""
    g = torch.Generator().manual_seed(seed)
    good, bad = tok.convert_tokens_to_ids(["good", "bad"])
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(7, 60, (length,), generator=g).tolist()
        label = i % 2
        rows.append((ids + [good if label else bad], label))

    def collate(items):
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        am = torch.zeros_like(input_ids)
        for r, (ids, _) in enumerate(items):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            am[r, width - len(ids):] = 1
        out = {"input_ids": input_ids, "attention_mask": am,
               "label": torch.tensor([lab for _, lab in items])}
        if with_ids:
            out["sample_id"] = torch.tensor([ids_of[id(x)] for x in items])
        return out

    ids_of = {id(row): i for i, row in enumerate(rows)}
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def make_module(head="answer", lr=1e-3, beta=0.1, lr_depth="head", layers=(1, 2, 4),
                cache=True):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=4, seed=4)
    torch.manual_seed(0)
    heads = ExitHeads.from_model(model, list(layers), tok.convert_tokens_to_ids(["Yes", "No"]),
                                 head=head, init="random")
    return tok, model, ExitHeadsModule(model, heads, lr=lr, beta=beta, lr_depth=lr_depth,
                                       cache=cache)


@pytest.mark.parametrize("depth", ["head", "layer"])
def test_per_head_learning_rates_follow_formula(depth):
    _, _, module = make_module(lr=0.01, beta=0.5, lr_depth=depth, layers=(1, 3, 4))
    opt = module.configure_optimizers()
    assert [g["name"] for g in opt.param_groups] == ["head_01", "head_03"]  # own head 4 frozen
    d = [0, 1] if depth == "head" else [1, 3]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.01 * math.exp(-0.5 * x) for x in d])
    for g, layer in zip(opt.param_groups, (1, 3)):
        assert {id(p) for p in g["params"]} == {id(p) for p in
                                               module.heads.head_parameters(layer)}
    assert head_learning_rates([5, 10], 1.0, 0.1) == pytest.approx({5: 1.0,
                                                                    10: math.exp(-0.1)})
    with pytest.raises(ValueError, match="exits.lr_depth"):
        head_learning_rates([5], 1.0, 0.1, depth="block")


@pytest.mark.parametrize("head", ["answer", "full"])
def test_training_moves_heads_only_and_losses_fall(head):
    tok, model, module = make_module(head=head, lr=0.05)
    data = toy_batches(tok)
    before_backbone = {k: v.clone() for k, v in model.state_dict().items()}
    before_own = [p.clone() for p in module.heads.head_parameters(4)]
    with torch.no_grad():
        full = next(iter(toy_batches(tok, batch_size=32)))
        loss0 = {k: v.item() for k, v in module.head_losses(full).items()}
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1,
                        num_sanity_val_steps=0, check_val_every_n_epoch=3)
    trainer.fit(module, data, data)
    assert not model.training  # Lightning put the module in train mode; the backbone stayed eval
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_backbone[k]), k
    assert all(torch.equal(a, b) for a, b in zip(before_own, module.heads.head_parameters(4)))
    with torch.no_grad():
        loss1 = {k: v.item() for k, v in module.head_losses(full).items()}
    assert set(loss0) == {1, 2}
    for layer in loss0:
        assert loss1[layer] < 0.5 * loss0[layer], (layer, loss0, loss1)
    m = trainer.callback_metrics
    for key in ("train/loss/head_01_epoch", "train/lr/head_02", "val/auc/head_01",
                "val/auc/head_04", "val/loss/head_02"):
        assert key in m, sorted(m)
    assert m["val/auc/head_01"] > 0.9
    assert float(m["train/lr/head_02"]) == pytest.approx(0.05 * math.exp(-0.1))


def test_checkpoint_holds_heads_only():
    _, _, module = make_module()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    assert any(k.startswith("heads.projs.1") for k in ckpt["state_dict"])


def test_cached_states_change_nothing_but_the_backbone_passes():
    """The frozen backbone's states are computed once per sample and reused: training with the
    cache gives the same heads as recomputing every batch, with far fewer backbone passes."""
    runs = {}
    for cache in (True, False):
        tok, _, module = make_module(lr=0.05, cache=cache)
        data = toy_batches(tok, with_ids=True)  # 4 batches of 8
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0,
                            check_val_every_n_epoch=3)
        trainer.fit(module, data, data)
        runs[cache] = (module, trainer.callback_metrics["val/auc/head_01"])
    cached, fresh = runs[True][0], runs[False][0]
    for a, b in zip(cached.heads.parameters(), fresh.heads.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert float(runs[True][1]) == pytest.approx(float(runs[False][1]))
    # training layers (1, 2) once per batch in epoch 1; validation needs layer 4 too: 4 more
    assert cached.backbone_batches == 4 + 4
    assert fresh.backbone_batches == 3 * 4 + 4


def test_added_states_replace_the_backbone_for_those_samples():
    tok, model, module = make_module(layers=(1, 2, 4))
    batch = next(iter(toy_batches(tok, with_ids=True)))
    from gcnee.llm.runner import LayerRunner

    ref = LayerRunner(model).states(batch["input_ids"], batch["attention_mask"], [1, 2, 4])
    states = torch.stack([ref[x] for x in (1, 2, 4)], dim=1) + 1.0  # marked: not recomputed
    module.add_states(batch["sample_id"].tolist(), [1, 2, 4], states)
    got = module.hidden(batch, [1, 4])
    assert torch.equal(got[1], ref[1] + 1.0) and torch.equal(got[4], ref[4] + 1.0)
    assert module.backbone_batches == 0
    assert module.hidden(batch, [3]) and module.backbone_batches == 1  # layer 3 not cached
