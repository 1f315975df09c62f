"""``gcnee plan``: bytes per stage from config.json, checked against hand computations, real
parameter counts of models built from configs, and autograd's saved tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcnee.cli import main
from gcnee.config import ConfigError, load_config
from gcnee.plan import (
    GiB,
    Shapes,
    find_model_config,
    layer_train_activations,
    parse_memory,
    plan_from_config,
    plan_memory,
    shipped_config_path,
)

from tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VIDEOGAMES = str(ROOT / "configs" / "videogames.yaml")

# Vicuna-7B v1.5 (Llama-2-7B shape), by hand.
V, H, INTER, N = 32000, 4096, 11008, 32
LINEAR_PER_LAYER = 4 * H * H + 3 * H * INTER  # q, k, v, o + gate, up, down
NORMS_PER_LAYER = 2 * H
EMBED_HEAD_NORM = V * H + V * H + H  # untied: embeddings, lm_head, final norm
VICUNA_PARAMS = N * (LINEAR_PER_LAYER + NORMS_PER_LAYER) + EMBED_HEAD_NORM  # 6,738,415,616


def _rows(plan):
    return {r.stage: r for r in plan.rows}


def _plan(overrides=(), **kw):
    cfg = load_config(VIDEOGAMES, list(overrides))
    return plan_from_config(cfg, gpu_memory=kw.pop("gpu_memory", "80GB"), **kw)


def test_vicuna_against_hand_computation():
    assert VICUNA_PARAMS == 6_738_415_616
    plan = _plan()
    assert plan.params == VICUNA_PARAMS
    rows = _rows(plan)
    bf16_weights = 2 * VICUNA_PARAMS  # 13.5 GB: bf16-mixed loads frozen weights in bf16 on CUDA
    assert rows["llm train"].gpu_weights == pytest.approx(bf16_weights, rel=0.10)
    # LoRA r=8 on q_proj, v_proj: r * (in + out) per projection per layer; fp32 + grad + AdamW.
    lora = N * 2 * 8 * (H + H)
    assert plan.settings["lora"]["params"] == lora == 4_194_304
    assert rows["llm train"].gpu_trainable == pytest.approx(16 * lora, rel=0.10)
    # Activations at batch 8 x 1024 tokens, bf16: per layer and token (14.5 + 6*2)*H + 3*2*INTER.
    b, t, s = 8, 1024, 2
    per_layer = b * t * ((14.5 + 6 * s) * H + 3 * s * INTER)
    head = 4 * V * H + 8 * b * V  # vocab loss: fp32 copy of the head kept for backward, logits
    common = per_layer + 8 * b * t * H + head
    assert rows["llm train"].act_no_ckpt == pytest.approx(N * per_layer + common, rel=0.10)
    assert rows["llm train"].act_ckpt == pytest.approx(N * b * t * H * s + per_layer + common,
                                                       rel=0.10)
    total = bf16_weights + 16 * lora + N * per_layer + common + GiB  # no checkpointing + CUDA
    assert rows["llm train"].gpu_total == pytest.approx(total, rel=0.10)
    assert rows["llm train"].fits == "yes"  # 58 GiB on 80 GiB
    # Exit heads "full" at 6 layers < 32: a norm + the V x H head each, trained in fp32.
    heads = 6 * (V * H + H)
    assert rows["exits train"].gpu_trainable == pytest.approx(16 * heads, rel=0.10)
    assert rows["exits sweep"].gpu_heads == pytest.approx(4 * heads, rel=0.10)


def test_forty_gigabytes_do_not_hold_the_paper_setting_without_checkpointing():
    rows = _rows(_plan(gpu_memory="40GB"))
    assert rows["llm train"].fits == "no"
    assert rows["llm train"].act_ckpt < rows["llm train"].act_no_ckpt / 5
    assert rows["exits train"].fits == "yes"


def test_nf4_is_smaller_than_bf16_by_the_expected_ratio():
    bf16 = _rows(_plan())["llm train"].gpu_weights
    nf4_row = _rows(_plan(["llm.quantization=nf4"]))["llm train"]
    lin = N * LINEAR_PER_LAYER
    rest = VICUNA_PARAMS - lin  # embeddings, head, norms: fp32 after peft's k-bit preparation
    expected = (lin * 4.5 / 8 + rest * 4) / (2 * VICUNA_PARAMS)  # about 0.35
    assert 0.3 < expected < 0.4
    assert nf4_row.gpu_weights / bf16 == pytest.approx(expected, rel=0.10)
    assert nf4_row.uses_ckpt  # QLoRA turns gradient checkpointing on
    int8 = _rows(_plan(["llm.quantization=int8"]))["llm train"].gpu_weights
    assert nf4_row.gpu_weights < int8 < bf16


def test_fp32_doubles_the_weights_and_binary_loss_drops_the_head_copy():
    bf16 = _rows(_plan())["llm train"]
    fp32 = _rows(_plan(["trainer.precision=32-true"]))["llm train"]
    assert fp32.gpu_weights == 2 * bf16.gpu_weights
    binary = _rows(_plan(["llm.loss=binary"]))["llm train"]
    assert bf16.act_no_ckpt - binary.act_no_ckpt == pytest.approx(4 * V * H + 8 * 8 * V,
                                                                  rel=0.01)


def test_quantized_true_precision_is_refused():
    with pytest.raises(ConfigError, match="bf16-mixed"):
        _plan(["llm.quantization=nf4", "trainer.precision=bf16-true"])


def test_qwen_fixture_counts_published_parameters():
    c = json.loads(shipped_config_path("Qwen/Qwen2.5-7B").read_text())
    sh = Shapes.from_config(c)
    assert (sh.hidden, sh.layers, sh.kv_heads, sh.vocab, sh.tied) == (3584, 28, 4, 152064, False)
    assert sh.total_params() == 7_615_616_512  # the count Qwen publishes ("7.61B")
    inst = json.loads(shipped_config_path("Qwen/Qwen2.5-7B-Instruct").read_text())
    assert Shapes.from_config(inst).total_params() == sh.total_params()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_local_config_folder_counts_the_built_model(tmp_path, kind):
    if kind == "llama":
        model = make_tiny_llama(100, num_layers=2)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=120, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    folder = tmp_path / "model"
    model.config.save_pretrained(folder)  # config.json only, no weights
    cfg = load_config(VIDEOGAMES, [f"llm.model={folder}", "exits.layers=[1,2]",
                                   f"run.checkpoints_dir={tmp_path}"])
    plan = plan_from_config(cfg, gpu_memory="1GB", samples="train=100,val=40,test=60")
    assert plan.config_source == str(folder / "config.json")
    assert plan.params == sum(p.numel() for p in model.parameters())
    rows = _rows(plan)
    assert rows["llm train"].gpu_weights == 2 * plan.params
    lora = sum(p.numel() for n, p in _lora(model).named_parameters() if "lora_" in n)
    assert plan.settings["lora"]["params"] == lora
    # 40 validation (capped by nothing: eval.max_samples is null) + 60 test, 2 layers, fp32.
    hidden = model.config.hidden_size
    assert rows["llm eval + record"].disk == 2 * (40 + 60) * 2 * hidden * 4


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                            target_modules=["q_proj", "v_proj"]))


def test_samples_from_the_data_stage_summary(tmp_path):
    data = tmp_path / "vg" / "data"
    data.mkdir(parents=True)
    (data / "summary.json").write_text(json.dumps({
        "splits": {"train": {"samples": 300_000}, "val": {"samples": 40_000},
                   "test": {"samples": 41_000}}, "few_shot": 24_000}))
    cfg = load_config(VIDEOGAMES, [f"run.checkpoints_dir={tmp_path}", "run.name=vg",
                                   "eval.max_samples=30000", "exits.epochs=2"])
    plan = plan_from_config(cfg, gpu_memory="80GB")
    assert plan.samples == {"llm_train": 24_000, "val": 30_000, "test": 30_000,
                            "exit_train": 24_000, "exit_val": 30_000}
    rows = _rows(plan)
    assert rows["llm eval + record"].disk == 2 * 60_000 * 6 * H * 4  # shards + merged file
    assert rows["exits train"].host == 24_000 * 6 * H * 4  # two epochs: states cached


def test_activation_formula_matches_autograd_saved_tensors():
    """What a LoRA training step of a small Llama keeps for backward (bf16 autocast, sdpa),
    counted with saved-tensor hooks, against the per-layer formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hid, inter, layers, b, t = 128, 344, 2, 2, 64
    cfg = LlamaConfig(vocab_size=64, hidden_size=hid, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = _lora(LlamaForCausalLM(cfg).to(torch.bfloat16))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return x

    ids = torch.randint(0, 64, (b, t))
    decoder = model.get_base_model().model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            decoder(input_ids=ids).last_hidden_state[:, -1].sum()
    sh = Shapes.from_config(cfg.to_dict())
    expected = layers * layer_train_activations(sh, b, t, 2, eager=False)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.25)


def test_unknown_model_says_where_to_put_a_config(tmp_path):
    cfg = load_config(VIDEOGAMES, ["llm.model=nobody/no-such-model",
                                   f"run.checkpoints_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="config.json") as err:
        find_model_config(cfg)
    assert "llm.model=<that folder>" in str(err.value) and "--model-config" in str(err.value)


def test_default_model_not_fetched_says_how_to_fetch(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "ml100k.yaml"), [f"run.checkpoints_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="gcnee model fetch smollm2-135m-instruct"):
        find_model_config(cfg)
    folder = tmp_path / "base" / "smollm2-135m-instruct"
    make_tiny_llama(100, num_layers=2).config.save_pretrained(folder)
    assert find_model_config(cfg)[1] == str(folder / "config.json")


def test_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", VIDEOGAMES, "--gpu-memory", "40GB", "--json", str(out),
                 f"run.checkpoints_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "| stage | GPU weights |" in text and "| llm train | 12.6 |" in text
    assert "vicuna-7b-v1.5" in text and "40 GiB" in text
    blob = json.loads(out.read_text())
    assert blob["params"] == VICUNA_PARAMS and len(blob["rows"]) == 5
    assert main(["plan", "--config", VIDEOGAMES, "llm.model=nobody/no-such-model",
                 f"run.checkpoints_dir={tmp_path}"]) == 2
    assert "put the model's config.json in a folder" in capsys.readouterr().err.lower()


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GiB
    assert parse_memory("40960MB") == 40 * GiB
    with pytest.raises(ConfigError):
        parse_memory("lots")


def test_paper_configs_plan(tmp_path):
    for name in ("videogames", "beauty", "bookcrossing"):
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"),
                          [f"run.checkpoints_dir={tmp_path}"])
        plan = plan_memory(cfg, json.loads(shipped_config_path("lmsys/vicuna-7b-v1.5")
                                           .read_text()), gpu_memory=80 * GiB)
        assert [r.stage for r in plan.rows] == ["llm train", "llm eval + record", "llm export",
                                                "exits train", "exits sweep"]
