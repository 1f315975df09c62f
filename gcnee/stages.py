"""The stage registry and the files stages hand over through.

A stage is a function ``run(ctx) -> summary`` registered under a name with the config keys it
depends on and the stages it reads from. Each stage writes into ``checkpoints/<run>/<stage>/``:
its outputs, the resolved config (``config.yaml``) and, last of all, a completion marker
(``_SUCCESS.json``) holding a fingerprint of the config keys it depends on and of its upstream
stages' fingerprints. A stage whose marker matches is skipped; one whose inputs changed is rerun,
saying which keys changed, and so are the stages after it (their fingerprints include it).
Outputs are written atomically (temporary file, then rename), and nothing is read from a stage
folder without a marker, so a killed run never leaves a half-written output that a later stage
trusts.

Under DDP (``gcnee.distributed``) rank 0 alone writes markers and stage files. A *distributed*
stage runs on every rank; any other stage runs on rank 0 while the other ranks wait for its
marker. A failing stage on rank 0 leaves ``_FAILED.json`` so that waiting ranks stop too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gcnee.config import flat, section_fingerprint, to_yaml
from gcnee.distributed import is_global_zero, pipeline_start, single_process_env, world_size

MARKER = "_SUCCESS.json"
FAILED = "_FAILED.json"
# How long ranks other than 0 wait for rank 0 to finish a stage (env GCNEE_RANK_WAIT_S).
RANK_WAIT_S = float(os.environ.get("GCNEE_RANK_WAIT_S", 7 * 24 * 3600))


class StageError(RuntimeError):
    """A stage that cannot run (missing input, upstream stage not done, bad data)."""


@dataclass
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, Any]]
    config_keys: list[str]  # dotted config paths whose values change this stage's output
    requires: list[str]  # upstream stages whose outputs it reads
    help: str = ""
    always: bool = False  # rerun on every pipeline run (the report: it reads every stage)
    distributed: bool = False  # runs on every rank under DDP (else on rank 0, others wait)


STAGES: dict[str, Stage] = {}
ORDER: list[str] = []  # registration order = pipeline order


def register(
    name: str, *, config_keys: list[str], requires: list[str] = (), help: str = "",
    always: bool = False, distributed: bool = False,
) -> Callable[[Callable[[StageContext], dict[str, Any]]], Callable[[StageContext], dict[str, Any]]]:
    """Decorator: ``@register("data", config_keys=["data", "run.seed"])``."""

    def wrap(fn: Callable[[StageContext], dict[str, Any]]):
        for req in requires:
            if req not in STAGES:
                raise ValueError(f"stage {name!r} requires unregistered stage {req!r}")
        STAGES[name] = Stage(name, fn, list(config_keys), list(requires), help, always,
                             distributed)
        if name not in ORDER:
            ORDER.append(name)
        return fn

    return wrap


@dataclass
class StageContext:
    """What a stage gets: the config, its folders, and its upstream stages' folders."""

    cfg: DictConfig
    stage: Stage
    force: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.checkpoints_dir) / self.cfg.run.name

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def log_dir(self) -> Path:
        return Path(self.cfg.run.logs_dir) / self.cfg.run.name / self.stage.name

    def input_dir(self, stage: str) -> Path:
        """The folder of a finished upstream stage (raises if it has no completion marker)."""
        d = self.run_dir / stage
        if not (d / MARKER).is_file():
            raise StageError(
                f"stage '{self.stage.name}' needs the output of stage '{stage}', which has not "
                f"finished in {d} (run `gcnee fit --config ... --stages {stage}` first)"
            )
        return d


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def upstream_stages(name: str) -> list[str]:
    """Every stage ``name`` depends on, directly or not: direct requirements first, in order."""
    out: list[str] = []
    todo = list(STAGES[name].requires)
    while todo:
        r = todo.pop(0)
        if r not in out:
            out.append(r)
            todo += STAGES[r].requires
    return out


def fingerprint(cfg: DictConfig, name: str) -> str:
    """Hash of a stage's config keys, then 4 characters of the hash of every stage it depends on,
    directly or not (a retriever change must reach the exit stage through the llm stage)."""
    st = STAGES[name]
    own = section_fingerprint(cfg, st.config_keys)
    return own + "".join(section_fingerprint(cfg, STAGES[r].config_keys)[:4]
                         for r in upstream_stages(name))


def stage_status(cfg: DictConfig, name: str) -> tuple[bool, str]:
    """(up to date?, why not) for a stage of this config."""
    marker = Path(cfg.run.checkpoints_dir) / cfg.run.name / name / MARKER
    if not marker.is_file():
        return False, "not run yet"
    done = read_json(marker)
    if done.get("fingerprint") == fingerprint(cfg, name):
        return True, "up to date"
    old, new = done.get("config", {}), flat(cfg, STAGES[name].config_keys)
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    upstream = [r for r in STAGES[name].requires if not stage_status(cfg, r)[0]]
    reasons = changed + [f"upstream stage '{r}' changed" for r in upstream]
    return False, "; ".join(reasons) or "its config keys changed (a new gcnee version?)"


def run_stage(cfg: DictConfig, name: str, force: bool = False) -> dict[str, Any]:
    """Run one stage unless its marker says it is up to date; return its summary."""
    st = STAGES[name]
    ctx = StageContext(cfg, st, force)
    zero = is_global_zero()
    fresh, why = stage_status(cfg, name)
    if st.always:
        fresh, why = False, "always rerun"
    if fresh and not force:
        if zero:
            print(f"[gcnee] stage '{name}': up to date, skipped ({ctx.out_dir})")
        return read_json(ctx.out_dir / MARKER).get("summary", {})
    since = pipeline_start()
    if not zero:
        if st.distributed:
            st.run(ctx)
        return _await_rank_zero(ctx, since)
    print(f"[gcnee] stage '{name}': running ({'forced' if force else why})")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / MARKER).unlink(missing_ok=True)
    (ctx.out_dir / FAILED).unlink(missing_ok=True)
    with atomic_path(ctx.out_dir / "config.yaml") as tmp:
        tmp.write_text(to_yaml(cfg))
    start = time.time()
    try:
        if st.distributed or world_size() == 1:
            summary = st.run(ctx) or {}
        else:
            with single_process_env():
                summary = st.run(ctx) or {}
    except BaseException as exc:
        write_json(ctx.out_dir / FAILED, {"stage": name, "error": repr(exc),
                                          "failed_at": time.time()})
        raise
    write_json(
        ctx.out_dir / MARKER,
        {
            "stage": name,
            "fingerprint": fingerprint(cfg, name),
            "config": flat(cfg, st.config_keys),
            "seconds": round(time.time() - start, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "finished_at": time.time(),
            "summary": summary,
        },
    )
    return summary


def _await_rank_zero(ctx: StageContext, since: float) -> dict[str, Any]:
    """On ranks other than 0: wait until rank 0 has written this run's marker of the stage."""
    marker, failed = ctx.out_dir / MARKER, ctx.out_dir / FAILED
    want = fingerprint(ctx.cfg, ctx.stage.name)
    deadline = time.time() + RANK_WAIT_S
    while time.time() < deadline:
        if failed.is_file():
            info = _read_if_complete(failed)
            if info and info.get("failed_at", 0) >= since:
                raise StageError(f"stage '{ctx.stage.name}' failed on rank 0: {info['error']}")
        if marker.is_file():
            done = _read_if_complete(marker)
            if done and done.get("fingerprint") == want and done.get("finished_at", 0) >= since:
                return done.get("summary", {})
        time.sleep(0.5)
    raise StageError(f"waited {RANK_WAIT_S:.0f} s for rank 0 to finish stage "
                     f"'{ctx.stage.name}' ({marker}); is {ctx.run_dir} on a filesystem that "
                     f"every node sees?")


def _read_if_complete(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):  # replaced between the check and the read
        return None


def run_pipeline(cfg: DictConfig, stages: list[str] | None = None, force: bool = False) -> None:
    """Run the named stages (default: all registered) in pipeline order."""
    wanted = stages or list(ORDER)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    for name in ORDER:
        if name in wanted:
            run_stage(cfg, name, force=force)
