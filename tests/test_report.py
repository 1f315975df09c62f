"""The run report: `gcnee fit` writes logs/<run>/report.md + report.json; `gcnee report`;
ablations as sibling runs (tiny config, one shared fitted run)."""

from __future__ import annotations

import json

import pytest
from fitted_run import ROOT, TINY, fitted_run

from gcnee.cli import main
from gcnee.config import ConfigError, load_config
from gcnee.report.ablations import check_ablations, variants
from gcnee.report.collect import configured_row, served_row
from gcnee.stages import read_json, run_pipeline

STAGES = ("data", "retriever", "llm", "exits")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fitted_run(tmp_path_factory)


def test_fit_writes_the_report(fitted):
    md = (fitted.logs / "report.md").read_text()
    rep = json.loads((fitted.logs / "report.json").read_text())
    for title in ("## Stages", "## Data", "## Retriever", "## LLM", "## Exit heads",
                  "## Table 2", "## Ablations", "## Software and hardware"):
        assert title in md, title
    for s in STAGES:
        marker = read_json(fitted.run / s / "_SUCCESS.json")
        assert rep["stages"][s]["status"] == "up to date", s
        assert rep["stages"][s]["seconds"] == marker["seconds"], s
    assert (fitted.run / "report" / "_SUCCESS.json").is_file()
    data = read_json(fitted.run / "data" / "summary.json")
    assert rep["data"]["samples"] == data["samples"]["total"]
    assert rep["data"]["splits"]["test"]["samples"] == data["splits"]["test"]["samples"]
    llm = read_json(fitted.run / "llm" / "summary.json")["metrics"]["test"]
    assert rep["llm"]["metrics"]["test"] == llm
    retr = read_json(fitted.run / "retriever" / "summary.json")
    assert rep["retriever"]["recall"]["gcn"] == retr["val_recall@5_gcn"]
    assert rep["retriever"]["recall"]["popularity"] == retr["val_recall@5_popularity"]

    rows = {r["model"]: r for r in rep["table2"]}
    assert rows["GCN-retriever"]["metrics"]["auc"] == llm["tuned"]["auc"]
    assert rows["GCN-retriever"]["metrics"]["log_loss"] == llm["tuned"]["log_loss"]
    sweep = read_json(fitted.run / "exits" / "sweep.json")
    # The row of the setting the run serves: the one chosen on validation (eval.exit_setting
    # chosen), not eval.rule/threshold/window
    assert sweep["chosen"], "the tiny run's sweep chose no setting"
    ee = next(r for r in sweep["rows"] if r["row"] == sweep["chosen"]["row"])
    assert rows["GCN-earlyexit"]["metrics"]["auc"] == ee["auc"]
    assert rows["GCN-earlyexit"]["metrics"]["rps"] == ee["rps"]
    assert f"{ee['row']}, chosen on validation" in rows["GCN-earlyexit"]["source"]
    for name in ("TALLRec", "LLM-retriever", "DeepFM", "DIN", "SIM", "GRU4Rec"):
        assert rows[name]["metrics"] is None, name
    assert "eval.ablations=[retrieval]" in rows["TALLRec"]["how"]
    assert "not run: `eval.ablations=[llm_retriever]`" in md

    heads = {h["layer"]: h for h in rep["exits"]["head_auc"]}
    assert sorted(heads) == [1, 2, 3, 4]
    assert heads[1]["test_auc"] == sweep["head_auc"]["1"]
    for png in ("sweep_threshold.png", "sweep_window.png"):
        assert (fitted.logs / png).is_file() and f"![{png}]({png})" in md
    assert rep["machine"]["versions"]["torch"]
    assert set(rep["machine"]["versions"]) >= {"transformers", "lightning", "peft",
                                               "torch_geometric"}


def test_report_command_prints_and_rebuilds(fitted, capsys):
    md = (fitted.logs / "report.md").read_text()
    assert main(["report", str(fitted.logs)]) == 0
    assert capsys.readouterr().out == md
    assert main(["report", "tiny", "--logs-dir", str(fitted.root / "logs")]) == 0
    assert capsys.readouterr().out == md
    assert main(["report", "nope", "--logs-dir", str(fitted.root / "logs")]) == 1
    assert "no report for 'nope'" in capsys.readouterr().err
    assert main(["report", "--config", TINY, *fitted.overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# gcnee run report: tiny") and "## Table 2" in out


def test_report_of_a_partial_run_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dirs = [f"run.checkpoints_dir={tmp_path / 'ck'}", f"run.logs_dir={tmp_path / 'logs'}"]
    assert main(["fit", "--config", TINY, "--stages", "data,report", *dirs]) == 0
    rep = json.loads((tmp_path / "logs" / "tiny" / "report.json").read_text())
    assert rep["stages"]["data"]["status"] == "up to date"
    assert rep["stages"]["llm"]["status"] == "not run"
    assert rep["llm"] is None and rep["exits"] is None
    md = (tmp_path / "logs" / "tiny" / "report.md").read_text()
    assert "_Stage `llm` not run: run `gcnee fit --config <config> --stages llm`._" in md
    assert "## Data" in md and "| test |" in md
    assert all(r["metrics"] is None for r in rep["table2"])


def test_ablation_names_and_variants():
    cfg = load_config(TINY, ["eval.ablations=[retrieval,layers,k,llm_retriever]",
                             "eval.ablation_ks=[1,2,8]"])
    vs, notes = variants(cfg)
    assert [v.suffix for v in vs] == ["noretr", "last", "k1", "k8", "llmretr"]  # k=2 is the run
    assert vs[0].overrides == {"retriever.kind": "none"} and "exits" in vs[0].stages
    assert vs[1].overrides == {"retriever.layers_mode": "last"} and "exits" not in vs[1].stages
    assert vs[2].overrides == {"retriever.k": 1} and notes == []
    none = load_config(TINY, ["retriever.kind=none", "eval.ablations=[retrieval,layers,k]"])
    vs, notes = variants(none)
    assert [v.suffix for v in vs] == ["gcn", "gcn-average", "gcn-last"]
    assert notes and "'k' skipped" in notes[0]
    with pytest.raises(ConfigError, match="eval.ablations: unknown ablation.*'bogus'"):
        check_ablations(load_config(TINY, ["eval.ablations=[bogus]"]))


def test_configured_row_is_the_rule_at_threshold_and_window():
    cfg = load_config(TINY, ["eval.threshold=0.1", "eval.window=2"])
    rows = [{"kind": "full", "rule": "full", "tau": None, "m": None},
            {"kind": "tau", "rule": "window", "tau": 0.1, "m": 1},
            {"kind": "tau", "rule": "window", "tau": 0.1, "m": 2, "auc": 0.7}]
    assert configured_row(rows, cfg.eval)["auc"] == 0.7
    assert configured_row(rows[:2], cfg.eval) is None
    cal = [{**rows[2], "calibrated": False, "reads": "raw", "auc": 0.6},
           {**rows[2], "calibrated": True, "reads": "calibrated", "auc": 0.8},
           {**rows[2], "calibrated": True, "reads": "raw", "auc": 0.9}]
    assert configured_row(cal, cfg.eval)["auc"] == 0.6
    assert configured_row(cal, cfg.eval, calibrated=True)["auc"] == 0.9  # eval.rule_reads=raw


def test_served_row_is_the_chosen_one_unless_the_config_is_asked_for():
    rows = [{"kind": "full", "row": "full depth", "auc": 0.6},
            {"kind": "tau", "row": "window(tau=0.1,m=2)", "rule": "window", "tau": 0.1, "m": 2,
             "auc": 0.7},
            {"kind": "tau", "row": "window(tau=0.3,m=2)", "rule": "window", "tau": 0.3, "m": 2,
             "auc": 0.5}]
    sweep = {"rows": rows, "chosen": {"row": "window(tau=0.3,m=2)"}}
    cfg = load_config(TINY, ["eval.threshold=0.1", "eval.window=2"])
    row, how = served_row(sweep, cfg.eval)
    assert row["auc"] == 0.5 and how == "window(tau=0.3,m=2), chosen on validation"
    cfg.eval.exit_setting = "config"
    row, how = served_row(sweep, cfg.eval)
    assert row["auc"] == 0.7 and "eval.rule/threshold/window" in how
    cfg.eval.exit_setting = "chosen"
    assert served_row({"rows": rows, "chosen": None}, cfg.eval)[0]["auc"] == 0.7


def test_retrieval_ablation_runs_a_sibling_and_fills_table4(fitted, tmp_path, capsys):
    cfg = fitted.cfg(f"run.logs_dir={tmp_path / 'logs'}", "eval.ablations=[retrieval]")
    llm_marker = (fitted.run / "llm" / "_SUCCESS.json").stat().st_mtime
    run_pipeline(cfg, ["report"])
    sibling = fitted.root / "ck" / "tiny-noretr"
    assert "reuses stage(s) data of 'tiny'" in capsys.readouterr().out  # not exits
    assert read_json(sibling / "data" / "_SUCCESS.json") == read_json(
        fitted.run / "data" / "_SUCCESS.json")  # copied, not recomputed
    assert (fitted.run / "llm" / "_SUCCESS.json").stat().st_mtime == llm_marker
    rep = json.loads((tmp_path / "logs" / "tiny" / "report.json").read_text())
    assert rep["stages"]["exits"]["status"] == "up to date"  # eval.ablations is report-only
    t4 = rep["ablations"]["table4"]
    assert [(r["retriever"], r["early_exit"]) for r in t4] == [
        ("w/o", "w/o"), ("w/o", "w/"), ("w/ (gcn)", "w/o"), ("w/ (gcn)", "w/")]
    assert all(r["metrics"]["rps"] > 0 and 0 <= r["metrics"]["auc"] <= 1 for r in t4)
    noretr = read_json(sibling / "llm" / "summary.json")["metrics"]["test"]["tuned"]
    tallrec = next(r for r in rep["table2"] if r["model"] == "TALLRec")
    assert tallrec["metrics"]["auc"] == noretr["auc"] and "tiny-noretr" in tallrec["source"]
    assert read_json(sibling / "retriever" / "_SUCCESS.json")["config"]["retriever.kind"] == "none"
    md = (tmp_path / "logs" / "tiny" / "report.md").read_text()
    assert "### Table 4" in md and "(paired bootstrap)" in md
    gain = rep["ablations"]["retrieval_gain"]
    gcn = read_json(fitted.run / "llm" / "summary.json")["metrics"]["test"]["tuned"]
    assert gain["n"] == gcn["n"] == noretr["n"]
    assert gain["auc_diff"] == pytest.approx(gcn["auc"] - noretr["auc"])
    assert gain["lo"] <= gain["auc_diff"] <= gain["hi"]
    # Again: the sibling's stages are cached.
    run_pipeline(cfg, ["report"], force=True)
    out = capsys.readouterr().out
    assert "stage 'llm': up to date, skipped" in out and "stage 'exits': up to date" in out


@pytest.mark.slow
def test_layers_and_k_ablations(fitted, tmp_path):
    cfg = fitted.cfg(f"run.logs_dir={tmp_path / 'logs'}", "eval.ablations=[layers,k]",
                     "eval.ablation_ks=[1]")
    run_pipeline(cfg, ["report"])
    rep = json.loads((tmp_path / "logs" / "tiny" / "report.json").read_text())
    t3 = rep["ablations"]["table3"]
    assert [r["layers_mode"] for r in t3] == ["average", "last"]
    assert all(r["metrics"] is not None for r in t3)
    f5 = rep["ablations"]["figure5"]
    assert [r["k"] for r in f5] == [1, 2]
    assert all(r["early_exit"]["rps"] > 0 for r in f5)
    assert (tmp_path / "logs" / "tiny" / "ablation_k.png").is_file()


def test_llm_section_names_the_untuned_subset_and_the_paired_difference():
    from gcnee.report.render import llm_md

    test = {"tuned": {"auc": 0.57, "auc_lo": 0.55, "auc_hi": 0.60, "n": 2000},
            "untuned": {"auc": 0.52, "auc_lo": 0.47, "auc_hi": 0.57, "n": 500,
                        "tuned_auc_same_samples": 0.58, "tuned_minus_auc": 0.06,
                        "tuned_minus_auc_lo": 0.01, "tuned_minus_auc_hi": 0.11}}
    md = llm_md({"metrics": {"test": test}, "train_samples": 256})
    assert ("LLM untuned was scored on 500 of the test samples (`eval.untuned_max_samples`): "
            "there the tuned model's AUC is 0.5800, tuned − untuned +0.0600 [+0.010, +0.110]"
            in md)
    assert "scored on" not in llm_md({"metrics": {"test": {"tuned": test["tuned"]}}})
