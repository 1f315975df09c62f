"""Every bench end to end on a tiny run (structure only; timings are never asserted)."""

import json

import pytest
import torch

import gcnee.pipeline  # noqa: F401  (registers the stages)
from gcnee.bench.early_exit import bench_early_exit
from gcnee.bench.run import bench_all
from gcnee.cli import main
from gcnee.config import flat, load_config
from gcnee.exits.heads import ExitHeads, save_heads
from gcnee.exits.rules import make_rule
from gcnee.exits.scorer import EarlyExitScorer
from gcnee.llm.backbone import answer_token_ids
from gcnee.run import TrainedRun, run_dir
from gcnee.stages import MARKER, STAGES, StageError, fingerprint, run_pipeline, write_json

from tiny import make_tiny_llama, make_tiny_tokenizer

BENCH = ["bench.batch_sizes=[1,4]", "bench.requests=5", "bench.repeats=1",
         "bench.taus=[0.1,1.0]", "bench.train_steps=1", "bench.train_warmup=1",
         "bench.scoring_batch_size=4", "retriever.max_users_llm=4"]


def _marker(cfg, stage):
    write_json(run_dir(cfg) / stage / MARKER,
               {"stage": stage, "fingerprint": fingerprint(cfg, stage),
                "config": flat(cfg, STAGES[stage].config_keys), "summary": {}})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run with the outputs the benches read: data and retriever stages run for real,
    the tuned model (a random tiny Llama) and exit heads written as the llm/exits stages do."""
    tmp = tmp_path_factory.mktemp("bench")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=4)
    model.save_pretrained(tmp / "tiny-model")
    tok.save_pretrained(tmp / "tiny-model")
    cfg = load_config("configs/tiny.yaml", [
        f"run.checkpoints_dir={tmp}/ck", f"run.logs_dir={tmp}/logs",
        f"llm.model={tmp}/tiny-model", *BENCH])
    run_pipeline(cfg, ["data", "retriever"])
    llm_dir = run_dir(cfg) / "llm"
    model.save_pretrained(llm_dir / "merged")
    tok.save_pretrained(llm_dir / "merged")
    _marker(cfg, "llm")
    ans = answer_token_ids(tok, ["Yes", "No"], True)
    torch.manual_seed(0)
    heads = ExitHeads.from_model(model, [1, 2, 3, 4], ans, head="answer", init="random")
    save_heads(run_dir(cfg) / "exits" / "heads.pt", heads, "answer", "random")
    _marker(cfg, "exits")
    return cfg, model, heads


def test_bench_all_writes_every_result(tiny_run):
    cfg, _, _ = tiny_run
    res = bench_all(cfg, command="gcnee bench all --config configs/tiny.yaml")
    out = run_dir(cfg).parent.parent / "logs" / "tiny" / "bench"
    for name in ("exit", "scoring", "retrieval", "train", "all"):
        assert (out / f"{name}.json").is_file(), name
    saved = json.loads((out / "all.json").read_text())
    assert set(saved) >= {"machine", "exit", "scoring", "retrieval", "train", "seconds"}
    assert saved["machine"]["load_average"] is not None

    ex = res["exit"]
    assert ex["n_requests"] == 5 and ex["num_layers"] == 4 and ex["exit_layers"] == [1, 2, 3, 4]
    # batch 1: full + 2 rules; batch 4: full + 2 rules x (compact, no compaction), each of full
    # and compact also without the shared prefix (the tiny prompts share 20+ tokens)
    assert ex["prefix_sharing"] is True  # llm.share_prefix auto = on CPU
    assert [(r["batch_size"], r["compact"], r["prefix_sharing"]) for r in ex["rows"]] == [
        (1, True, True)] * 3 + [(4, True, True), (4, True, False)] + [
        (4, True, True), (4, False, True), (4, True, False)] * 2
    flipped = [r for r in ex["rows"] if not r["prefix_sharing"]]
    assert [r["variant"] for r in flipped] == [
        "full depth, no prefix sharing", "exit window(tau=0.1,m=2), no prefix sharing",
        "exit window(tau=1,m=2), no prefix sharing"]
    assert all(r["speedup_prefix_sharing"] > 0 for r in flipped[1:])
    for r in ex["rows"]:
        assert r["rps"] > 0 and len(r["seconds"]) == 1
        assert r["achieved_fraction"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        if r["variant"] == "full depth":
            assert r["mean_exit_layer"] == 4 and r["ideal_speedup"] == pytest.approx(1.0)
        if r["tau"] == 1.0:  # fires at the first eligible head (the third: layer 3)
            c = ex["head_cost_layers"]
            assert r["mean_exit_layer"] == 3
            assert r["ideal_speedup"] == pytest.approx((4 + c) / (3 + 3 * c))
        if not r["compact"]:  # same exits, every row computed to the slowest one's layer
            assert r["computed_layers_per_row"] >= r["mean_exit_layer"]
        if not r["compact"] or not r["prefix_sharing"]:  # same exits and scores, computed otherwise
            assert r["exit_layers_equal_compact"] and r["max_abs_diff_vs_compact"] < 1e-5

    sc = res["scoring"]
    assert [p["path"] for p in sc["paths"]][-1] == sc["baseline"]
    assert sc["n_requests"] == 5 and sc["batch_size"] == 4
    assert all(p["max_abs_diff"] < 1e-4 and p["rps"] > 0 for p in sc["paths"])

    tr = res["train"]
    assert [s["stage"] for s in tr["stages"]] == [
        "llm (LoRA)", "llm (LoRA), prefix sharing off", "llm (LoRA), sdpa attention",
        "exits (heads)"]
    assert [(s["attention"], s["share_prefix"]) for s in tr["stages"][:3]] == [
        ("eager", "auto"), ("eager", "false"), ("sdpa", "auto")]
    paths = [p["path"] for p in sc["paths"]]
    assert paths[:4] == ["layer runner (shared prefix)", "layer runner, no prefix sharing",
                         "layer runner, sdpa attention", "HF forward, last position"]
    assert sc["attention"] == "eager" and sc["speedup_prefix_sharing"] > 0
    assert all(s["timed_steps"] == 1 and s["samples_per_second"] > 0 for s in tr["stages"])
    assert res["retrieval"]["subset_users"] == 4

    md = (out / "bench.md").read_text()
    for title in ("## Early exit", "## Scoring", "## Retrieval", "## Training throughput"):
        assert title in md
    assert "Command: `gcnee bench all --config configs/tiny.yaml`" in md


def test_compaction_computes_fewer_layers_than_waiting(tiny_run):
    _, model, heads = tiny_run
    scorer = EarlyExitScorer(model, heads)
    g = torch.Generator().manual_seed(0)
    reqs = [torch.randint(7, 60, (int(n),), generator=g).tolist() for n in (5, 9, 3, 12)]
    with torch.no_grad():  # spread the heads so that the rows exit at different layers
        for layer in heads.trainable_layers:
            heads.projs[str(layer)].weight.mul_(40.0)
    try:
        rule = make_rule("confidence", tau=0.9)
        res = bench_early_exit(scorer, reqs, [4], [rule], repeats=1)
    finally:
        with torch.no_grad():
            for layer in heads.trainable_layers:
                heads.projs[str(layer)].weight.div_(40.0)
    by = {r["variant"]: r for r in res["rows"]}
    comp, wait = by["exit confidence(tau=0.9)"], by["exit confidence(tau=0.9) no compaction"]
    assert comp["ideal_speedup"] == wait["ideal_speedup"]
    assert comp["computed_layers_per_row"] == pytest.approx(comp["mean_exit_layer"])
    assert wait["computed_layers_per_row"] >= comp["computed_layers_per_row"]


def test_missing_outputs_name_the_stages_to_run(tiny_run, tmp_path, capsys):
    cfg, _, _ = tiny_run
    heads = run_dir(cfg) / "exits" / "heads.pt"
    aside = heads.with_name("heads.pt.aside")
    heads.rename(aside)
    try:
        with pytest.raises(StageError, match=r"heads\.pt not found.*--stages exits\n"
                                             r"run `gcnee fit --config <config> --stages exits`"):
            TrainedRun.open(cfg)
        TrainedRun.open(cfg, full_depth=True)  # needs no heads
    finally:
        aside.rename(heads)
    other = cfg.copy()
    other.run.name = "nothing-here"
    with pytest.raises(StageError) as err:  # every missing output at once, with its stages
        TrainedRun.open(other)
    msg = str(err.value)
    for stage, writes in (("data", "data"), ("retriever", "data,retriever"),
                          ("llm", "data,retriever,llm"), ("exits", "exits")):
        assert f"{stage}/_SUCCESS.json not found" in msg and f"--stages {writes}\n" in msg
    assert "merged/config.json not found" in msg and "heads.pt not found" in msg
    assert msg.endswith("run `gcnee fit --config <config> --stages data` first "
                        "(run.name / run.checkpoints_dir pick the run)")
    # through the CLI: exit status 1 and the message on stderr
    rc = main(["bench", "exit", "--config", "configs/tiny.yaml",
               f"run.checkpoints_dir={tmp_path}/none", f"run.logs_dir={tmp_path}/logs"])
    assert rc == 1
    assert "--stages data,retriever,llm" in capsys.readouterr().err


def test_bench_precision_compares_bf16_with_fp32(tiny_run):
    import numpy as np

    from gcnee.bench.precision import spearman
    from gcnee.bench.run import run_one

    assert spearman(np.array([0.1, 0.5, 0.3]), np.array([1.0, 9.0, 2.0])) == pytest.approx(1.0)
    assert spearman(np.array([0.1, 0.5, 0.3]), np.array([3.0, 1.0, 2.0])) == pytest.approx(-1.0)
    cfg, _, _ = tiny_run
    res = run_one(cfg.copy(), "precision")  # bench.precision_samples=256 > the tiny test split
    rows = {v["variant"]: v for v in res["variants"]}
    assert list(rows) == ["fp32", "bf16 autocast", "bf16 weights"]
    ref = rows["fp32"]
    assert ref["max_abs_diff"] == 0 and ref["auc_diff"] == 0
    assert ref["spearman"] == pytest.approx(1.0)
    assert ref["speedup"] == pytest.approx(1.0)
    for v in rows.values():
        assert 0 <= v["max_abs_diff"] < 0.2 and v["rps"] > 0 and 0 <= v["auc"] <= 1
    assert (run_dir(cfg).parent.parent / "logs" / "tiny" / "bench" / "precision.json").is_file()
