"""The prepared GPU check runs on the CPU with --tiny: every part that does not need CUDA runs
and gives sane numbers, CUDA parts say so, a failing part does not stop the others."""

from __future__ import annotations

import json
import os

import pytest

from gcnee.bench import gpu

CPU_PARTS = ["load", "lora_bf16", "runner_vs_hf", "early_exit_rps", "lora_nf4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, gpu.run_gpu_check(out, tiny=True, budget_s=300, parts=CPU_PARTS)


def test_tiny_check_runs_every_cpu_part(tiny_run):
    out, res = tiny_run
    parts = res["parts"]
    assert parts["lora_nf4"]["status"] == "skipped: no CUDA"
    for name in ("load", "lora_bf16", "runner_vs_hf", "early_exit_rps"):
        assert parts[name]["status"] == "ok", parts[name]
    # fp32 on the CPU: the loaded weights are exactly what `gcnee plan` says.
    assert parts["load"]["weights_vs_plan"] == 1.0
    # 2 layers x (q 64x64, k/v 64x32, o 64x64, MLP 3x64x128, norms) + untied 128x64 embeddings
    assert parts["load"]["params"] == 2 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 128) + 2 * 8192 + 64
    lora = parts["lora_bf16"]  # r=8 on q (64 -> 64) and v (64 -> 32) in 2 layers
    assert lora["grad_norm"] > 0 and lora["trainable_params"] == 2 * 8 * (64 + 64 + 64 + 32)
    r = parts["runner_vs_hf"]
    assert r["within_tolerance"] and r["plain"]["max_abs_dlogit"] < 1e-4
    assert r["shared_prefix"]["prefix"] >= 16  # the shared prefix really ran once
    rows = parts["early_exit_rps"]["rows"]
    assert {row["batch_size"] for row in rows} == {1, 8, 32}
    compacted = {row["batch_size"]: row for row in rows if row["variant"].startswith("exit")
                 and row["compact"] and "prefix" not in row["variant"]}
    for bs in (8, 32):
        plain = next(row for row in rows if row["batch_size"] == bs
                     and row["variant"].endswith("no compaction"))
        assert plain["max_abs_diff_vs_compact"] < 1e-5  # same scores either way
    # Planted exits: some rows leave at the first head, the rest at the model's own.
    assert all(1.0 < row["mean_exit_layer"] < 2.0 for row in compacted.values())
    blob = json.loads((out / "gpu_check.json").read_text())
    assert blob["machine"]["cuda_available"] in (True, False) and "bitsandbytes" in blob["machine"]
    md = (out / "gpu_check.md").read_text()
    assert "| lora_nf4 | skipped: no CUDA |" in md and "planted exits" in md


def test_a_failing_part_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def boom(check):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(gpu.PART_FNS, "lora_bf16", boom)
    res = gpu.run_gpu_check(tmp_path, tiny=True, budget_s=120,
                            parts=["load", "lora_bf16", "runner_vs_hf"])
    assert res["parts"]["lora_bf16"]["status"] == "error"
    assert "planted failure" in res["parts"]["lora_bf16"]["error"]
    assert res["parts"]["runner_vs_hf"]["status"] == "ok"


def test_time_budget_skips_parts(tmp_path):
    res = gpu.run_gpu_check(tmp_path, tiny=True, budget_s=0, parts=["load", "runner_vs_hf"])
    assert res["parts"]["load"]["status"].startswith("skipped: time budget")
    assert res["parts"]["runner_vs_hf"]["status"].startswith("skipped: no model")
    with pytest.raises(ValueError, match="unknown parts"):
        gpu.run_gpu_check(tmp_path, tiny=True, parts=["nope"])


def test_ddp_worker_step_on_gloo(tmp_path, monkeypatch):
    """The worker part_ddp spawns, run in this process (world size 1, gloo on the CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                 "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setitem(os.environ, k, v)
    out = tmp_path / "ddp.json"
    gpu.ddp_worker(str(out), tiny=True)
    res = json.loads(out.read_text())
    assert res["backend"] == "gloo" and res["world_size"] == 1 and res["all_reduce_sum"] == 1.0
    assert res["loss"] > 0


def test_cli_bench_gpu(tmp_path, capsys):
    from gcnee.cli import main

    assert main(["bench", "gpu", "--tiny", "--out", str(tmp_path), "--parts",
                 "load,runner_vs_hf,lora_nf4"]) == 0
    assert "| runner_vs_hf | ok |" in capsys.readouterr().out
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["load", "runner_vs_hf", "lora_nf4"]
