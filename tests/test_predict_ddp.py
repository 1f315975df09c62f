"""`gcnee predict ... trainer.strategy=ddp trainer.devices=2` on the CPU: two processes (gloo,
started by Lightning's launcher as `gcnee fit` does) write the same output as one process, in
input order, bad lines' error records included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fitted_run import ROOT, TINY, fitted_run

from gcnee.cli import main
from gcnee.data.tables import load_samples
from gcnee.distributed import merge_rank_parts, rank_part


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fitted_run(tmp_path_factory)


def test_rank_parts_merge_in_line_order(tmp_path):
    out = tmp_path / "out.jsonl"
    parts = [rank_part(out, r) for r in range(3)]
    assert parts[1].name == ".out.jsonl.rank1.part" and parts[1].parent == tmp_path
    for r, p in enumerate(parts):  # line k to rank k % 3; rank 2 has the last, long one
        p.write_text("".join(f"{n}\t{{\"line\": {n}}}\n" for n in range(1 + r, 12, 3)))
    with open(out, "w") as f:
        assert merge_rank_parts(parts, f) == 11
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == list(range(1, 12))


def _requests(fitted) -> list[str]:
    samples = load_samples(fitted.run / "data" / "test.jsonl")
    lines = []
    for k in range(9):
        s = samples[k % len(samples)]
        hist = [[i, r] for i, r in zip(s.history_items, s.history_ratings)]
        lines.append(json.dumps({"id": k, "user": s.user, "item": s.item,
                                 **({"history": hist} if k % 2 else {})}))
    lines[2] = '{"user": "1", "item": '  # malformed JSON
    lines[5] = json.dumps({"id": "bad", "user": samples[0].user, "item": "no-such-item"})
    lines.insert(7, "")  # blank: skipped, not dealt to a rank
    return lines


def test_two_processes_write_the_one_process_output(fitted, tmp_path):
    src = tmp_path / "requests.jsonl"
    src.write_text("\n".join(_requests(fitted)) + "\n")
    one, two = tmp_path / "one.jsonl", tmp_path / "out" / "two.jsonl"
    serve = ["eval.batch_size=2"]
    assert main(["predict", "--config", TINY, *fitted.overrides, *serve, "--input", str(src),
                 "--output", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GCNEE_PIPELINE_START"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "gcnee", "predict", "--verbose", "--config", TINY,
           *fitted.overrides, *serve, "--input", str(src), "--output", str(two),
           "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two processes ran
    assert "on 2 processes" in log
    assert not list(two.parent.glob(".*.part"))  # the ranks' parts were merged and removed

    a = [json.loads(x) for x in one.read_text().splitlines()]
    b = [json.loads(x) for x in two.read_text().splitlines()]
    assert [r["line"] for r in b] == [r["line"] for r in a] == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert sum("error" in r for r in b) == 2 and b[2]["error"].startswith("malformed JSON")
    assert sum("score" in r for r in a) == 7
    assert b[5] == {"line": 6, "id": "bad", "user": a[5]["user"], "item": "no-such-item",
                    "error": "unknown item 'no-such-item'"}
    for ra, rb in zip(a, b):
        assert {k: v for k, v in rb.items() if k not in ("score", "latency_ms")} == \
            {k: v for k, v in ra.items() if k not in ("score", "latency_ms")}
        if "score" in ra:
            assert rb["score"] == pytest.approx(ra["score"], abs=1e-6), ra["line"]


PLANTED = """import os, sys
from gcnee import predict

score = predict.Predictor.score_ids


def fail_on_rank_1(self, requests):
    if os.environ.get("LOCAL_RANK") == "1":
        raise MemoryError("planted failure on rank 1")
    return score(self, requests)


predict.Predictor.score_ids = fail_on_rank_1
from gcnee.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_stops_every_rank_by_name(fitted, tmp_path):
    """A rank whose scoring raises still joins the gather, so rank 0 stops (naming it) instead
    of waiting for it; no output and no part files are left."""
    src, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(_requests(fitted)) + "\n")
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GCNEE_PIPELINE_START"):
        env.pop(k, None)
    cmd = [sys.executable, str(script), "predict", "--config", TINY, *fitted.overrides,
           "--input", str(src), "--output", str(out), "trainer.accelerator=cpu",
           "trainer.strategy=ddp", "trainer.devices=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert "gcnee predict failed on rank 1: MemoryError: planted failure on rank 1" in \
        proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".*.part"))
