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
    # The exit stage reused the llm stage's recorded exit-layer states of the val/test prompts:
    # its backbone ran only over the training batches, and its full-depth AUC is the llm's.
    llm = json.loads((run / "llm" / "summary.json").read_text())
    exits = json.loads((run / "exits" / "summary.json").read_text())
    n_test = llm["metrics"]["test"]["tuned"]["n"]
    assert exits["states_from_llm_stage"] == {"val": llm["metrics"]["val"]["tuned"]["n"],
                                              "test": n_test}
    assert exits["backbone_batches"] == -(-llm["train_samples"] // 4)  # 1 epoch, batch 4
    full = next(r for r in sweep["rows"] if r["row"] == "full depth")
    assert abs(full["auc"] - llm["metrics"]["test"]["tuned"]["auc"]) < 1e-6
    assert sweep["rows"][0]["row"] == "full depth"
    # window: 3 τ + 2 m, confidence: 4 τ, patience: 2 m; each raw, calibrated, calibrated with
    # the rule on calibrated P; then every request at layer 1, 2, 3
    assert len(sweep["rows"]) == 1 + 3 * (3 + 2 + 4 + 2) + 3
    assert sweep["head_probs"] == "recorded"  # from the test loop, no second all-heads pass
    # exits.calibration=auto: fitted on validation, stored with the heads, one map per head
    assert sorted(int(k) for k in sweep["calibration"]) == [1, 2, 3, 4]
    assert sweep["n_val"] == llm["metrics"]["val"]["tuned"]["n"]
    # fitted on the validation samples, all of them and nothing else
    assert {c["n"] for c in sweep["calibration"].values()} == {sweep["n_val"]}
    assert {c["n_pos"] for c in sweep["calibration"].values()} == {
        llm["metrics"]["val"]["tuned"]["positives"]}
    chosen = sweep["chosen"]
    assert chosen is not None and chosen["val_auc_loss"] <= sweep["max_auc_loss"] + 1e-12
    assert exits["chosen"] == chosen and exits["calibration"] is not None
    assert (run / "exits" / "head_probs_val.pt").is_file()
    assert (run / "exits" / "sweep_pareto.png").is_file()
    # The exit stage reuses the llm stage's token cache (same tokenizer, loaded from merged/).
    assert len(list((run / "llm").glob("tokens-*.pt"))) == 1
    assert (run / "exits" / "sweep_threshold.png").is_file()
    events = list((tmp_path / "logs" / "tiny" / "exits").glob("events.out.tfevents*"))
    assert events, "TensorBoard log of the exit stage"
    # `gcnee evaluate` replays the sweep of the trained run: same AUCs, its own folder; from
    # the saved head probabilities, or, without them, from its own all-heads pass.
    saved = run / "exits" / "head_probs.pt"
    assert saved.is_file()
    for source in ("recorded", "all-heads pass"):
        assert main(["evaluate", *args[1:]]) == 0
        again = json.loads((tmp_path / "logs" / "tiny" / "evaluate" / "sweep.json").read_text())
        assert again["head_probs"] == source
        for a, b in zip(sweep["rows"], again["rows"]):
            assert abs(a["auc"] - b["auc"]) < 1e-5 and a["row"] == b["row"]
            assert a.get("val_auc") == b.get("val_auc")  # same validation choice
        assert again["chosen"]["row"] == sweep["chosen"]["row"]
        saved.unlink(missing_ok=True)
    # Rerun: every stage is up to date and skipped.
    marker = (run / "llm" / "_SUCCESS.json").stat().st_mtime
    assert main(args) == 0
    assert (run / "llm" / "_SUCCESS.json").stat().st_mtime == marker


def test_fit_under_bf16_mixed_on_cpu(tmp_path, tiny_model_dir):
    """configs/ml100k.yaml runs with trainer.precision=bf16-mixed on the CPU: every stage must
    work under it (LightGCN's sparse matmul and the baselines stay float32), and the exit
    sweep scores under the same autocast as the llm stage (same full-depth AUC)."""
    args = ["fit", "--config", "configs/tiny.yaml", f"run.checkpoints_dir={tmp_path}/ck",
            f"run.logs_dir={tmp_path}/logs", f"llm.model={tiny_model_dir}",
            "trainer.precision=bf16-mixed", "baselines.models=[deepfm,din,gru4rec,sim]",
            "baselines.epochs=1"]
    assert main(args) == 0
    run = tmp_path / "ck" / "tiny"
    llm = json.loads((run / "llm" / "summary.json").read_text())
    sweep = json.loads((run / "exits" / "sweep.json").read_text())
    full = next(r for r in sweep["rows"] if r["row"] == "full depth")
    assert abs(full["auc"] - llm["metrics"]["test"]["tuned"]["auc"]) < 1e-6
    assert all(r.get("replay_mismatches", 0) == 0 for r in sweep["rows"])
    base = json.loads((run / "baselines" / "summary.json").read_text())
    assert sorted(base["models"]) == ["deepfm", "din", "gru4rec", "sim"]
