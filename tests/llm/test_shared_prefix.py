import pytest
import torch
from omegaconf import OmegaConf

from gcnee.config import LLMConfig
from gcnee.llm.datamodule import collate_left
from gcnee.llm.module import CTRLLMModule, answer_loss, last_position_logits
from gcnee.llm.shared_prefix import (
    MIN_PREFIX_TOKENS,
    resolve_share_prefix,
    shared_prefix_length,
)

from tiny import make_tiny_llama, make_tiny_tokenizer

PREFIX = ("<|system|> Predict whether the user will like the target item . Answer Yes or No . "
          "<|user|> Similar users rated : ")
ROWS = ["A rated Movie with 5 stars . Target item : Book . Answer :",
        "the user liked a good Game and a bad Book ( 2 stars ) . Target item : Movie . Answer :",
        "B C D E F G H . Answer :",
        "it ?"]


def batch(tok, rows, prefix=PREFIX):
    items = [{"input_ids": tok(prefix + r)["input_ids"], "label": i % 2, "sample_id": i}
             for i, r in enumerate(rows)]
    return collate_left(items, tok.pad_token_id)


@pytest.fixture
def tok():
    return make_tiny_tokenizer()


def test_prefix_length_is_the_common_real_token_prefix(tok):
    b = batch(tok, ROWS)
    n = len(tok(PREFIX)["input_ids"])
    assert n >= MIN_PREFIX_TOKENS
    assert shared_prefix_length(b["input_ids"], b["attention_mask"]) == n
    # a lone row, or rows that differ early, share nothing worth a second forward
    one = batch(tok, ROWS[:1])
    assert shared_prefix_length(one["input_ids"], one["attention_mask"]) == 0
    mixed = collate_left([{"input_ids": tok(PREFIX + ROWS[0])["input_ids"], "label": 0,
                           "sample_id": 0},
                          {"input_ids": tok("Book " + PREFIX + ROWS[1])["input_ids"], "label": 0,
                           "sample_id": 1}], tok.pad_token_id)
    assert shared_prefix_length(mixed["input_ids"], mixed["attention_mask"]) == 0


def test_prefix_is_capped_so_every_row_keeps_its_last_token(tok):
    same = batch(tok, ["", ""], prefix=PREFIX + "A B C")
    n = len(same["input_ids"][0])
    assert shared_prefix_length(same["input_ids"], same["attention_mask"]) == n - 1


def test_not_left_padded_masks_are_not_shared(tok):
    b = batch(tok, ROWS[:2])
    right = b["attention_mask"].flip(-1)  # ones then zeros: right padding
    assert shared_prefix_length(b["input_ids"].flip(-1), right) == 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prefix_logits_equal_the_full_forward(tok, attn):
    model = make_tiny_llama(len(tok))
    model.config._attn_implementation = attn
    b = batch(tok, ROWS)
    with torch.no_grad():
        shared = last_position_logits(model, b["input_ids"], b["attention_mask"], True)
        full = last_position_logits(model, b["input_ids"], b["attention_mask"], False)
        alone = [model(input_ids=torch.tensor([tok(PREFIX + r)["input_ids"]])).logits[0, -1]
                 for r in ROWS]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, torch.stack(alone), atol=1e-5, rtol=1e-5)


def llm_cfg(share):
    cfg = OmegaConf.structured(LLMConfig)
    cfg.loss, cfg.share_prefix = "binary", share
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    return cfg


def test_training_gradients_through_the_shared_prefix_match(tok):
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    b = batch(tok, ROWS)
    grads = {}
    for share in ("true", "false"):
        module = CTRLLMModule(make_tiny_llama(len(tok)), yes, no, llm_cfg(share))
        with torch.no_grad():  # LoRA B starts at zero: give the prefix's keys a LoRA path
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        module.train()
        loss = answer_loss(module(b["input_ids"], b["attention_mask"]), b["label"], yes, no,
                           "binary")
        loss.backward()
        grads[share] = {n: p.grad.clone() for n, p in module.model.named_parameters()
                        if p.requires_grad}
    k_lora = [n for n in grads["true"] if "k_proj.lora_A" in n]
    assert k_lora and any(grads["true"][n].abs().sum() > 0 for n in k_lora)
    for name, g in grads["true"].items():
        torch.testing.assert_close(g, grads["false"][name], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_falls_back_to_the_full_forward(tok):
    model = make_tiny_llama(len(tok))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    b = batch(tok, ROWS)
    # transformers drops the cache under checkpointing: sharing would silently lose the prefix
    got = last_position_logits(model, b["input_ids"], b["attention_mask"], True)
    model.activation_checkpointing_disable()
    with torch.no_grad():
        want = last_position_logits(model, b["input_ids"], b["attention_mask"], False)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)


def test_share_prefix_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_share_prefix("auto", cpu) and not resolve_share_prefix("auto", cuda)
    assert resolve_share_prefix(None, cpu)
    assert resolve_share_prefix("True", cuda) and not resolve_share_prefix(False, cpu)
    assert not resolve_share_prefix("false", cpu)
    with pytest.raises(ValueError, match="llm.share_prefix"):
        resolve_share_prefix("sometimes", cpu)
