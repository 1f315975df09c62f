"""End to end on the tiny config: data -> retriever -> llm -> exits through the CLI."""

import json

from gcnee.cli import main


def test_fit_runs_every_stage_on_the_tiny_config(tmp_path, tiny_model_dir):
    args = ["fit", "--config", "configs/tiny.yaml", f"run.checkpoints_dir={tmp_path}/ck",
            f"run.logs_dir={tmp_path}/logs", f"llm.model={tiny_model_dir}"]
    assert main(args) == 0
    run = tmp_path / "ck" / "tiny"
    for stage in ("data", "retriever", "llm", "exits"):
        assert (run / stage / "_SUCCESS.json").is_file(), stage
        assert (run / stage / "config.yaml").is_file(), stage
    sweep = json.loads((run / "exits" / "sweep.json").read_text())
    assert sweep["rows"][0]["row"] == "full depth"
    assert len(sweep["rows"]) == 1 + 3 + 2
    assert sweep["head_probs"] == "recorded"  # from the test loop, no second all-heads pass
    # The exit stage reuses the llm stage's token cache (same tokenizer, loaded from merged/).
    assert len(list((run / "llm").glob("tokens-*.pt"))) == 1
    assert (run / "exits" / "sweep_threshold.png").is_file()
    events = list((tmp_path / "logs" / "tiny" / "exits").glob("events.out.tfevents*"))
    assert events, "TensorBoard log of the exit stage"
    # `gcnee evaluate` replays the sweep of the trained run: same AUCs, its own folder.
    assert main(["evaluate", *args[1:]]) == 0
    again = json.loads((tmp_path / "logs" / "tiny" / "evaluate" / "sweep.json").read_text())
    assert again["head_probs"] == "all-heads pass"
    for a, b in zip(sweep["rows"], again["rows"]):
        assert abs(a["auc"] - b["auc"]) < 1e-5 and a["row"] == b["row"]
    # Rerun: every stage is up to date and skipped.
    marker = (run / "llm" / "_SUCCESS.json").stat().st_mtime
    assert main(args) == 0
    assert (run / "llm" / "_SUCCESS.json").stat().st_mtime == marker
