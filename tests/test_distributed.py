"""DDP on CPU: `gcnee fit` with two processes evaluates every sample once and matches one process.

The DDP run uses Lightning's own launcher (rank 0 re-runs the command for rank 1), exactly as a
user's `gcnee fit ... trainer.strategy=ddp trainer.devices=2` does. With the per-rank batch size
halved and LoRA dropout off, each optimizer step sees the same 8 samples as the single process
(``DistributedSampler`` hands rank r the permutation's items r, r+2, ...), so even the tuned AUC
must agree up to floating-point noise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gcnee.cli import main
from gcnee.distributed import global_rank, is_global_zero, single_process_env, world_size
from gcnee.stages import MARKER, read_json

from tiny import make_tiny_llama, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_ranks_from_launcher_environments(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
              "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert (global_rank(), world_size(), is_global_zero()) == (0, 1, True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher, one node
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (global_rank(), world_size(), is_global_zero()) == (1, 2, False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # node 1's first process is not rank 0
    assert not is_global_zero()
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert global_rank() == 3
    monkeypatch.setenv("RANK", "0")  # torchrun's RANK wins
    assert is_global_zero()
    with single_process_env():
        assert "RANK" not in os.environ and "SLURM_PROCID" not in os.environ
        assert world_size() == 1
    assert os.environ["SLURM_PROCID"] == "3"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok), num_layers=4).save_pretrained(root / "tiny-model")
    tok.save_pretrained(root / "tiny-model")
    return root


def _overrides(root: Path, name: str) -> list[str]:
    return [f"run.checkpoints_dir={root / 'ck'}", f"run.logs_dir={root / 'logs'}",
            f"run.name={name}", f"llm.model={root / 'tiny-model'}", "llm.max_train_samples=16",
            "llm.lora.dropout=0.0", "llm.lr=0.01", "llm.epochs=2", "exits.epochs=1"]


def test_ddp_two_cpu_processes_match_one_process(tiny_dir):
    root = tiny_dir
    stages = "--stages=data,retriever,llm,exits"
    assert main(["fit", "--config", TINY, stages, *_overrides(root, "one"),
                 "llm.batch_size=8", "exits.batch_size=8"]) == 0
    # Same data and similar users for both runs (LightGCN trains on one device either way).
    for stage in ("data", "retriever"):
        shutil.copytree(root / "ck" / "one" / stage, root / "ck" / "two" / stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GCNEE_PIPELINE_START"):
        env.pop(k, None)
    # --verbose: Lightning's own lines (quiet by default) show that two ranks ran
    cmd = [sys.executable, "-m", "gcnee", "fit", "--verbose", "--config", TINY, stages,
           *_overrides(root, "two"), "llm.batch_size=4", "exits.batch_size=4",
           "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout

    one = read_json(root / "ck" / "one" / "llm" / "summary.json")
    two = read_json(root / "ck" / "two" / "llm" / "summary.json")
    for split in ("val", "test"):
        for scorer in ("untuned", "tuned", "item_mean"):
            a, b = one["metrics"][split][scorer], two["metrics"][split][scorer]
            assert b["n"] == a["n"] > 0  # each sample scored once: no sampler padding
            assert b["positives"] == a["positives"]
            assert b["auc"] == pytest.approx(a["auc"], abs=1e-3), (split, scorer)
    assert two["global_step"] == one["global_step"] == 4  # 2 epochs x 16 / (2 ranks x 4)
    # Rank 0 alone wrote the stage files: one marker per stage, from this run.
    assert (root / "ck" / "two" / "exits" / MARKER).is_file()
    ex1 = read_json(root / "ck" / "one" / "exits" / "summary.json")
    ex2 = read_json(root / "ck" / "two" / "exits" / "summary.json")
    full1 = next(r for r in ex1["sweep"] if r["row"] == "full depth")
    full2 = next(r for r in ex2["sweep"] if r["row"] == "full depth")
    assert full2["auc"] == pytest.approx(full1["auc"], abs=1e-3)
