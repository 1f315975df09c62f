"""The benchmarks' arithmetic: ideal speedup from exit layers and head cost, fractions, tables."""

import math
from types import SimpleNamespace

import pytest

from gcnee.bench.early_exit import (
    achieved_fraction,
    decoder_layer_flops,
    head_cost_layers,
    head_flops,
    ideal_speedup,
)
from gcnee.bench.report import fmt, format_machine, format_report, machine_info, markdown_table
from gcnee.bench.train import step_stats
from gcnee.timing import interleaved, median_ratio, rate

SMOL = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, num_hidden_layers=30)


def test_ideal_speedup_without_head_cost_is_layer_ratio():
    # 30 layers; rows leave at 10, 20, 30 -> mean 20 layers
    assert ideal_speedup([10, 20, 30], [2, 4, 6], 30) == pytest.approx(1.5)
    assert ideal_speedup([30, 30], [1, 1], 30, head_cost=0.0) == 1.0


def test_ideal_speedup_counts_head_evaluations():
    # c = 0.5 layer per head evaluation: full = 4 + 0.5; exit at layer 2 after 2 heads = 2 + 1
    assert ideal_speedup([2, 2], [2, 2], 4, head_cost=0.5) == pytest.approx(4.5 / 3.0)
    # full depth itself (N layers, its own head once) is exactly 1 whatever c is
    assert ideal_speedup([4, 4, 4], [1, 1, 1], 4, head_cost=0.3) == pytest.approx(1.0)
    # a row that evaluated every one of 6 heads pays 5 more evaluations than full depth
    assert ideal_speedup([30], [6], 30, head_cost=0.1) == pytest.approx(30.1 / 30.6)


def test_ideal_speedup_rejects_bad_input():
    with pytest.raises(ValueError):
        ideal_speedup([], [], 4)
    with pytest.raises(ValueError):
        ideal_speedup([1, 2], [1], 4)
    with pytest.raises(ValueError):
        ideal_speedup([5], [1], 4)


def test_achieved_fraction():
    assert achieved_fraction(1.8, 2.0) == pytest.approx(0.9)
    assert achieved_fraction(1.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        achieved_fraction(1.0, 0.0)


def test_layer_and_head_flops_from_config_dims():
    t = 300
    h, q, kv, inter = 576, 576, 192, 1536
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * inter + 2 * q * (t + 1) + 8 * h
    assert decoder_layer_flops(SMOL, t) == pytest.approx(t * per_token)
    assert head_flops(576) == 8 * 576
    c = head_cost_layers(SMOL, t)
    assert c == pytest.approx(8 * 576 / (t * per_token))
    assert 1e-7 < c < 1e-5  # a head is ~2e-6 of a layer for SmolLM2 at 300 tokens
    # longer prompts make a layer dearer and a head relatively cheaper
    assert head_cost_layers(SMOL, 600) < c
    # head_dim defaults to hidden / heads and kv heads to heads when the config lacks them
    plain = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    full = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=16)
    assert decoder_layer_flops(plain, 10) == decoder_layer_flops(full, 10)


def test_median_ratio_pairs_repeats_and_rate_uses_median():
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0  # ratios 2, 4, 3
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])
    assert rate(10, [1.0, 5.0, 2.0]) == 5.0


def test_interleaved_runs_variants_in_turn():
    calls = []
    seconds, cpu, results = interleaved({"a": lambda: calls.append("a") or 1,
                                         "b": lambda: calls.append("b") or 2}, repeats=3)
    assert calls == ["a", "b"] * 3
    assert results == {"a": 1, "b": 2}
    assert all(len(v) == 3 for v in seconds.values()) and all(len(v) == 3 for v in cpu.values())
    with pytest.raises(ValueError):
        interleaved({"a": lambda: 0}, repeats=0)


def test_step_stats_skips_warmup():
    s = step_stats([9.0, 2.0, 4.0, 1.0], [(4, 100), (4, 200), (2, 300), (4, 400)], warmup=1)
    assert s["timed_steps"] == 3
    assert s["seconds_per_step"] == 2.0
    assert s["samples_per_second"] == 2.0  # median of 4/2, 2/4, 4/1
    assert s["mean_tokens"] == 300.0
    with pytest.raises(ValueError, match="train_steps"):
        step_stats([1.0], [(4, 10)], warmup=1)


def test_markdown_table_format():
    text = markdown_table(["a", "b|c"], [[1, "x|y"], [None, 2.5]], align="lr")
    assert text.splitlines() == ["| a | b\\|c |", "|---|---:|", "| 1 | x\\|y |", "|  | 2.5 |"]
    with pytest.raises(ValueError):
        markdown_table(["a"], [[1, 2]])
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [], align="l")
    assert fmt(1.234, 2, "×") == "1.23×" and fmt(None) == "-" and fmt(math.nan) == "-"


def test_report_sections_and_machine():
    info = machine_info()
    assert info["torch_threads"] >= 1 and info["versions"]["torch"]
    assert "torch threads" in format_machine(info)
    exit_res = {
        "rows": [{"batch_size": 8, "variant": "full depth", "rps": 4.0, "mean_exit_layer": 30.0,
                  "computed_layers_per_row": 30.0, "ideal_speedup": 1.0, "speedup": 1.0,
                  "achieved_fraction": 1.0, "speedup_cpu": 1.0, "achieved_fraction_cpu": 1.0},
                 {"batch_size": 8, "variant": "exit window(tau=0.1,m=2)", "rps": 6.0,
                  "mean_exit_layer": 18.0, "computed_layers_per_row": 18.0,
                  "ideal_speedup": 1.6667, "speedup": 1.5, "achieved_fraction": 0.9,
                  "speedup_cpu": 1.6, "achieved_fraction_cpu": 0.96}],
        "n_requests": 32, "mean_prompt_tokens": 301.2, "num_layers": 30,
        "exit_layers": [5, 10], "rule": "window", "repeats": 3, "head_cost_layers": 2e-6}
    text = format_report({"machine": info, "exit": exit_res}, command="gcnee bench all")
    lines = text.splitlines()
    assert lines[0] == "# gcnee benchmarks" and "Command: `gcnee bench all`" in lines
    assert ("| 8 | exit window(tau=0.1,m=2) | 6.00 | 18.0 | 18.0 | 1.67× | 1.50× | 0.90 | 1.60× "
            "| 0.96 |") in lines
    assert "## Early exit: RPS, ideal and achieved speedup" in lines
    assert "## Training throughput" not in lines  # only the benches that ran


def test_scoring_paths_share_the_autocast():
    """Every scoring path runs under the bench's autocast (recorded): in float32 all agree to
    1e-5; under bf16 ours read the answer logits in float32 while generate's head rounds them
    to bf16, so they agree only to bf16 rounding."""
    import torch

    from gcnee.bench.scoring import bench_scoring_paths

    from tiny import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=2, seed=4)
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    g = torch.Generator().manual_seed(0)
    requests = [torch.randint(7, 89, (n,), generator=g).tolist() for n in (6, 9, 4)]
    runs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        runs[name] = bench_scoring_paths(model, requests, 2, yes, no, tok.pad_token_id,
                                         repeats=1, autocast=dtype)
    assert runs["fp32"]["autocast"] is None and runs["bf16"]["autocast"] == "bfloat16"
    assert runs["fp32"]["max_abs_diff"] < 1e-5
    assert runs["bf16"]["max_abs_diff"] < 5e-2
