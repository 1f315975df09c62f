"""The stage registry: markers, skipping, reruns on config change, --force, upstream changes."""

from __future__ import annotations

import itertools

import pytest

from gcnee import stages
from gcnee.config import load_config
from gcnee.stages import MARKER, StageError, read_json, register, run_pipeline, run_stage

_ids = itertools.count()


@pytest.fixture
def toy(tmp_path):
    """Two throwaway stages, ``up`` (data keys) -> ``down`` (retriever keys); removed after."""
    n = next(_ids)
    up, down = f"_test_up_{n}", f"_test_down_{n}"
    calls: list[str] = []

    @register(up, config_keys=["data.max_history", "run.seed"])
    def run_up(ctx):
        calls.append(up)
        (ctx.out_dir / "value.txt").write_text(str(ctx.cfg.data.max_history))
        return {"history": ctx.cfg.data.max_history}

    @register(down, config_keys=["retriever.k"], requires=[up])
    def run_down(ctx):
        calls.append(down)
        value = (ctx.input_dir(up) / "value.txt").read_text()
        return {"k": ctx.cfg.retriever.k, "up": value}

    def cfg(*overrides):
        return load_config(None, [f"run.checkpoints_dir={tmp_path / 'ck'}",
                                  f"run.logs_dir={tmp_path / 'logs'}", "run.name=t", *overrides])

    yield up, down, calls, cfg
    for name in (up, down):
        stages.STAGES.pop(name, None)
        if name in stages.ORDER:
            stages.ORDER.remove(name)


def test_run_writes_outputs_config_and_marker_then_skips(toy, tmp_path, capsys):
    up, down, calls, cfg = toy
    summary = run_stage(cfg(), up)
    assert summary == {"history": 15}
    out = tmp_path / "ck" / "t" / up
    marker = read_json(out / MARKER)
    assert marker["summary"] == {"history": 15} and marker["stage"] == up
    assert "max_history: 15" in (out / "config.yaml").read_text()
    assert run_stage(cfg(), up) == {"history": 15}  # from the marker
    assert calls == [up]
    assert "up to date, skipped" in capsys.readouterr().out


def test_changed_key_reruns_and_says_which(toy, capsys):
    up, down, calls, cfg = toy
    run_stage(cfg(), up)
    capsys.readouterr()
    run_stage(cfg("llm.lr=0.5"), up)  # not one of the stage's keys
    assert calls == [up]
    run_stage(cfg("data.max_history=7"), up)
    assert calls == [up, up]
    assert "data.max_history: 15 -> 7" in capsys.readouterr().out


def test_force_reruns(toy, capsys):
    up, down, calls, cfg = toy
    run_stage(cfg(), up)
    run_stage(cfg(), up, force=True)
    assert calls == [up, up]
    assert "running (forced)" in capsys.readouterr().out


def test_upstream_change_reruns_downstream(toy, capsys):
    up, down, calls, cfg = toy
    run_pipeline(cfg(), [up, down])
    assert calls == [up, down]
    fp = stages.fingerprint(cfg(), down)
    assert stages.fingerprint(cfg("data.max_history=9"), down) != fp
    assert stages.fingerprint(cfg("retriever.k=9"), down) != fp
    assert stages.stage_status(cfg("data.max_history=9"), down) == (
        False, f"upstream stage '{up}' changed")
    capsys.readouterr()
    run_pipeline(cfg("data.max_history=9"), [up, down])
    assert calls == [up, down, up, down]
    assert read_json(stages.StageContext(cfg(), stages.STAGES[down]).out_dir / MARKER)[
        "summary"]["up"] == "9"
    run_pipeline(cfg("data.max_history=9"), [up, down])
    assert calls == [up, down, up, down]  # both up to date now


def test_a_change_two_stages_up_reruns_the_third(toy):
    """up -> down -> last: a change of up's keys must reach last, which reads only down."""
    up, down, calls, cfg = toy
    last = f"{down}_last"

    @register(last, config_keys=["prompt.examples_per_user"], requires=[down])
    def run_last(ctx):
        calls.append(last)
        return {}

    try:
        assert stages.upstream_stages(last) == [down, up]
        run_pipeline(cfg(), [up, down, last])
        assert stages.stage_status(cfg(), last)[0]
        assert not stages.stage_status(cfg("data.max_history=9"), last)[0]
        run_pipeline(cfg("data.max_history=9"), [up, down, last])
        assert calls == [up, down, last, up, down, last]
    finally:
        stages.STAGES.pop(last)
        stages.ORDER.remove(last)


def test_downstream_needs_finished_upstream(toy):
    up, down, calls, cfg = toy
    with pytest.raises(StageError, match=f"needs the output of stage '{up}'"):
        run_stage(cfg(), down)


def test_failed_stage_leaves_no_marker(toy, tmp_path):
    n = next(_ids)
    name = f"_test_fail_{n}"
    attempts = []

    @register(name, config_keys=["run.seed"])
    def run_fail(ctx):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("killed")
        return {}

    try:
        *_, cfg = toy
        with pytest.raises(RuntimeError, match="killed"):
            run_stage(cfg(), name)
        assert not (tmp_path / "ck" / "t" / name / MARKER).exists()
        run_stage(cfg(), name)
        assert len(attempts) == 2 and (tmp_path / "ck" / "t" / name / MARKER).exists()
    finally:
        stages.STAGES.pop(name)
        stages.ORDER.remove(name)


def test_unknown_stage_and_unregistered_requirement(toy):
    *_, cfg = toy
    with pytest.raises(StageError, match="unknown stage"):
        run_pipeline(cfg(), ["no_such_stage"])
    with pytest.raises(ValueError, match="unregistered stage"):
        register("_test_orphan", config_keys=[], requires=["no_such_stage"])(lambda ctx: {})
    assert "_test_orphan" not in stages.STAGES


# ---- several ranks (gcnee.distributed): rank 0 writes, the others wait -----------------------

def _as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    for k, v in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "GROUP_RANK": 0,
                 "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(k, str(v))


def test_rank_zero_runs_single_process_stage_without_launcher_env(toy, monkeypatch):
    up, down, calls, cfg = toy
    seen = {}

    @register(f"{up}_env", config_keys=["run.seed"])
    def run_env(ctx):
        import os

        seen.update({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
        return {}

    try:
        _as_rank(monkeypatch, 0)
        run_stage(cfg(), f"{up}_env")
        assert seen == {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None}
        import os

        assert os.environ["RANK"] == "0"  # restored afterwards
    finally:
        stages.STAGES.pop(f"{up}_env")
        stages.ORDER.remove(f"{up}_env")


def test_other_rank_waits_for_rank_zero_marker_and_never_writes(toy, monkeypatch):
    import threading
    import time

    up, down, calls, cfg = toy
    _as_rank(monkeypatch, 1)
    monkeypatch.setenv("GCNEE_PIPELINE_START", repr(time.time()))
    out = {}
    waiter = threading.Thread(target=lambda: out.update(s=run_stage(cfg(), up)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and calls == []  # rank 1 neither runs nor marks the stage
    marker_dir = cfg().run.checkpoints_dir
    assert not (stages.Path(marker_dir) / "t" / up / MARKER).exists()
    monkeypatch.setenv("RANK", "0")  # now play rank 0 in this thread
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_stage(cfg(), up) == {"history": 15}
    waiter.join(timeout=10)
    assert out["s"] == {"history": 15} and calls == [up]


def test_other_rank_stops_when_rank_zero_fails(toy, monkeypatch):
    import time

    up, down, calls, cfg = toy
    monkeypatch.setenv("GCNEE_PIPELINE_START", repr(time.time()))
    out = stages.Path(cfg().run.checkpoints_dir) / "t" / up
    out.mkdir(parents=True)
    stages.write_json(out / stages.FAILED, {"error": "OSError('disk full')",
                                            "failed_at": time.time()})
    _as_rank(monkeypatch, 1)
    with pytest.raises(StageError, match="failed on rank 0.*disk full"):
        run_stage(cfg(), up)
