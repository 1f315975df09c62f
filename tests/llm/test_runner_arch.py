"""Mistral, Qwen2 and Qwen3 through the layer runner, the exit heads and the shared-prefix
training forward, each against the Hugging Face forward; what the runner refuses, by name."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gcnee.config import LLMConfig
from gcnee.exits.heads import ExitHeads
from gcnee.exits.module import ExitHeadsModule
from gcnee.llm.answer import prob_yes
from gcnee.llm.batch import left_pad, positions_from_mask
from gcnee.llm.module import CTRLLMModule, last_position_logits
from gcnee.llm.runner import LayerRunner, check_architecture, sliding_window_layers
from gcnee.llm.shared_prefix import last_hidden_with_shared_prefix

from .test_runner import PREFIX, hf_last_states, prompts, run_leaving

VOCAB = 64
MAX_LENGTH = 40  # prompts() are 21..34 tokens
ARCHS = ("mistral", "qwen2", "qwen3")
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def arch_config(arch: str, layers: int = 4, **over):
    """A tiny config with every feature of ``arch`` the runner must reproduce switched on:
    sliding-window layers whose window is ``MAX_LENGTH`` (full attention for these prompts),
    Qwen2's q/k/v biases, Qwen3's q/k norms with a head_dim that is not hidden / heads."""
    if arch == "mistral":
        kw = dict(sliding_window=MAX_LENGTH)
        return MistralConfig(**{**COMMON, "num_hidden_layers": layers, **kw, **over})
    kw = dict(use_sliding_window=True, sliding_window=MAX_LENGTH, max_window_layers=layers // 2)
    if arch == "qwen2":
        return Qwen2Config(**{**COMMON, "num_hidden_layers": layers, **kw, **over})
    kw.update(head_dim=16, attention_bias=True)
    return Qwen3Config(**{**COMMON, "num_hidden_layers": layers, **kw, **over})


def tiny_arch(arch: str, kernel: str = "eager", layers: int = 4, seed: int = 0, **over):
    """A random fp32 model of ``arch`` in eval mode; biases and norm weights (zeros and ones at
    init) are perturbed so that Qwen2's biases and Qwen3's q/k norms change the output."""
    torch.manual_seed(seed)
    cls = {"mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
           "qwen3": Qwen3ForCausalLM}[arch]
    model = cls(arch_config(arch, layers, **over)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.set_attn_implementation(kernel)
    return model


def hf_last_logits(model, ids, am) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, position_ids=positions_from_mask(am),
                     use_cache=False).logits[:, -1]


def test_the_tiny_models_have_the_features_under_test():
    assert sliding_window_layers(arch_config("mistral")) == ([1, 2, 3, 4], MAX_LENGTH)
    assert sliding_window_layers(arch_config("qwen2")) == ([3, 4], MAX_LENGTH)
    assert sliding_window_layers(arch_config("qwen3")) == ([3, 4], MAX_LENGTH)
    assert sliding_window_layers(Qwen2Config(num_hidden_layers=4)) == ([], None)  # Qwen2.5 default
    q2, q3 = tiny_arch("qwen2"), tiny_arch("qwen3")
    assert q2.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    assert q3.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    assert q3.model.layers[0].self_attn.q_proj.out_features == 4 * 16 != COMMON["hidden_size"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("share", [False, True])
def test_full_depth_logits_equal_the_hf_forward_on_a_padded_batch(arch, kernel, share):
    model = tiny_arch(arch, kernel)
    ids, am = left_pad(prompts(), pad_id=0)
    runner = LayerRunner(model, share_prefix=share, max_length=MAX_LENGTH)
    every = torch.arange(VOCAB)
    got = {}

    def visit(layer, h, rows):
        got[layer] = runner.answer_logits(h, every)  # final norm + head: all rows, float32

    with torch.no_grad():
        stats = runner.run(ids, am, [runner.num_layers], visit)
    ref = hf_last_logits(model, ids, am)
    assert stats.prefix == (len(PREFIX) if share else 0)
    assert got[4].shape == ref.shape
    assert torch.allclose(got[4], ref, atol=1e-5), (got[4] - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_rows_leaving_mid_stack_keep_the_states_of_each_prompt_alone(arch, kernel):
    model = tiny_arch(arch, kernel)
    reqs = prompts(7)
    ids, am = left_pad(reqs, pad_id=0)
    leave_at = {0: 1, 1: 2, 2: 1, 3: 3, 4: 2, 5: 3, 6: 1}  # row -> layer
    for share in (False, True):
        runner = LayerRunner(model, share_prefix=share, max_length=MAX_LENGTH)
        seen, stats = run_leaving(runner, ids, am, [1, 2, 3], leave_at)
        assert {r: max(v) for r, v in seen.items()} == leave_at
        assert stats.row_layers == 3 * 1 + 2 * 2 + 2 * 3  # compacted: no row runs past its exit
        for r, seq in enumerate(reqs):
            alone = hf_last_states(model, seq)  # hidden_states[l] of the prompt, unpadded
            for layer, x in seen[r].items():
                assert torch.allclose(x, alone[layer], atol=1e-5), (share, r, layer)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share", [False, True])
def test_the_training_forward_equals_the_hf_forward(arch, share):
    model = tiny_arch(arch, "sdpa")
    ids, am = left_pad(prompts(), pad_id=0)
    ref = hf_last_logits(model, ids, am)
    got = last_position_logits(model, ids, am, share_prefix=share)  # grad enabled, as in fit
    assert got.requires_grad
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_head_states_are_the_hf_hidden_states(arch):
    model = tiny_arch(arch, "eager")
    reqs = prompts()
    ids, am = left_pad(reqs, pad_id=0)
    heads = ExitHeads.from_model(model, [1, 2, 4], answer_ids=[5, 9])
    module = ExitHeadsModule(model, heads, max_length=MAX_LENGTH)
    states = module.hidden({"input_ids": ids, "attention_mask": am}, [1, 2, 4])
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=am, position_ids=positions_from_mask(am),
                   output_hidden_states=True, use_cache=False).hidden_states
    for layer in (1, 2):
        assert torch.allclose(states[layer], hf[layer][:, -1], atol=1e-5), layer
    # Layer N: HF's hidden_states[N] has the final norm applied; the head at N is the model's own.
    with torch.no_grad():
        assert torch.allclose(model.model.norm(states[4]), hf[4][:, -1], atol=1e-5)
    own = heads.answer_logits(4, states[4])
    assert torch.allclose(own, hf_last_logits(model, ids, am)[:, [5, 9]], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_llm_stage_records_the_states_of_the_lora_model(arch):
    cfg = OmegaConf.structured(LLMConfig)
    OmegaConf.update(cfg, "lora.target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"sliding_window=40 .*llm\.max_length=512"):
        CTRLLMModule(tiny_arch(arch), 5, 9, cfg)  # the default max_length: window too short
    cfg.max_length = MAX_LENGTH
    module = CTRLLMModule(tiny_arch(arch), 5, 9, cfg).eval()
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # LoRA B starts at zero: make the adapter count
    ids, am = left_pad(prompts(), pad_id=0)
    p, states = module.score_and_record(ids, am, record=[1, 3])
    with torch.no_grad():
        hf = module.model(input_ids=ids, attention_mask=am, position_ids=positions_from_mask(am),
                          output_hidden_states=True, use_cache=False)
    assert torch.allclose(p, prob_yes(hf.logits[:, -1, [5, 9]]), atol=1e-5)
    for layer in (1, 3):
        assert torch.allclose(states[layer], hf.hidden_states[layer][:, -1], atol=1e-5), layer


# -- refusals ------------------------------------------------------------------------------------


def test_a_sliding_window_shorter_than_max_length_is_refused_by_name():
    short = tiny_arch("mistral", sliding_window=16)
    with pytest.raises(ValueError, match=r"MistralForCausalLM \(model type 'mistral'\).*"
                                         r"sliding_window=16 on layers 1-4.*llm\.max_length=40"):
        LayerRunner(short, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="no max_length was given"):
        LayerRunner(short)
    # Why: the HF forward does attend over the window only, so full attention would be wrong.
    ids, am = left_pad(prompts(), pad_id=0)
    full = tiny_arch("mistral", sliding_window=None)
    assert (hf_last_logits(short, ids, am) - hf_last_logits(full, ids, am)).abs().max() > 1e-3
    LayerRunner(full)  # no window: nothing to check
    with pytest.raises(ValueError, match=r"qwen2.*sliding_window=16 on layers 3-4"):
        LayerRunner(tiny_arch("qwen2", sliding_window=16), max_length=MAX_LENGTH)


def test_a_prompt_longer_than_the_window_fails_when_run():
    runner = LayerRunner(tiny_arch("mistral"), max_length=MAX_LENGTH)
    ids, am = left_pad([list(range(3, 3 + MAX_LENGTH + 5))], pad_id=0)
    with pytest.raises(ValueError, match="45 tokens is longer than the model's sliding window"):
        runner.states(ids, am, [1])


def test_gemma_style_models_are_refused_naming_each_feature():
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, sliding_window=4096)
    with pytest.raises(ValueError) as err:
        LayerRunner(Gemma2ForCausalLM(cfg).eval(), max_length=MAX_LENGTH)
    msg = str(err.value)
    for part in ("Gemma2ForCausalLM (model type 'gemma2')",
                 "supported: llama, mistral, qwen2, qwen3", "(1 + w) RMSNorm",
                 "final-logit softcapping (final_logit_softcapping=30.0)",
                 "attention-logit softcapping (attn_logit_softcapping=50.0)"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match=r"'gemma3_text'.*per-layer-type rotary"):
        check_architecture(Gemma3TextConfig(num_hidden_layers=2), max_length=MAX_LENGTH)


def test_softcapping_and_unknown_model_types_are_refused():
    capped = LlamaConfig(num_hidden_layers=2)
    capped.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"model type 'llama'.*final_logit_softcapping=30.0"):
        check_architecture(capped)
    capped = Qwen3Config(num_hidden_layers=2)
    capped.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match=r"'qwen3'.*attn_logit_softcapping=50.0"):
        check_architecture(capped)
    with pytest.raises(ValueError, match=r"model type 'phi' \(supported: llama, mistral, qwen2"):
        check_architecture(PhiConfig(num_hidden_layers=2))
    check_architecture(LlamaConfig(num_hidden_layers=2))  # nothing to refuse
    check_architecture(Qwen2Config(num_hidden_layers=2))


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_and_holed_masks_are_refused(arch):
    model = tiny_arch(arch, "eager")
    runner = LayerRunner(model, share_prefix=True, max_length=MAX_LENGTH)
    ids, am = left_pad(prompts(3), pad_id=0)
    right = am.flip(-1)
    holed = am.clone()
    holed[0, -3] = 0
    for bad, what in ((right, "left-padded"), (holed, "hole")):
        with pytest.raises(ValueError, match=what):
            runner.states(ids, bad, [1])
        with pytest.raises(ValueError, match=what):
            last_hidden_with_shared_prefix(model.model, ids, bad, len(PREFIX))
        for share in (False, True):
            with pytest.raises(ValueError, match=what):
                last_position_logits(model, ids, bad, share_prefix=share)


def test_a_dynamic_rope_scales_prefix_and_rows_alike():
    # Prompts run past max_position_embeddings, so the dynamic rope rescales by the batch's
    # largest position; with the prefix shared it must rescale the prefix's positions too.
    model = tiny_arch("qwen2", max_position_embeddings=24,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                       "rope_theta": 10000.0})
    ids, am = left_pad(prompts(), pad_id=0)
    runner = LayerRunner(model, share_prefix=True, max_length=MAX_LENGTH)
    got = {}

    def visit(layer, h, rows):
        got[layer] = runner.answer_logits(h, torch.arange(VOCAB))

    with torch.no_grad():
        assert runner.run(ids, am, [4], visit).prefix == len(PREFIX)
    ref = hf_last_logits(model, ids, am)
    assert torch.allclose(got[4], ref, atol=1e-5), (got[4] - ref).abs().max()
