import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from gcnee.config import LLMConfig
from gcnee.llm.datamodule import EvalShardSampler, collate_left
from gcnee.llm.module import (
    CTRLLMModule,
    answer_loss,
    last_position_logits,
    yes_probability,
)

from tiny import make_tiny_llama, make_tiny_tokenizer

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llm_cfg(**over):
    cfg = OmegaConf.structured(LLMConfig)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture
def tok():
    return make_tiny_tokenizer()


def ids_of(tok, text):
    return tok(text)["input_ids"]


def batch_of(tok, texts, labels=None):
    labels = labels or [0] * len(texts)
    return collate_left([{"input_ids": ids_of(tok, t), "label": y, "sample_id": i}
                         for i, (t, y) in enumerate(zip(texts, labels))], tok.pad_token_id)


def perturb_lora(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_score_is_two_logit_softmax_at_last_position_whatever_the_padding(tok):
    model = make_tiny_llama(len(tok))
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    short = "user A rated the item with 5 stars . will the user like it ?"
    longer = "the user rated a good movie with 4 stars and a bad book with 1 star . " * 3
    batch = batch_of(tok, [longer, short])
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is left-padded
    with torch.no_grad():
        batched = yes_probability(last_position_logits(model, batch["input_ids"],
                                                       batch["attention_mask"]), yes, no)
        alone_ids = torch.tensor([ids_of(tok, short)])
        full = model(input_ids=alone_ids).logits[0, -1]  # plain forward, all positions
    expected = torch.softmax(torch.stack([full[yes], full[no]]), 0)[0]
    assert batched[1].item() == pytest.approx(expected.item(), abs=1e-5)


def test_title_with_answer_words_does_not_move_the_position_read(tok):
    model = make_tiny_llama(len(tok))
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    text = "Target item : Yes No Yes Movie . will the user like it ? Answer :"
    ids = ids_of(tok, text)
    batch = batch_of(tok, [text, "a b"])
    with torch.no_grad():
        got = yes_probability(last_position_logits(model, batch["input_ids"],
                                                   batch["attention_mask"]), yes, no)[0]
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    probs = torch.softmax(logits[:, [yes, no]], -1)[:, 0]
    assert got.item() == pytest.approx(probs[-1].item(), abs=1e-5)
    # a reader keyed on the answer token's position (TALLRec's stride bug) would read elsewhere
    after_yes = ids.index(yes)
    assert abs(probs[after_yes].item() - probs[-1].item()) > 1e-4


def test_answer_loss_kinds():
    logits = torch.zeros(2, 10)
    logits[0, 3], logits[1, 4] = 2.0, 1.0
    labels = torch.tensor([1, 0])
    binary = answer_loss(logits, labels, yes_id=3, no_id=4, kind="binary")
    # row 0: P(yes)=sigmoid(2); row 1: P(no)=sigmoid(1)
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0)))
                 + torch.log(torch.sigmoid(torch.tensor(1.0)))) / 2
    assert binary.item() == pytest.approx(expected.item(), abs=1e-6)
    vocab = answer_loss(logits, labels, yes_id=3, no_id=4, kind="vocab")
    expected_v = (torch.logsumexp(logits[0], 0) - 2.0 + torch.logsumexp(logits[1], 0) - 1.0) / 2
    assert vocab.item() == pytest.approx(expected_v.item(), abs=1e-6)
    with pytest.raises(ValueError, match="llm.loss"):
        answer_loss(logits, labels, 3, 4, kind="mse")


class _ListSet(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def toy_items(tok, n, seed=0):
    """Label 1 iff the prompt's target is 'good' (position and filler words vary)."""
    g = torch.Generator().manual_seed(seed)
    fill = ["the", "user", "rated", "a", "movie", "book", "with", "stars", "item"]
    items = []
    for i in range(n):
        label = i % 2
        words = [fill[j] for j in torch.randint(len(fill), (int(torch.randint(2, 8, (1,))),),
                                                generator=g)]
        text = " ".join(words) + f" . Target item : {'good' if label else 'bad'} Movie . Answer :"
        items.append({"input_ids": ids_of(tok, text), "label": label, "sample_id": i})
    return items


@pytest.mark.parametrize("loss", ["binary", "vocab"])
def test_loss_decreases_and_auc_rises_on_a_learnable_task(tok, loss):
    L.seed_everything(0, verbose=False)
    model = make_tiny_llama(len(tok), num_layers=2)
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    cfg = llm_cfg(loss=loss, lr=3e-2, warmup_ratio=0.1,
                  **{"lora.r": 8, "lora.dropout": 0.0, "lora.target_modules": ALL_PROJ})
    module = CTRLLMModule(model, yes, no, cfg)
    train = DataLoader(_ListSet(toy_items(tok, 32)), batch_size=8, shuffle=True,
                       collate_fn=lambda b: collate_left(b, tok.pad_token_id))
    evalset = _ListSet(toy_items(tok, 40, seed=1))
    val = DataLoader(evalset, batch_size=16, sampler=EvalShardSampler(range(len(evalset))),
                     collate_fn=lambda b: collate_left(b, tok.pad_token_id))
    batch = next(iter(DataLoader(evalset, batch_size=40,
                                 collate_fn=lambda b: collate_left(b, tok.pad_token_id))))
    with torch.no_grad():
        before = answer_loss(module(batch["input_ids"], batch["attention_mask"]),
                             batch["label"], yes, no, loss).item()
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=train)
    module.eval()
    with torch.no_grad():
        after = answer_loss(module(batch["input_ids"], batch["attention_mask"]),
                            batch["label"], yes, no, loss).item()
    # binary: from ln 2 = 0.69 to ~0.40 in 40 steps; vocab: ~4.4 -> ~3.9 (all 100 tokens)
    assert before - after > 0.25
    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    evaluator.validate(module, dataloaders=val, verbose=False)
    res = module.results["val"]
    assert res["sample_id"].tolist() == list(range(40))  # every sample once, sorted
    print("AUC", evaluator.callback_metrics["tuned/val_auc"])
    assert evaluator.callback_metrics["tuned/val_auc"].item() > 0.9
    assert res["label"].tolist() == [i % 2 for i in range(40)]


def test_adapter_save_reload_and_merged_give_identical_scores(tok, tmp_path):
    from peft import PeftModel

    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    cfg = llm_cfg(**{"lora.target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]})
    module = CTRLLMModule(make_tiny_llama(len(tok), seed=3), yes, no, cfg).eval()
    perturb_lora(module)
    batch = batch_of(tok, ["the user liked a good movie . Answer :", "a bad book ?",
                           "User A rated the item with 5 stars . Target item : Movie"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scores = module.score(ids, mask)
    base_scores = CTRLLMModule(make_tiny_llama(len(tok), seed=3), yes, no, cfg).score(ids, mask)
    assert (scores - base_scores).abs().max() > 1e-3  # the adapter changes the scores

    module.save_adapter(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(len(tok), seed=3),
                                         tmp_path / "adapter")
    again = CTRLLMModule(reloaded, yes, no, cfg, lora=False).eval().score(ids, mask)
    assert torch.equal(again, scores)

    module.save_merged(tmp_path / "merged", tok)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_scores = yes_probability(last_position_logits(merged, ids, mask), yes, no)
    assert torch.allclose(merged_scores, scores, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("Yes") == yes
    # merging worked on a copy: the module still holds its adapter
    assert torch.equal(module.score(ids, mask), scores)


def test_checkpoint_keeps_only_trainable_weights(tok):
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    module = CTRLLMModule(make_tiny_llama(len(tok)), yes, no, llm_cfg())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_recorded_states_are_the_merged_models_exit_layer_states(tok):
    """What the llm stage records while scoring equals, bit for bit, what the exit scorer
    computes with the merged model for the same batches (the same layer runner): the heads are
    trained on the states they are served on."""
    from gcnee.exits import EarlyExitScorer, ExitHeads

    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    module = CTRLLMModule(make_tiny_llama(len(tok)), yes, no, llm_cfg(**{"lora.r": 4}))
    perturb_lora(module)
    texts = ["the user rated a good movie with 4 stars and a bad book with 1 star . " * 2,
             "user A rated the item with 5 stars . will the user like it ?", "good"]
    batch = batch_of(tok, texts)
    module.record_layers = [1, 2, 4]
    loader = DataLoader([{"input_ids": ids_of(tok, t), "label": i % 2, "sample_id": 10 + i}
                         for i, t in enumerate(texts)], batch_size=2,
                        collate_fn=lambda b: collate_left(b, tok.pad_token_id))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False).test(module, loader, verbose=False)
    got = module.results["test"]
    assert got["sample_id"].tolist() == [10, 11, 12] and got["hidden"].shape == (3, 3, 32)
    merged = module.merged_model()
    scorer = EarlyExitScorer(merged, ExitHeads.from_model(merged, [1, 2, 4], (yes, no)))
    for rows in ([0, 1], [2]):  # the loader's batches
        b = collate_left([{"input_ids": ids_of(tok, texts[i]), "label": 0, "sample_id": i}
                          for i in rows], tok.pad_token_id)
        ref = scorer.runner.states(b["input_ids"], b["attention_mask"], [1, 2, 4])
        for j, layer in enumerate((1, 2, 4)):
            assert torch.equal(torch.from_numpy(got["hidden"][rows, j]), ref[layer]), (rows, j)
    # the padded batch of all three: the same states up to float rounding
    ref = scorer.runner.states(batch["input_ids"], batch["attention_mask"], [1, 2, 4])
    for j, layer in enumerate((1, 2, 4)):
        assert torch.allclose(torch.from_numpy(got["hidden"][:, j]), ref[layer], atol=1e-5)
    _, seen = module.score_and_record(batch["input_ids"], batch["attention_mask"])
    assert seen == {}  # nothing asked, nothing kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_merges_lora_and_leaves_weights_bit_identical(tok, dtype):
    """validate/test score on W + s·BA merged in (faster on CPU), with the unmerged path's
    scores, and afterwards every weight is bit for bit what it was (W + Δ − Δ != W in floating
    point: subtracting the delta again would shift the weights training continues from)."""
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    module = CTRLLMModule(make_tiny_llama(len(tok), seed=5).to(dtype), yes, no,
                          llm_cfg(**{"lora.r": 4, "lora.target_modules": ALL_PROJ}))
    perturb_lora(module, seed=1)
    module.model.to(dtype)
    texts = ["the user rated a good movie with 4 stars . Answer :", "a bad book ?", "good"]
    batch = batch_of(tok, texts)
    unmerged = module.eval().score(batch["input_ids"], batch["attention_mask"])
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    seen_merged = []
    score = module.score_and_record

    def spy(*args, **kw):
        seen_merged.append(module.lora_merged)
        return score(*args, **kw)

    module.score_and_record = spy
    loader = DataLoader([{"input_ids": ids_of(tok, t), "label": i % 2, "sample_id": i}
                         for i, t in enumerate(texts)], batch_size=3,
                        collate_fn=lambda b: collate_left(b, tok.pad_token_id))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        precision="bf16-true" if dtype == torch.bfloat16 else "32-true")
    trainer.validate(module, loader, verbose=False)
    trainer.test(module, loader, verbose=False)
    assert seen_merged == [True, True]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(torch.as_tensor(module.results["val"]["score"]).float(), unmerged,
                          atol=tol)
    assert not module.lora_merged
    after = dict(module.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(after[n], p)]
    assert changed == []
    # what the exact restore prevents: merging and unmerging alone moves the weights
    tuner = module.model.base_model
    tuner.merge_adapter()
    tuner.unmerge_adapter()
    drift = [n for n, p in before.items() if not torch.equal(after[n], p)]
    assert drift, "merge + unmerge was exact here: the test shows nothing"


def test_gradient_checkpointing_gives_the_same_lora_gradients(tok):
    """llm.gradient_checkpointing=true recomputes activations in backward: same loss and LoRA
    gradients as keeping them (the memory it saves is gcnee plan's)."""
    from gcnee.llm.backbone import prepare_for_training

    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    batch = batch_of(tok, ["the user rated a good movie with 4 stars . Answer :", "a bad book ?"],
                     labels=[1, 0])
    grads = {}
    for checkpointing in (False, True):
        cfg = llm_cfg(**{"lora.r": 4, "lora.dropout": 0.0,
                         "gradient_checkpointing": checkpointing})
        model = prepare_for_training(make_tiny_llama(len(tok), seed=2), cfg)
        module = CTRLLMModule(model, yes, no, cfg)
        perturb_lora(module)
        module.train()
        loss = module.training_step(batch, 0)
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in module.named_parameters()
                                if p.requires_grad}
        decoder = module.model.get_base_model().model
        assert any(getattr(m, "gradient_checkpointing", False)
                   for m in decoder.modules()) is checkpointing
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-6, rtol=1e-5)
