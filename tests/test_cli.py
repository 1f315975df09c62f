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


# ---------------------------------------------------------------- issue #18: first contact

def _gcnee(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300,
           stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "gcnee", *args], stdout=stdout,
                          stderr=subprocess.STDOUT if stdout is not subprocess.PIPE
                          else subprocess.PIPE, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_config_error_exits_2_in_under_a_second():
    import time

    start = time.perf_counter()
    proc = _gcnee("fit", "--config", "configs/ml100k.yaml", "llm.lora.rr=3")
    wall = time.perf_counter() - start
    assert proc.returncode == 2
    assert "unknown key 'llm.lora.rr'" in proc.stderr and "r, alpha" in proc.stderr
    assert wall < 1.0, f"{wall:.2f} s: torch/transformers imported before the config check?"


def test_bad_choice_and_unknown_stage_are_fast_and_import_nothing_heavy():
    code = ("import sys; from gcnee.cli import main; "
            "rc1 = main(['fit', '--config', 'configs/ml100k.yaml', 'retriever.kind=gnn']); "
            "rc2 = main(['fit', '--config', 'configs/ml100k.yaml', '--stages', 'dta']); "
            "heavy = [m for m in ('torch', 'transformers', 'lightning') if m in sys.modules]; "
            "print(rc1, rc2, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "2 1 []", proc.stdout + proc.stderr
    assert "retriever.kind must be one of gcn, llm, random, none" in proc.stderr
    assert "unknown stage(s) dta" in proc.stderr


def test_flags_after_overrides(dirs, tmp_path, capsys):
    assert main(["data", "prepare", "--config", TINY, *dirs]) == 0
    capsys.readouterr()
    # the shape of the report: --force after key=value overrides, more overrides after it
    assert main(["data", "prepare", "--config", TINY, "data.fetch=null", "--force",
                 *dirs]) == 0
    assert "running (forced)" in capsys.readouterr().out
    assert main(["fit", dirs[0], "--stages", "data", "--config", TINY, dirs[1],
                 "--force"]) == 0
    assert "running (forced)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["data", "prepare", "--config", TINY, "data.fetch=null", "--frce"])
    assert err.value.code == 2
    assert "unrecognized arguments: --frce" in capsys.readouterr().err


def test_later_override_wins_across_flags(dirs):
    from gcnee.cli import parse_args

    args = parse_args(["fit", "--config", TINY, "data.min_history=2", "--force",
                       "data.min_history=4", "--stages", "data", "-v"])
    assert args.overrides == ["data.min_history=2", "data.min_history=4"]
    assert args.force and args.verbose and args.stages == ["data"]


def test_missing_model_folder_stops_before_any_stage(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never ask the hub from a test
    # configs/tiny.yaml names llm.model: tests/tiny-model, which looks like a hub id
    assert main(["fit", "--config", TINY, *dirs]) == 2
    err = capsys.readouterr().err
    assert "llm.model" in err and "tests/tiny-model" in err and "no such path" in err
    assert not (tmp_path / "ck").exists()  # no stage ran: not even the data stage
    missing = tmp_path / "nowhere" / "model"
    assert main(["fit", "--config", TINY, f"llm.model={missing}", *dirs]) == 2
    assert f"no such folder or file: {missing}" in capsys.readouterr().err
    # a subset without the llm stage does not need the model
    assert main(["fit", "--config", TINY, "--stages", "data", *dirs]) == 0


def test_check_model_accepts_what_the_loader_loads(tmp_path, monkeypatch):
    from gcnee.config import ConfigError, load_config
    from gcnee.llm.backbone import DEFAULT_MODELS
    from gcnee.preflight import DEFAULT_MODEL_NAMES, check_model

    assert set(DEFAULT_MODEL_NAMES) == set(DEFAULT_MODELS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def check(model: str) -> str:
        return check_model(load_config(TINY, [f"llm.model={model}"]).llm, tmp_path)

    assert check("smollm2-135m-instruct").startswith("default model")
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        check(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert check(str(tmp_path / "m")).startswith("model folder")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        check(str(tmp_path / "x.gguf"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check("someone/some-model")


def test_pipeline_stage_names_known_without_imports():
    import gcnee.pipeline  # noqa: F401
    from gcnee.cli import PIPELINE_STAGES
    from gcnee.stages import ORDER

    assert tuple(ORDER) == PIPELINE_STAGES


def test_redirected_run_prints_progress_lines_and_no_lightning_noise(tmp_path, tiny_model_dir):
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = _gcnee("fit", "--config", TINY, f"run.checkpoints_dir={tmp_path / 'ck'}",
                      f"run.logs_dir={tmp_path / 'logs'}", f"llm.model={tiny_model_dir}",
                      "--stages", "data,retriever,llm", stdout=out,
                      env={"GCNEE_PROGRESS_EVERY_S": "0"})
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    retriever = [x for x in lines if x.startswith("[gcnee] retriever: training: ")]
    llm = [x for x in lines if x.startswith("[gcnee] llm: training: step ")]
    scoring = [x for x in lines if x.startswith("[gcnee] llm: scoring: batch ")]
    assert retriever and llm and scoring, text[-3000:]
    assert any("epoch 3/3" in x for x in retriever)  # tiny: 3 LightGCN epochs
    assert any("loss" in x and "elapsed" in x and "ETA" in x for x in llm)
    assert llm[-1].endswith("done")
    for noise in ("litlogger", "GPU available", "TPU available", "Tip:", "\r"):
        assert noise not in text, noise
