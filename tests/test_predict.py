"""`gcnee predict` on the tiny fitted run: per-line records and errors, prompts and scores equal
to the llm/exit stages' own, cold users served from their history."""

from __future__ import annotations

import csv
import json

import pytest
from fitted_run import TINY, fitted_run

from gcnee.cli import main
from gcnee.data.tables import load_samples
from gcnee.predict import Predictor, Request


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fitted_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(fitted):
    return Predictor.open(fitted.cfg())


def _test_samples(fitted):
    return load_samples(fitted.run / "data" / "test.jsonl")


def _request(sample, line: int = 1, user: str | None = None) -> Request:
    hist = list(zip(sample.history_items, sample.history_ratings))
    return Request(line, {}, user or sample.user, sample.item, hist)


def test_predict_command_scores_lines_and_reports_errors(fitted, tmp_path):
    s = _test_samples(fitted)[0]
    hist = [[i, r] for i, r in zip(s.history_items, s.history_ratings)]
    lines = [
        json.dumps({"id": "a", "user": s.user, "item": s.item, "history": hist}),
        json.dumps({"id": "b", "user": s.user, "item": s.item}),
        json.dumps({"id": "c", "user": s.user, "item": "no-such-item"}),
        '{"user": "1", "item": ',  # malformed
        "",
        json.dumps({"id": "e", "user": "new-user", "item": s.item, "history": hist}),
        json.dumps({"id": "f", "user": "new-user", "item": s.item}),
        json.dumps({"id": "g", "user": int(s.user), "item": int(s.item)}),
        json.dumps({"id": "h", "user": s.user, "item": s.item, "history": [["zzz", 3]]}),
    ]
    src, out = tmp_path / "requests.jsonl", tmp_path / "out" / "scores.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["predict", "--config", TINY, *fitted.overrides, "--input", str(src),
                 "--output", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 6, 7, 8, 9]  # blank line 5 skipped
    by_id = {r.get("id"): r for r in recs}
    assert by_id["c"]["error"] == "unknown item 'no-such-item'"
    assert recs[3] == {"line": 4, "error": recs[3]["error"]}
    assert recs[3]["error"].startswith("malformed JSON")
    assert by_id["f"]["error"].startswith("unknown user 'new-user'")
    assert by_id["h"]["error"] == "unknown item 'zzz' in history entry 0"
    layers = list(fitted.cfg().exits.layers)
    for key in ("a", "b", "e", "g"):
        r = by_id[key]
        assert 0 < r["score"] < 1 and r["exit_layer"] in layers and r["latency_ms"] > 0, r
        assert "error" not in r
    assert by_id["a"]["user"] == s.user and by_id["g"]["user"] == int(s.user)  # ids copied as given
    assert by_id["g"]["score"] == pytest.approx(by_id["b"]["score"], abs=1e-6)


def test_prompts_and_scores_equal_the_exit_stage_scorer(fitted, predictor):
    from gcnee.exits.heads import load_calibration, load_heads
    from gcnee.exits.scorer import EarlyExitScorer
    from gcnee.llm.backbone import load_tuned

    dm = predictor.run.datamodule()
    test = dm.datasets["test"]
    stage_ids = dict(zip(test.sample_ids, test.input_ids))
    samples = _test_samples(fitted)
    prompts = [predictor.prompt_ids(_request(s)) for s in samples]
    for s, ids in zip(samples, prompts):
        assert ids == list(stage_ids[s.sample_id]), s.sample_id  # the llm stage's own prompt
    model, _ = load_tuned(fitted.run / "llm")
    heads_pt = fitted.run / "exits" / "heads.pt"
    cal = load_calibration(heads_pt)  # exits.calibration=auto: predict serves calibrated P
    assert cal is not None and predictor.run.calibration is not None
    scorer = EarlyExitScorer(model, load_heads(heads_pt, model), calibration=cal,
                             rule_reads=predictor.run.cfg.eval.rule_reads)
    ev = predictor.run.cfg.eval  # the setting the exit stage chose on validation
    ref = scorer.score_requests(prompts, 1, rule=ev.rule, tau=ev.threshold, m=ev.window,
                                min_prev=ev.window_min_prev)
    scores, layers = predictor.score_ids(prompts)
    assert scores == pytest.approx(ref.scores.numpy(), abs=1e-5)
    assert layers.tolist() == ref.exit_layers.tolist()


def test_full_depth_equals_the_llm_stage_tuned_scores(fitted, predictor):
    full = Predictor.open(fitted.cfg(), full_depth=True)
    with open(fitted.run / "llm" / "scores_test.csv") as f:
        tuned = {int(r["sample_id"]): float(r["tuned"]) for r in csv.DictReader(f)}
    samples = _test_samples(fitted)
    scores, layers = full.score_ids([full.prompt_ids(_request(s)) for s in samples])
    assert scores == pytest.approx([tuned[s.sample_id] for s in samples], abs=1e-4)
    assert set(layers.tolist()) == {full.scorer.num_layers}


def test_cold_user_is_served_from_its_history(fitted, predictor):
    s = load_samples(fitted.run / "data" / "train.jsonl")[0]
    items = list(s.history_items)
    assert predictor.similar.cold_status("new-user", items) == "cold_embedded"
    neighbors = predictor.similar.get("new-user", items)
    assert len(neighbors) == predictor.cfg.retriever.k
    text = predictor.tokenizer.decode(predictor.prompt_ids(_request(s, user="new-user")))
    assert "User A rated" in text


def test_known_history_is_recent_chronological_without_the_target(predictor):
    inter = predictor.prepared.interactions
    user = str(inter.user[0])
    target = str(inter.item[inter.user == user][0])
    rows = sorted((j for j in range(len(inter))
                   if inter.user[j] == user and inter.item[j] != target),
                  key=lambda j: (inter.timestamp[j], j))
    expected = [(str(inter.item[j]), float(inter.rating[j])) for j in rows]
    expected = expected[-int(predictor.cfg.data.max_history):]
    hist = predictor.known_history(user, target)
    assert hist == expected and hist


def test_batch_size_groups_latency_but_not_scores(fitted, predictor):
    lines = [json.dumps({"user": s.user, "item": s.item}) for s in _test_samples(fitted)]
    one = list(predictor.predict_lines(lines))
    predictor.cfg.eval.batch_size = 2
    try:
        two = list(predictor.predict_lines(lines))
    finally:
        predictor.cfg.eval.batch_size = fitted.cfg().eval.batch_size
    assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], abs=1e-5)
    lat = [r["latency_ms"] for r in two]
    assert lat[0] == lat[1] and lat[2] == lat[3]  # one latency per batch of two


def test_predict_without_a_trained_run_names_the_stage(tmp_path, capsys):
    req = tmp_path / "r.jsonl"
    req.write_text('{"user": "1", "item": "1"}\n')
    assert main(["predict", "--config", TINY, f"run.checkpoints_dir={tmp_path}",
                 "--input", str(req), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "the 'data' stage has not finished" in capsys.readouterr().err


def test_a_run_is_scored_with_its_own_prompt_settings(fitted):
    """TrainedRun: a command-line key that changes the prompts fails by name; a training key is
    one warning and the run's value is used; serving keys apply."""
    import warnings

    from gcnee.run import TrainedRun
    from gcnee.stages import StageError

    with pytest.raises(StageError, match=r"prompt\.history_items: the run has None, the "
                                         r"command line 2"):
        TrainedRun.open(fitted.cfg("prompt.history_items=2"), tables=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = TrainedRun.open(fitted.cfg("llm.lr=0.5", "eval.threshold=0.7",
                                         "eval.exit_setting=config", "eval.batch_size=3"),
                              tables=False)
    said = [str(w.message) for w in caught if "trained with other settings" in str(w.message)]
    assert len(said) == 1 and "llm.lr" in said[0]
    assert run.cfg.llm.lr == fitted.cfg().llm.lr  # the run's own training value
    assert run.cfg.eval.threshold == 0.7 and run.cfg.eval.batch_size == 3  # serving keys
    assert run.fingerprint and run.calibration is not None and run.name == "tiny"


def test_the_exit_setting_chosen_on_validation_is_served_unless_config_is_asked(fitted,
                                                                              predictor):
    import json

    chosen = json.loads((fitted.run / "exits" / "summary.json").read_text())["chosen"]
    ev = predictor.run.cfg.eval
    assert chosen and predictor.run.chosen == chosen
    assert ev.rule == chosen["rule"] and ev.rule_reads == chosen["reads"]
    assert chosen["m"] is None or ev.window == chosen["m"]
    assert chosen["tau"] is None or ev.threshold == chosen["tau"]
    given = Predictor.open(fitted.cfg("eval.exit_setting=config", "eval.rule=confidence",
                                      "eval.threshold=0.123"))
    assert given.run.chosen is None
    assert (given.run.cfg.eval.rule, given.run.cfg.eval.threshold) == ("confidence", 0.123)
