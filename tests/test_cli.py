"""The ``gcnee`` command line: exit codes and messages (0 ok, 1 data/stage error, 2 config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gcnee.cli import main
from gcnee.stages import read_json

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/tiny.yaml points at tests/fixtures/recbole (relative)
    return [f"run.checkpoints_dir={tmp_path / 'ck'}", f"run.logs_dir={tmp_path / 'logs'}"]


def test_data_prepare_writes_summary_then_skips(dirs, tmp_path, capsys):
    assert main(["data", "prepare", "--config", TINY, *dirs]) == 0
    out = tmp_path / "ck" / "tiny" / "data"
    summary = read_json(out / "summary.json")
    assert summary["samples"]["total"] == sum(s["samples"] for s in summary["splits"].values())
    assert (out / "config.yaml").is_file() and (out / "_SUCCESS.json").is_file()
    assert "before filtering" in capsys.readouterr().out
    assert main(["data", "prepare", "--config", TINY, *dirs]) == 0
    assert "up to date, skipped" in capsys.readouterr().out
    assert main(["data", "prepare", "--config", TINY, "--force", *dirs]) == 0
    assert "running (forced)" in capsys.readouterr().out


def test_fit_with_stages(dirs, tmp_path):
    assert main(["fit", "--config", TINY, "--stages", "data", *dirs]) == 0
    assert (tmp_path / "ck" / "tiny" / "data" / "summary.json").is_file()


def test_bad_key_exits_2_with_message(dirs, capsys):
    assert main(["data", "prepare", "--config", TINY, "data.max_histroy=3", *dirs]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'data.max_histroy'" in err and "max_history" in err


def test_bad_type_and_bad_override_exit_2(dirs, capsys):
    assert main(["data", "prepare", "--config", TINY, "data.min_history=few", *dirs]) == 2
    assert "wrong type for 'data.min_history' (expected int)" in capsys.readouterr().err
    assert main(["data", "prepare", "--config", TINY, "data.min_history", *dirs]) == 2
    assert "not of the form key=value" in capsys.readouterr().err


def test_missing_data_path_exits_1_naming_key(dirs, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert main(["data", "prepare", "--config", TINY, f"data.path={missing}", *dirs]) == 1
    err = capsys.readouterr().err
    assert "data.path" in err and str(missing) in err


def test_unknown_stage_exits_1(dirs, capsys):
    assert main(["fit", "--config", TINY, "--stages", "dta", *dirs]) == 1
    assert "unknown stage(s) dta" in capsys.readouterr().err


def test_python_m_gcnee_help():
    proc = subprocess.run([sys.executable, "-m", "gcnee", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("fit", "data", "model", "bench"):
        assert command in proc.stdout
