"""gcnee.llm.load_plan: one table from settings to dtype, device map, quantization, autocast."""

import pytest
import torch

from gcnee.config import ConfigError
from gcnee.llm.load_plan import autocast_of, load_plan

from tiny import make_tiny_llama

CPU, GPU1 = torch.device("cpu"), torch.device("cuda", 1)


@pytest.mark.parametrize("precision, cpu, cuda, autocast", [
    ("32-true", torch.float32, torch.float32, None),
    (32, torch.float32, torch.float32, None),
    ("bf16-mixed", torch.float32, torch.bfloat16, torch.bfloat16),
    ("bf16-true", torch.bfloat16, torch.bfloat16, None),
    ("16-mixed", torch.float32, torch.float16, torch.float16),
    ("16-true", torch.float16, torch.float16, None),
])
def test_weights_and_autocast_per_precision_and_device(precision, cpu, cuda, autocast):
    on_cpu, on_gpu = load_plan(precision, device=CPU), load_plan(precision, device=GPU1)
    # CPU keeps the measured default (float32 weights under autocast); CUDA loads frozen and
    # merged models in the compute dtype, straight onto the rank's device
    assert (on_cpu.dtype, on_gpu.dtype) == (cpu, cuda)
    assert on_cpu.autocast is on_gpu.autocast is autocast_of(precision) is autocast
    assert on_cpu.device_map is None and on_gpu.device_map == {"": 1}
    assert on_gpu.from_pretrained_kwargs() == {"dtype": cuda, "device_map": {"": 1}}


def test_cuda_device_is_the_local_rank(monkeypatch):
    import gcnee.training as training

    monkeypatch.setattr(training, "uses_cuda", lambda accelerator: accelerator != "cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert load_plan("bf16-mixed", accelerator="gpu").device == torch.device("cuda", 3)
    assert load_plan("bf16-mixed", accelerator="cpu").device == CPU


@pytest.mark.parametrize("precision, compute", [("bf16-mixed", torch.bfloat16),
                                                ("16-mixed", torch.float16),
                                                ("32-true", torch.float32)])
def test_nf4_computes_in_the_trainers_dtype(precision, compute):
    pytest.importorskip("bitsandbytes")
    plan = load_plan(precision, "nf4", device=GPU1)
    q = plan.quantization_config()
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == compute
    assert plan.from_pretrained_kwargs()["quantization_config"] is not None
    assert load_plan(precision, "int8", device=CPU).quantization_config().load_in_8bit


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_quantized_with_true_half_precision_is_refused_by_key(precision):
    with pytest.raises(ConfigError, match=rf"llm.quantization=nf4 with trainer.precision="
                                          rf"{precision}.*-mixed"):
        load_plan(precision, "nf4")


def test_unknown_settings_name_their_key():
    with pytest.raises(ConfigError, match="trainer.precision"):
        load_plan("bf8-mixed")
    with pytest.raises(ConfigError, match="llm.quantization"):
        load_plan("32-true", "fp4")


def test_place_moves_plain_models_and_refuses_to_move_quantized_ones():
    model = make_tiny_llama(16, num_layers=1)
    plan = load_plan("32-true", device=CPU)
    assert plan.place(model) is model  # already there: untouched
    meta = load_plan("32-true", device="meta")
    assert next(meta.place(make_tiny_llama(16, num_layers=1)).parameters()).is_meta
    quantized = load_plan("bf16-mixed", "int8", device="meta")
    with pytest.raises(RuntimeError, match="int8 model cannot be moved from cpu to meta"):
        quantized.place(model)
