"""A finished run folder copied elsewhere still reports, predicts and evaluates (issue #18).

The tiny fitted run (tests/fitted_run.py) is copied to another folder, and the original is
moved out of reach while the copy is used through the public CLI: any path an output file
stored absolutely would point at the old place and fail (or silently read the old run).
"""

from __future__ import annotations

import json
import shutil

import pytest
from fitted_run import TINY, fitted_run

from gcnee.cli import main


@pytest.fixture
def moved(tmp_path_factory, tmp_path):
    run = fitted_run(tmp_path_factory)
    new = tmp_path / "elsewhere"
    shutil.copytree(run.root / "ck", new / "ck")
    shutil.copytree(run.root / "logs", new / "logs")
    away = run.root / "ck.away"
    (run.root / "ck").rename(away)  # the old place is gone while the copy is used
    model = next(o for o in run.overrides if o.startswith("llm.model="))
    try:
        yield run, new, [f"run.checkpoints_dir={new / 'ck'}", f"run.logs_dir={new / 'logs'}",
                         model, "llm.max_train_samples=8"]
    finally:
        away.rename(run.root / "ck")


def test_stored_paths_are_relative(moved):
    run, new, _ = moved
    summary = json.loads((new / "ck" / "tiny" / "retriever" / "summary.json").read_text())
    assert summary["best_checkpoint"] == "retriever/checkpoints/best.ckpt"
    assert (new / "ck" / "tiny" / summary["best_checkpoint"]).is_file()


def test_copied_run_reports_predicts_and_evaluates(moved, capsys):
    run, new, overrides = moved
    old = str(run.root / "ck")
    # report: rebuilt from the copied stage folders
    assert main(["report", "--config", TINY, *overrides]) == 0
    report = (new / "logs" / "tiny" / "report.md").read_text()
    assert "| llm | up to date" in report and old not in report
    # predict: every request of the copied run's test split scored from the copy
    test = [json.loads(x) for x in
            (new / "ck" / "tiny" / "data" / "test.jsonl").read_text().splitlines()]
    requests = new / "requests.jsonl"
    requests.write_text("".join(json.dumps({"user": s["user"], "item": s["item"]}) + "\n"
                                for s in test))
    out = new / "scores.jsonl"
    assert main(["predict", "--config", TINY, "--input", str(requests), "--output", str(out),
                 *overrides]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(scored) == len(test) and all("score" in r for r in scored), scored
    # evaluate: the exit sweep replayed from the copy
    assert main(["evaluate", "--config", TINY, *overrides]) == 0
    sweep = json.loads((new / "logs" / "tiny" / "evaluate" / "sweep.json").read_text())
    assert sweep["rows"][0]["row"] == "full depth"
    capsys.readouterr()
