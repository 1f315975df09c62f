"""`gcnee bench rehearsal`: the synthetic data, the per-rank memory sampler, and the whole
command at ~300 users (its table's structure and that every stage ran; never its timings)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from gcnee.bench.rehearsal import (
    SINGLE_STAGES,
    STAGES,
    format_rehearsal,
    memory_check,
    run_measured,
)
from gcnee.bench.synthetic import (
    META_FILE,
    REVIEWS_FILE,
    SyntheticSpec,
    synthetic_interactions,
    write_amazon_reviews,
)
from gcnee.cli import main
from gcnee.data.readers_amazon import read_amazon


def test_synthetic_interactions_are_unique_heavy_tailed_and_sized():
    spec = SyntheticSpec(users=2_000, items=3_000, interactions=30_000, seed=3)
    users, items = synthetic_interactions(spec)
    keys = users * spec.items + items
    assert len(np.unique(keys)) == len(keys)  # a user reviews an item once
    assert len(keys) == spec.interactions
    per_user = np.bincount(users, minlength=spec.users)
    per_item = np.bincount(items, minlength=spec.items)
    assert per_user.min() >= spec.min_per_user
    assert per_user.max() > 10 * np.median(per_user)  # a few very active users
    assert per_item.max() > 20 * max(np.median(per_item), 1)  # Zipf-like popularity
    with pytest.raises(ValueError, match="do not fit 120 users"):  # > a tenth of 60 items each
        synthetic_interactions(SyntheticSpec(users=120, items=60, interactions=1_000))
    again = synthetic_interactions(spec)
    assert np.array_equal(again[0], users) and np.array_equal(again[1], items)  # seeded


def test_synthetic_files_read_back_with_the_amazon_reader(tmp_path):
    spec = SyntheticSpec(users=120, items=300, interactions=1_000)
    info = write_amazon_reviews(tmp_path, spec)
    raw = read_amazon(tmp_path / REVIEWS_FILE, tmp_path / META_FILE)
    inter = raw.interactions
    assert len(inter) == info["interactions"]
    assert len(np.unique(inter.user)) == info["users"] == 120
    assert len(np.unique(inter.item)) == info["items"]
    assert raw.items_without_title == 0
    assert set(np.unique(inter.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.4 < float((inter.rating > 3).mean()) < 0.9  # skewed to 5 stars, both labels
    assert all(raw.items.titles[i] for i in np.unique(inter.item))


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_measured_names_each_rank_and_its_peak():
    # rank 0 holds ~40 MB more than the interpreter, the process it starts as rank 1 ~300 MB
    child = "x = bytearray(300_000_000); import time; time.sleep(0.8)"
    code = ("import os, subprocess, sys; y = bytearray(40_000_000); "
            f"subprocess.run([sys.executable, '-c', {child!r}], "
            "env={**os.environ, 'LOCAL_RANK': '1'}, check=True)")
    res = run_measured(_py(code), deadline=time.monotonic() + 120)
    assert res["returncode"] == 0 and not res["killed"]
    ranks = res["rank_peak_mib"]
    assert set(ranks) == {"0", "1"}
    assert ranks["1"] > 280 and 40 < ranks["0"] < 200, ranks


def test_run_measured_kills_the_group_at_the_deadline():
    start = time.monotonic()
    res = run_measured(_py("import time; time.sleep(60)"), deadline=start + 1.0)
    assert res["killed"] and res["returncode"] != 0
    assert time.monotonic() - start < 20


def _row(run, stage, peaks):
    return {"run": run, "stage": stage, "status": "ok", "rank_peak_mib": peaks}


def test_memory_check_compares_the_largest_rank_with_one_process():
    rows = [_row("2 processes", "llm", {"0": 500.0, "1": 520.0}),
            _row("2 processes", "exits", {"0": 700.0, "1": 690.0}),
            _row("1 process", "llm", {"0": 510.0}), _row("1 process", "exits", {"0": 600.0})]
    check = {c["stage"]: c for c in memory_check(rows, "2 processes", "1 process")}
    assert check["llm"]["ratio"] == pytest.approx(520 / 510, abs=1e-3)
    assert not check["llm"]["grows"]
    assert check["exits"]["ratio"] == pytest.approx(700 / 600, abs=1e-3)
    assert check["exits"]["grows"]  # 1.17 > 1.10


def test_rehearsal_small_runs_every_stage_and_writes_the_tables(tmp_path):
    argv = ["bench", "rehearsal", "--small", "--budget-s", "900",
            f"run.checkpoints_dir={tmp_path / 'ck'}", f"run.logs_dir={tmp_path / 'logs'}"]
    assert main(argv) == 0
    out = tmp_path / "logs" / "rehearsal" / "bench"
    result = json.loads((out / "rehearsal.json").read_text())
    many = [r for r in result["stages"] if r["run"] == "2 processes"]
    one = [r for r in result["stages"] if r["run"] == "1 process"]
    assert [r["stage"] for r in many] == list(STAGES)
    assert [r["stage"] for r in one] == list(SINGLE_STAGES)
    for row in many + one:
        assert row["status"] == "ok" and row["returncode"] == 0, row
        assert row["seconds"] > 0 and row["stage_seconds"] is not None
        assert all(m > 50 for m in row["rank_peak_mib"].values())  # torch alone is more
    ddp = {r["stage"]: r for r in many}
    assert set(ddp["llm"]["rank_peak_mib"]) == set(ddp["exits"]["rank_peak_mib"]) == {"0", "1"}
    assert set(ddp["data"]["rank_peak_mib"]) == {"0"}  # no trainer: one process
    assert all(set(r["rank_peak_mib"]) == {"0"} for r in one)
    assert [c["stage"] for c in result["memory_check"]] == list(SINGLE_STAGES)
    assert all(c["ratio"] > 0 for c in result["memory_check"])

    data, samples = result["inputs"]["data"], result["samples"]
    assert data["users"] == 300 and 2_900 <= data["interactions"] <= 3_000
    assert samples["after_reading"]["interactions"] == data["interactions"]
    # eval.max_samples=null: the llm stage scored every val and test sample
    assert samples["scored"] == {"val": samples["splits"]["val"],
                                 "test": samples["splits"]["test"]}
    assert result["machine"]["cores"] >= 1

    md = (out / "rehearsal.md").read_text()
    assert md == format_rehearsal(result)
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "rank 0 peak MiB" in header and "rank 1 peak MiB" in header
    table_rows = [line for line in md.splitlines() if line.startswith("| 2 processes")
                  or line.startswith("| 1 process")]
    assert len(table_rows) == len(STAGES) + len(SINGLE_STAGES)
    assert "largest rank peak MiB" in md

    # A second run reuses the synthetic inputs (same sizes and vocabulary).
    before = (tmp_path / "ck" / "rehearsal" / "rehearsal-inputs" / "inputs.json").stat().st_mtime
    assert main([*argv, "--no-single", "--budget-s", "1"]) == 1  # budget spent: stages stop
    after = (tmp_path / "ck" / "rehearsal" / "rehearsal-inputs" / "inputs.json").stat().st_mtime
    assert before == after
    second = json.loads((out / "rehearsal.json").read_text())
    assert second["stages"][0]["status"] != "ok"
