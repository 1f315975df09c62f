"""The baselines stage on the tiny config: Table 2 files, eval subset, no-op and bad names."""

import csv
import json

import pytest

from gcnee.cli import main
from gcnee.config import ConfigError, load_config
from gcnee.data.samples import eval_subset
from gcnee.data.tables import PreparedData
from gcnee.stages import run_pipeline

SMALL = ["baselines.embedding_dim=4", "baselines.epochs=2", "baselines.batch_size=16",
         "baselines.mlp_hidden=[8]", "baselines.deepfm_hidden=[8]",
         "baselines.din_attention_hidden=[4]", "baselines.gru_hidden=4"]


def tiny_args(tmp_path, *extra):
    return ["fit", "--config", "configs/tiny.yaml", "--stages", "data,baselines",
            f"run.checkpoints_dir={tmp_path}/ck", f"run.logs_dir={tmp_path}/logs", *extra]


def test_stage_writes_table_2_on_the_tiny_config(tmp_path, capsys):
    args = tiny_args(tmp_path, "baselines.models=[deepfm,din,gru4rec,sim]", "eval.max_samples=3",
                     *SMALL)
    assert main(args) == 0
    out = tmp_path / "ck" / "tiny" / "baselines"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["deepfm", "din", "gru4rec", "sim"]
    prepared = PreparedData.load(tmp_path / "ck" / "tiny" / "data")
    test = prepared.splits["test"]
    assert summary["test_samples"] == len(test) and summary["eval_subset"] == 3
    assert summary["train_samples"] == len(prepared.splits["train"])
    for name, r in summary["models"].items():
        assert r["test"]["n"] == len(test) and r["subset"]["n"] == 3, name
        assert 0.0 <= r["test"]["log_loss"] < 5.0 and r["seconds"] > 0 and r["parameters"] > 0
        assert r["epochs"] >= 1
    assert summary["models"]["sim"]["search"] == "hard"  # the fixture's items have genres
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | AUC, eval subset (n=3)")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["DeepFM", "DIN", "GRU4Rec", "SIM"]
    assert summary["table_markdown"] == "\n".join(table)
    with open(out / "scores_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sample_id", "label", "in_eval_subset", "deepfm", "din", "gru4rec",
                             "sim"]
    # the same test subset as the LLM stage evaluates, and the full test split, in id order
    subset = {s.sample_id for s in eval_subset(test, 3, seed=0)}
    assert {int(r["sample_id"]) for r in rows if r["in_eval_subset"] == "1"} == subset
    assert [int(r["sample_id"]) for r in rows] == sorted(s.sample_id for s in test)
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in ("deepfm", "sim"))
    assert list((tmp_path / "logs" / "tiny" / "baselines" / "din").glob("events.out.tfevents*"))
    assert "| DIN |" in capsys.readouterr().out
    # rerun: up to date, skipped; a changed baselines key reruns only this stage
    marker = (out / "_SUCCESS.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "_SUCCESS.json").stat().st_mtime == marker
    assert main(args + ["baselines.epochs=1"]) == 0
    assert "baselines.epochs: 2 -> 1" in capsys.readouterr().out


def test_no_models_listed_is_a_no_op_that_says_so(tmp_path, capsys):
    assert main(tiny_args(tmp_path)) == 0
    summary = json.loads((tmp_path / "ck" / "tiny" / "baselines" / "summary.json").read_text())
    assert summary["models"] == {}
    assert "baselines.models is empty" in capsys.readouterr().out
    assert not (tmp_path / "ck" / "tiny" / "baselines" / "table.md").exists()


def test_unknown_model_names_the_key(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.checkpoints_dir={tmp_path}/ck",
                                            f"run.logs_dir={tmp_path}/logs",
                                            "baselines.models=[din,lightgbm]"])
    import gcnee.pipeline  # noqa: F401

    with pytest.raises(ConfigError, match="baselines.models.*lightgbm"):
        run_pipeline(cfg, ["data", "baselines"])
