"""The data stage end to end on generated RecBole atomic files: outputs, summary, determinism."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import gcnee.data.stage  # noqa: F401  (registers the data stage)
from gcnee.config import ConfigError, load_config
from gcnee.data import fetch
from gcnee.data.errors import DataError
from gcnee.data.stage import format_summary
from gcnee.data.tables import SPLITS, PreparedData
from gcnee.stages import read_json, run_stage

N_USERS, PER_USER, N_ITEMS = 30, 20, 80


def write_atomic_files(folder: Path, seed: int = 0) -> Path:
    """ml-100k.inter / ml-100k.item in RecBole's atomic format (tab-separated, typed headers)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, N_USERS + 1):
        for i in rng.choice(N_ITEMS, size=PER_USER, replace=False) + 1:
            lines.append(f"{u}\t{i}\t{rng.integers(1, 6)}\t{rng.integers(8 * 10**8, 9 * 10**8)}")
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\tMovie {i}\t1995\tDrama" for i in range(1, N_ITEMS + 1)]
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n")
    return folder


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    return write_atomic_files(tmp_path / "raw")


def make_cfg(tmp_path: Path, data_path: Path, *overrides: str, out: str = "ck"):
    return load_config(None, [
        f"run.checkpoints_dir={tmp_path / out}", f"run.logs_dir={tmp_path / 'logs'}",
        "run.name=t", "data.format=recbole", f"data.path={data_path}", *overrides])


def split_hashes(folder: Path) -> dict[str, str]:
    names = [f"{s}.jsonl" for s in SPLITS] + ["few_shot.json", "graph.npz"]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_stage_outputs_and_summary(tmp_path, raw_dir, capsys):
    cfg = make_cfg(tmp_path, raw_dir, "data.few_shot_count=40")
    summary = run_stage(cfg, "data")
    out = tmp_path / "ck" / "t" / "data"
    assert read_json(out / "summary.json") == summary
    n = N_USERS * PER_USER
    before = summary["before_filtering"]
    assert (before["users"], before["interactions"]) == (N_USERS, n)
    assert before["items"] == summary["after_reading"]["items_rated"] <= N_ITEMS
    assert summary["after_reading"]["interactions"] == n
    # Each user's first 3 interactions are history only (min_history=3, no repeated items).
    assert summary["samples"]["total"] == N_USERS * (PER_USER - 3)
    assert summary["samples"]["interactions_without_enough_history"] == 3 * N_USERS
    total = summary["samples"]["total"]
    sizes = {s: summary["splits"][s]["samples"] for s in SPLITS}
    assert sum(sizes.values()) == total
    assert abs(sizes["val"] - 0.1 * total) <= 1 and abs(sizes["test"] - 0.1 * total) <= 1
    assert summary["history_length"]["min"] == 3 and summary["history_length"]["max"] == 15
    assert summary["few_shot"] == 40
    assert summary["graph"]["interactions"] == n - sizes["val"] - sizes["test"]

    data = PreparedData.load(out)
    assert len(data.interactions) == n
    assert {s: len(data.splits[s]) for s in SPLITS} == sizes
    for s in SPLITS:
        rate = np.mean([x.label for x in data.splits[s]])
        assert summary["splits"][s]["positive_rate"] == pytest.approx(rate, abs=1e-4)
        assert all(x.rating > 3 for x in data.splits[s] if x.label == 1)
    held = {x.sample_id for s in ("val", "test") for x in data.splits[s]}
    graph_keys = set(zip(data.graph.user.tolist(), data.graph.item.tolist()))
    for x in data.splits["test"]:
        assert (x.user, x.item) not in graph_keys
    assert len(data.few_shot()) == 40
    assert {x.sample_id for x in data.few_shot()} <= {x.sample_id for x in data.splits["train"]}
    assert not held & set(data.few_shot_ids)
    printed = capsys.readouterr().out
    assert "before filtering" in printed and "few-shot training samples: 40" in printed


def test_same_seed_same_files_other_seed_differs(tmp_path, raw_dir):
    run_stage(make_cfg(tmp_path, raw_dir, "data.few_shot_fraction=0.1", out="a"), "data")
    run_stage(make_cfg(tmp_path, raw_dir, "data.few_shot_fraction=0.1", out="b"), "data")
    run_stage(make_cfg(tmp_path, raw_dir, "data.few_shot_fraction=0.1", "run.seed=1", out="c"),
              "data")
    a, b, c = (split_hashes(tmp_path / d / "t" / "data") for d in "abc")
    assert a == b
    assert a["test.jsonl"] != c["test.jsonl"] and a["few_shot.json"] != c["few_shot.json"]


def test_rerun_skipped_and_changed_key_reruns(tmp_path, raw_dir, capsys):
    run_stage(make_cfg(tmp_path, raw_dir), "data")
    capsys.readouterr()
    run_stage(make_cfg(tmp_path, raw_dir), "data")
    assert "up to date, skipped" in capsys.readouterr().out
    summary = run_stage(make_cfg(tmp_path, raw_dir, "data.min_history=5"), "data")
    assert "data.min_history: 3 -> 5" in capsys.readouterr().out
    assert summary["samples"]["total"] == N_USERS * (PER_USER - 5)


def test_missing_path_names_data_path(tmp_path):
    with pytest.raises(DataError, match=r"data.path"):
        run_stage(make_cfg(tmp_path, tmp_path / "nowhere"), "data")


def test_empty_after_min_history_names_filter(tmp_path, raw_dir):
    with pytest.raises(DataError, match=r"data.min_history=50"):
        run_stage(make_cfg(tmp_path, raw_dir, "data.min_history=50",
                           "data.max_history=60"), "data")
    assert not (tmp_path / "ck" / "t" / "data" / "_SUCCESS.json").exists()


def test_bad_fetch_name_or_format(tmp_path, raw_dir):
    with pytest.raises(ConfigError, match="data.fetch"):
        run_stage(make_cfg(tmp_path, raw_dir, "data.fetch=ml-20m"), "data")
    with pytest.raises(ConfigError, match="set data.format=recbole"):
        run_stage(make_cfg(tmp_path, raw_dir, "data.fetch=ml-100k",
                           "data.format=movielens-100k"), "data")


def test_fetch_runs_when_configured(tmp_path, raw_dir, monkeypatch):
    """``data.fetch: ml-100k`` fetches into data.path before reading (download replaced)."""
    fetched = []

    def fake_fetch(dest: Path) -> Path:
        fetched.append(dest)
        shutil.copytree(raw_dir, dest, dirs_exist_ok=True)
        return dest

    monkeypatch.setattr(fetch, "fetch_ml100k", fake_fetch)
    dest = tmp_path / "data" / "ml-100k"
    summary = run_stage(make_cfg(tmp_path, dest, "data.fetch=ml-100k"), "data")
    assert fetched == [dest]
    assert summary["before_filtering"]["users"] == N_USERS


def test_format_summary_lists_skipped_lines():
    summary = {
        "format": "recbole", "path": "p",
        "before_filtering": {"users": 3, "items": 4, "interactions": 10},
        "after_reading": {"users": 3, "items": 4, "items_rated": 4, "interactions": 9},
        "items_without_title": 1, "missing_title": "drop",
        "files": [{"path": "p/x.inter", "lines": 11, "bad": 1,
                   "reasons": {"wrong field count": 1}, "first_bad": [7], "excluded": {}}],
        "samples": {"total": 5, "users": 2, "interactions_without_enough_history": 4,
                    "min_history": 3, "max_history": 15, "label": "rating > 3.0"},
        "history_length": {"min": 3, "mean": 3.4, "median": 3.0, "max": 4},
        "split": "random",
        "splits": {s: {"samples": 1, "users": 1, "positive_rate": 0.5} for s in SPLITS},
        "graph": {"interactions": 7, "excluded_val_test_targets": 2,
                  "excluded_repeats_of_held_out_pairs": 0},
        "few_shot": 3,
    }
    text = format_summary(summary)
    assert "p/x.inter: 11 lines, 1 skipped [wrong field count: 1] (first at lines 7)" in text
    assert "items without title: 1" in text
