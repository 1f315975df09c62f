"""Recorded exit-layer states are written per rank and merged by sample id; no rank holds, or
sends to the collective, another rank's states.

The two-process test runs this file as a script (``python tests/llm/test_states_ddp.py OUT 2``):
``Trainer(strategy="ddp", devices=2)`` on the CPU (gloo) re-runs it for rank 1 through
Lightning's launcher, as ``gcnee fit ... trainer.strategy=ddp`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gcnee.llm.states import (
    INDEX,
    LEGACY,
    STATES,
    RecordedStates,
    ShardWriter,
    merge_shards,
    shard_index,
)

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [1, 2, 4]
WORDS = "the user rated a good movie with 4 stars and a bad book with 1 star . will it ?".split()


# ---- the format ---------------------------------------------------------------------------

def test_shards_merge_in_sample_id_order_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(100, 137))  # 37 ids, in no order
    states = {int(s): rng.normal(size=(3, 8)).astype(np.float32) for s in ids}
    shards = tmp_path / "shards"
    for rank in range(3):
        w = ShardWriter(shards, "val", rank)
        mine = ids[rank::3]
        for a in range(0, len(mine), 5):  # batches of 5
            w.add(mine[a:a + 5], np.stack([states[int(s)] for s in mine[a:a + 5]]))
        w.close()
    merge_shards(shards, "val", LAYERS, tmp_path, world=3, chunk_rows=2)
    got = RecordedStates.open(tmp_path, "val")
    assert got.version == 2 and got.layers == LAYERS
    assert got.sample_ids.tolist() == sorted(int(s) for s in ids)
    arr = np.load(tmp_path / STATES.format(split="val"))
    for row, sid in enumerate(got.sample_ids):
        assert np.array_equal(arr[row], states[int(sid)])
    pick = [120, 101, 136]
    rows = got.rows(pick, [4, 1])
    assert rows.dtype == torch.float32 and rows.shape == (3, 2, 8)
    for k, sid in enumerate(pick):
        assert torch.equal(rows[k], torch.from_numpy(states[sid][[2, 0]]))
    assert got.rows([120, 999], [1]) is None  # not recorded: the caller runs the backbone
    assert got.rows([120], [3]) is None and not got.covers([1, 3])


def test_merge_needs_every_ranks_shard_and_ids_once(tmp_path):
    w = ShardWriter(tmp_path / "s", "test", 0)
    w.add([1, 2], np.zeros((2, 3, 4), np.float32))
    w.close()
    with pytest.raises(RuntimeError, match="no complete shard"):
        merge_shards(tmp_path / "s", "test", LAYERS, tmp_path, world=2)
    w = ShardWriter(tmp_path / "s", "test", 1)
    w.add([2], np.zeros((1, 3, 4), np.float32))
    w.close()
    with pytest.raises(RuntimeError, match="recorded twice"):
        merge_shards(tmp_path / "s", "test", LAYERS, tmp_path, world=2)
    # A shard whose loop was cut short (no index) is not complete: a new writer drops the index.
    ShardWriter(tmp_path / "s", "test", 1)
    assert not shard_index(tmp_path / "s", "test", 1).is_file()


def test_runs_recorded_before_the_sharded_format_are_still_read(tmp_path):
    states = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    torch.save({"sample_ids": [7, 9], "layers": LAYERS, "states": states},
               tmp_path / LEGACY.format(split="val"))
    got = RecordedStates.open(tmp_path, "val")
    assert got.version == 1 and got.sample_ids.tolist() == [7, 9]
    assert torch.equal(got.rows([9], [2, 4]), states[[1]][:, [1, 2]])
    assert RecordedStates.open(tmp_path, "test") is None


# ---- the module: what is recorded and what is gathered -------------------------------------

def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 20)))) for _ in range(n)]


SAMPLE_IDS = [int(x) for x in np.random.default_rng(2).permutation(np.arange(500, 511))]


def _module_and_data():
    import lightning as L
    from omegaconf import OmegaConf

    from gcnee.config import LLMConfig
    from gcnee.llm.datamodule import EvalShardSampler, collate_left
    from gcnee.llm.module import CTRLLMModule

    from tiny import make_tiny_llama, make_tiny_tokenizer

    class Data(L.LightningDataModule):
        """The test loader sharded over ranks as CTRDataModule does (no padding)."""

        def __init__(self, items):
            super().__init__()
            self.items = items

        def test_dataloader(self):
            world, rank = self.trainer.world_size, self.trainer.global_rank
            order = sorted(range(len(self.items)), key=lambda i: -len(self.items[i]["input_ids"]))
            return torch.utils.data.DataLoader(
                self.items, batch_size=2, sampler=EvalShardSampler(order, world, rank),
                collate_fn=lambda b: collate_left(b, tok.pad_token_id))

    tok = make_tiny_tokenizer()
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    cfg = OmegaConf.structured(LLMConfig)
    OmegaConf.update(cfg, "lora.r", 4)
    module = CTRLLMModule(make_tiny_llama(len(tok), seed=3), yes, no, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a tuned adapter, the same on every rank
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    items = [{"input_ids": tok(t)["input_ids"], "label": i % 2, "sample_id": sid}
             for i, (t, sid) in enumerate(zip(_texts(len(SAMPLE_IDS)), SAMPLE_IDS))]
    module.record_layers = list(LAYERS)
    return module, Data(items)


def record(out: Path, devices: int) -> None:
    """Score the test items on ``devices`` CPU processes, recording states into ``out``; every
    rank writes what it passed to the collective (``gather.rank<r>.json``), rank 0 merges."""
    import lightning as L

    import gcnee.llm.module as llm_module
    from gcnee.llm.stage import save_hidden

    module, data = _module_and_data()
    module.record_dir = out / "shards"
    sent: list = []
    real = llm_module.all_gather_objects

    def spy(obj):
        sent.append(obj)
        return real(obj)

    llm_module.all_gather_objects = spy
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.test(module, datamodule=data, verbose=False)
    llm_module.all_gather_objects = real
    described = [[[{"dtype": str(a.dtype), "shape": list(a.shape)} for a in part]
                  for part in obj] for obj in sent]
    (out / f"gather.rank{trainer.global_rank}.json").write_text(json.dumps(described))
    if trainer.is_global_zero:
        save_hidden(out, "test", module.record_dir, module.record_layers, trainer.world_size)
        res = module.results["test"]
        assert "hidden" not in res  # states went to disk, not into the gathered results
        (out / "scores.json").write_text(json.dumps({"sample_id": res["sample_id"].tolist(),
                                                     "score": res["score"].tolist()}))


def _check_gathered(out: Path, rank: int, n_rank: int) -> None:
    """What this rank passed to the collective: per batch three 1-D arrays (ids, scores,
    labels) of its own samples; no array of states."""
    (sent,) = json.loads((out / f"gather.rank{rank}.json").read_text())  # one gather, one loop
    assert sent and all(len(part) == 3 for part in sent)
    shapes = [a["shape"] for part in sent for a in part]
    assert all(len(s) == 1 for s in shapes), shapes
    assert sum(part[0]["shape"][0] for part in sent) == n_rank


def test_states_are_recorded_to_disk_and_not_gathered(tmp_path):
    import lightning as L

    record(tmp_path, devices=1)
    _check_gathered(tmp_path, 0, len(SAMPLE_IDS))
    merged = RecordedStates.open(tmp_path, "test")
    assert merged.sample_ids.tolist() == sorted(SAMPLE_IDS)
    assert not (tmp_path / INDEX.format(split="val")).exists()
    # The same loop without record_dir keeps them in memory (one process): equal, bit for bit.
    module, data = _module_and_data()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False
              ).test(module, datamodule=data, verbose=False)
    res = module.results["test"]
    assert res["sample_id"].tolist() == merged.sample_ids.tolist()
    assert torch.equal(merged.rows(res["sample_id"].tolist(), LAYERS),
                       torch.from_numpy(res["hidden"]))


def test_two_cpu_processes_record_the_states_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    record(one, devices=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GCNEE_PIPELINE_START"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, str(two), "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # Each rank wrote only its own samples; together every sample exactly once.
    per_rank = [json.loads(shard_index(two / "shards", "test", r).read_text())["sample_ids"]
                for r in (0, 1)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(SAMPLE_IDS)
    for rank in (0, 1):
        _check_gathered(two, rank, len(per_rank[rank]))
    a, b = RecordedStates.open(one, "test"), RecordedStates.open(two, "test")
    assert a.sample_ids.tolist() == b.sample_ids.tolist() == sorted(SAMPLE_IDS)
    for sid in SAMPLE_IDS:  # other batches, other padding: equal up to float rounding
        assert torch.allclose(a.rows([sid], LAYERS), b.rows([sid], LAYERS), atol=1e-5), sid
    sa, sb = (json.loads((d / "scores.json").read_text()) for d in (one, two))
    assert sa["sample_id"] == sb["sample_id"]
    assert np.allclose(sa["score"], sb["score"], atol=1e-6)


if __name__ == "__main__":
    record(Path(sys.argv[1]), devices=int(sys.argv[2]))
