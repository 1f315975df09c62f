"""``gcnee bench rehearsal``: the whole pipeline at the paper's data size on the CPU.

A synthetic Amazon Video Games look-alike (:mod:`gcnee.bench.synthetic`: 42 k users, 17 k items,
400 k reviews with titles and ratings, heavy-tailed) and a random 4-layer, 64-wide Llama go
through data -> retriever -> llm -> exits -> report with every test sample scored
(``eval.max_samples=null``) under DDP with ``--devices`` CPU processes (default 2); the llm and
exits stages then run again with one process on the same data and similar users. The point is
scale, not accuracy: nothing may break, and no stage may hold what grows with the data set
whole in memory on every rank.

Each stage is its own ``python -m gcnee fit --force --stages=<stage>`` process (Lightning's
launcher starts ranks 1.. from it), so each stage's numbers are its own: wall time of the
process (imports included) and the stage's own seconds from its marker, and the **peak
resident memory of every rank**: a sampler reads ``VmHWM`` (the kernel's high-water mark) of
every process of the stage's process tree from ``/proc`` every 0.2 s and names a process by
the ``LOCAL_RANK``/``RANK`` it was started with. The check "per-rank memory does not grow with
the number of ranks" compares the largest rank's peak under N processes with the single
process's (run with one thread, as each rank is), per stage.

The run is bounded by ``--budget-s``: a stage still running when the budget is spent is
killed (its process group), and what was measured so far is written. Outputs:
``<logs>/<run>/bench/rehearsal.{json,md}``; the synthetic files and the model live in
``<checkpoints>/<run>/rehearsal-inputs/`` and are reused while their sizes do not change.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcnee.bench.synthetic import META_FILE, REVIEWS_FILE, SyntheticSpec

STAGES = ("data", "retriever", "llm", "exits", "report")
SINGLE_STAGES = ("llm", "exits")  # rerun with one process: the ranks' memory comparison
SMALL = SyntheticSpec(users=300, items=200, interactions=3_000)
GROWTH_TOLERANCE = 1.10  # N-process rank peak / 1-process peak above this: memory grows
SAMPLE_S = 0.2
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GCNEE_PIPELINE_START")


def rehearsal_overrides(inputs: Path, small: bool) -> list[str]:
    """The settings of the rehearsal (before the user's own ``key=value``): the synthetic data
    and model, every test sample scored, small training budgets, short prompts, no baselines.

    The llm/exits stages' time then goes to what scales with the data set: building and
    tokenizing ~330 k prompts, scoring val and test twice (untuned, tuned) while recording the
    exit layers' states, the exit heads' val/test pass and the sweep.
    """
    o = [
        "data.format=amazon", f"data.path={inputs / 'data'}",
        f"data.interactions_file={REVIEWS_FILE}", f"data.items_file={META_FILE}",
        "data.min_history=3", "data.max_history=15",
        "baselines.models=[]",
        "retriever.kind=gcn", "retriever.k=2", "retriever.embedding_dim=64",
        "retriever.num_layers=3", "retriever.batch_size=8192", "retriever.patience=1",
        "retriever.epochs=1",  # one BPR epoch: its cost scales with the edges, not epochs
        f"llm.model={inputs / 'model'}", "llm.use_chat_template=false", "llm.max_length=256",
        "llm.loss=binary", "llm.max_train_samples=256", "llm.epochs=1", "llm.batch_size=8",
        "llm.eval_batch_size=64", "llm.accumulate_grad_batches=1", "llm.lr=1e-3",
        "llm.lora.r=4", "llm.lora.alpha=8", "llm.lora.dropout=0.0",
        "prompt.examples_per_user=2", "prompt.history_items=5",
        "exits.layers=[1,2,3]", "exits.head=answer", "exits.init=copy", "exits.epochs=1",
        "exits.batch_size=16", "exits.lr=1e-3",
        "eval.max_samples=null", "eval.val_max_samples=null", "eval.batch_size=64",
        "eval.thresholds=[0.01,0.05]", "eval.windows=[1,2]",
        "eval.confidence_thresholds=[0.8]", "eval.patience_windows=[2]",
        f"eval.rps_samples={32 if small else 256}", "eval.rps_repeats=1",
        f"eval.bootstrap={20 if small else 100}", "eval.ablations=[]",
        "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
    ]
    return o


def _trainer(devices: int) -> list[str]:
    strategy = "ddp" if devices > 1 else "auto"
    return [f"trainer.strategy={strategy}", f"trainer.devices={devices}"]


# --- the process tree's memory -------------------------------------------------------------

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process ended between the listing and the read
        return None


def _parents() -> dict[int, int]:
    """``{pid: ppid}`` of every process visible in ``/proc``."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        raw = _read(f"/proc/{name}/stat")
        if raw is not None:  # "pid (comm) state ppid ...": comm may hold spaces and parens
            out[int(name)] = int(raw[raw.rindex(b")") + 2:].split()[1])
    return out


def _rank_of(pid: int) -> str | None:
    raw = _read(f"/proc/{pid}/environ")
    if raw is None:
        return None
    env = dict(e.split(b"=", 1) for e in raw.split(b"\0") if b"=" in e)
    value = env.get(b"RANK", env.get(b"LOCAL_RANK"))
    return None if value is None else value.decode()


def _hwm_kb(pid: int) -> int | None:
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1])
    return None


class TreeMemory:
    """Peak resident memory (``VmHWM``) of every process below (and including) ``root``,
    sampled by :meth:`sample`; :meth:`ranks` names each by the rank it was started with."""

    def __init__(self, root: int):
        self.root = root
        self.procs: dict[int, dict[str, Any]] = {}

    def sample(self) -> None:
        parents = _parents()
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        for pid in tree:
            hwm = _hwm_kb(pid)
            if hwm is None:
                continue
            info = self.procs.get(pid)
            if info is None:
                rank = "0" if pid == self.root else _rank_of(pid)
                info = self.procs[pid] = {"pid": pid, "ppid": parents.get(pid), "rank": rank,
                                          "peak_kb": 0}
            info["peak_kb"] = max(info["peak_kb"], hwm)

    def ranks(self) -> tuple[dict[str, float], float]:
        """``({rank: peak MiB}, peak MiB of the tree's other processes)``. A rank's process is
        the first one started with that rank; its own children count as other processes."""
        ranks: dict[str, float] = {}
        other = 0.0
        for info in sorted(self.procs.values(), key=lambda p: p["pid"]):
            mib = info["peak_kb"] / 1024
            parent = self.procs.get(info["ppid"])
            if info["rank"] is None or info["rank"] in ranks or (
                    parent is not None and parent["rank"] == info["rank"]
                    and info["pid"] != self.root):
                other = max(other, mib)
            else:
                ranks[info["rank"]] = round(mib, 1)
        return dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))), round(other, 1)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every process of the group has ended
        pass


def run_measured(cmd: Sequence[str], *, deadline: float, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, sampling its tree's memory every 0.2 s; kill the
    group at ``deadline`` (``time.monotonic()``). Returns wall seconds, return code, whether
    it was killed, and the peak MiB of each rank and of the tree's other processes.

    ``VmHWM`` counts the executed program only; ``wait4``'s ``ru_maxrss`` would not do: Linux
    carries a process's peak across ``exec``, so it would include this (parent) process's
    resident set at the fork.
    """
    env = {**{k: v for k, v in os.environ.items() if k not in _RANK_ENV}, **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, start_new_session=True)
    memory = TreeMemory(proc.pid)
    killed, status = False, None
    kill_at = None
    try:
        while status is None:
            memory.sample()
            pid, st = os.waitpid(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status = st
                break
            now = time.monotonic()
            if now > deadline and kill_at is None:
                killed, kill_at = True, now
                _kill_group(proc.pid, signal.SIGTERM)
            elif kill_at is not None and now > kill_at + 15:
                _kill_group(proc.pid, signal.SIGKILL)
            time.sleep(SAMPLE_S)
    except BaseException:  # Ctrl-C: the stage's own session would outlive us
        _kill_group(proc.pid, signal.SIGKILL)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if killed:  # ranks started by the stage's process may outlive it
        _kill_group(proc.pid, signal.SIGKILL)
    ranks, other = memory.ranks()
    return {"seconds": round(time.monotonic() - start, 1), "returncode": proc.returncode,
            "killed": killed, "rank_peak_mib": ranks, "other_peak_mib": other}


# --- the rehearsal -------------------------------------------------------------------------

def prepare_inputs(inputs: Path, spec: SyntheticSpec, prompt_cfg: Any,
                   answer_words: list[str]) -> dict[str, Any]:
    """The synthetic data and the tiny model under ``inputs`` (reused when ``spec`` and the
    vocabulary match ``inputs/inputs.json``); returns what they are."""
    from gcnee.bench.synthetic import prompt_vocabulary, write_amazon_reviews, write_tiny_llama
    from gcnee.stages import read_json, write_json

    words = prompt_vocabulary(prompt_cfg, answer_words)
    record = inputs / "inputs.json"
    if record.is_file():
        done = read_json(record)
        if done.get("spec") == spec.as_dict() and done.get("words") == words:
            print(f"[gcnee] rehearsal: reusing the synthetic data and model in {inputs}")
            return done
    if inputs.exists():
        shutil.rmtree(inputs)
    start = time.monotonic()
    print(f"[gcnee] rehearsal: writing {spec.users:,} users x {spec.items:,} items, "
          f"{spec.interactions:,} reviews to {inputs / 'data'} ...", flush=True)
    data = write_amazon_reviews(inputs / "data", spec)
    model = write_tiny_llama(inputs / "model", words)
    done = {"spec": spec.as_dict(), "words": words, "data": data, "model": model,
            "seconds": round(time.monotonic() - start, 1)}
    write_json(record, done)
    return done


def _stage_seconds(run_dir: Path, stage: str, since: float) -> float | None:
    """The stage's own seconds from its marker, if this run (started at ``since``, epoch
    seconds) wrote it."""
    from gcnee.stages import MARKER, read_json

    marker = run_dir / stage / MARKER
    if not marker.is_file():
        return None
    done = read_json(marker)
    return done.get("seconds") if done.get("finished_at", 0) >= since else None


def _run_stages(label: str, stages: Sequence[str], base: list[str], run_dir: Path,
                deadline: float, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for stage in stages:
        left = deadline - time.monotonic()
        if left <= 0:
            rows.append({"run": label, "stage": stage, "status": "skipped (budget spent)"})
            print(f"[gcnee] rehearsal: {label}: {stage} skipped, the budget is spent")
            continue
        print(f"[gcnee] rehearsal: {label}: stage {stage} (budget left {left:.0f} s) ...",
              flush=True)
        cmd = [sys.executable, "-m", "gcnee", "fit", "--force", f"--stages={stage}", *base]
        since = time.time()
        res = run_measured(cmd, deadline=deadline, env=env)
        status = ("killed (budget spent)" if res["killed"]
                  else "ok" if res["returncode"] == 0 else f"failed (exit {res['returncode']})")
        row = {"run": label, "stage": stage, "status": status, **res,
               "stage_seconds": _stage_seconds(run_dir, stage, since)}
        rows.append(row)
        ranks = ", ".join(f"rank {r} {m:,.0f} MiB" for r, m in res["rank_peak_mib"].items())
        print(f"[gcnee] rehearsal: {label}: {stage} {status} in {res['seconds']:.1f} s; "
              f"peak {ranks}", flush=True)
        if status != "ok":
            break  # later stages need this one's outputs
    return rows


def memory_check(rows: list[dict[str, Any]], many: str, one: str) -> list[dict[str, Any]]:
    """Per stage run under both: the largest rank peak with N processes vs the one process's,
    and whether it stays within :data:`GROWTH_TOLERANCE`."""
    by = {(r["run"], r["stage"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for stage in SINGLE_STAGES:
        a, b = by.get((many, stage)), by.get((one, stage))
        if a is None or b is None or not a["rank_peak_mib"] or not b["rank_peak_mib"]:
            continue
        top = max(a["rank_peak_mib"].values())
        single = max(b["rank_peak_mib"].values())
        ratio = top / single if single else None
        out.append({"stage": stage, "ranks": len(a["rank_peak_mib"]), "max_rank_peak_mib": top,
                    "one_process_peak_mib": single,
                    "ratio": None if ratio is None else round(ratio, 3),
                    "grows": ratio is None or ratio > GROWTH_TOLERANCE})
    return out


def _samples(run_dir: Path) -> dict[str, Any]:
    from gcnee.stages import MARKER, read_json

    out: dict[str, Any] = {}
    data = run_dir / "data" / MARKER
    if data.is_file():
        s = read_json(data)["summary"]
        out = {"after_reading": s["after_reading"], "samples": s["samples"]["total"],
               "splits": {k: v["samples"] for k, v in s["splits"].items()},
               "graph_interactions": s["graph"]["interactions"]}
    llm = run_dir / "llm" / MARKER
    if llm.is_file():
        s = read_json(llm)["summary"]
        out["scored"] = {split: s["metrics"][split]["tuned"]["n"] for split in s["metrics"]}
        out["prompt_tokens"] = s.get("prompt_tokens")
        out["llm_train_samples"] = s.get("train_samples")
    return out


def rehearsal(config: str | None, overrides: Sequence[str], *, spec: SyntheticSpec,
              devices: int = 2, budget_s: float = 7200.0, small: bool = False,
              single: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run the rehearsal (module docstring); write and return ``rehearsal.json``'s content."""
    from gcnee.bench.report import load_average, machine_info
    from gcnee.config import load_config
    from gcnee.stages import atomic_path, write_json

    deadline = time.monotonic() + budget_s
    config = config or str(Path(__file__).resolve().parents[2] / "configs" / "videogames.yaml")
    user = list(overrides)
    if not any(o.startswith("run.name=") for o in user):
        user.insert(0, "run.name=rehearsal")
    probe = load_config(config, user)
    run_name = str(probe.run.name)
    ck_dir = Path(probe.run.checkpoints_dir)
    inputs = ck_dir / run_name / "rehearsal-inputs"
    base = rehearsal_overrides(inputs, small)
    cfg = load_config(config, [*base, *user])  # a bad override is named before anything runs
    info = prepare_inputs(inputs, spec, cfg.prompt, list(cfg.llm.answer_words))
    many, one = f"{devices} processes", "1 process"
    common = ["--config", config, *base, *user]

    rows = _run_stages(many, STAGES, [*common, *_trainer(devices)], ck_dir / run_name, deadline)
    one_name = f"{run_name}-1proc"
    if single and devices > 1 and all(r.get("status") == "ok" for r in rows
                                      if r["stage"] in ("data", "retriever")):
        # Same samples and similar users: only the ranks differ (the test's recipe).
        for stage in ("data", "retriever"):
            dst = ck_dir / one_name / stage
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(ck_dir / run_name / stage, dst)
        # One thread, as each DDP rank has (Lightning gives N ranks cores/N threads): the one
        # process is one rank doing all the work; two OpenMP threads would also spin against
        # each other on a loaded machine.
        rows += _run_stages(one, SINGLE_STAGES,
                            [*common, f"run.name={one_name}", *_trainer(1)],
                            ck_dir / one_name, deadline, env={"OMP_NUM_THREADS": "1"})
    result = {
        "machine": machine_info(), "command": command, "config": config, "run": run_name,
        "devices": devices, "budget_s": budget_s, "small": small,
        "overrides": [*base, *user], "inputs": {k: info[k] for k in ("spec", "data", "model")},
        "samples": _samples(ck_dir / run_name), "stages": rows,
        "memory_check": memory_check(rows, many, one),
        "load_average_end": load_average(),
    }
    out = Path(cfg.run.logs_dir) / run_name / "bench"
    write_json(out / "rehearsal.json", result)
    text = format_rehearsal(result)
    with atomic_path(out / "rehearsal.md") as tmp:
        tmp.write_text(text)
    print(text)
    print(f"[gcnee] rehearsal results in {out}")
    return result


def format_rehearsal(result: dict[str, Any]) -> str:
    """Markdown of a rehearsal: the machine, the sizes, per-stage time and per-rank peak
    memory, and the memory check."""
    from gcnee.bench.report import format_machine, markdown_table

    d, s = result["inputs"]["data"], result["samples"]
    ranks = sorted({r for row in result["stages"] for r in row.get("rank_peak_mib", {})},
                   key=int)
    lines = ["# CPU scale rehearsal", "", format_machine(result["machine"]), "",
             f"Synthetic Amazon reviews: {d['users']:,} users, {d['items']:,} items, "
             f"{d['interactions']:,} interactions (positive rate {d['positive_rate']}); model: "
             f"random Llama {result['inputs']['model']['layers']} layers x "
             f"{result['inputs']['model']['hidden']}; {result['devices']} CPU processes (DDP) "
             f"and 1; budget {result['budget_s']:.0f} s."]
    if s.get("splits"):
        lines.append(f"Samples: {s['samples']:,} (train/val/test {s['splits']['train']:,} / "
                     f"{s['splits']['val']:,} / {s['splits']['test']:,}); scored by the llm "
                     f"stage: {json.dumps(s.get('scored'))}; prompt tokens "
                     f"{json.dumps(s.get('prompt_tokens'))}.")
    headers = ["run", "stage", "status", "wall s", "stage s",
               *[f"rank {r} peak MiB" for r in ranks], "other processes MiB"]
    rows = []
    for row in result["stages"]:
        peaks = row.get("rank_peak_mib", {})
        rows.append([row["run"], row["stage"], row["status"], row.get("seconds"),
                     row.get("stage_seconds"), *[peaks.get(r) for r in ranks],
                     row.get("other_peak_mib") or None])
    lines += ["", markdown_table(headers, rows, "lll" + "r" * (len(headers) - 3)), ""]
    check = result["memory_check"]
    if check:
        lines.append(f"Per-rank memory vs the number of ranks (grows: ratio > "
                     f"{GROWTH_TOLERANCE}):")
        lines += ["", markdown_table(
            ["stage", "ranks", "largest rank peak MiB", "1 process peak MiB", "ratio", "grows"],
            [[c["stage"], c["ranks"], c["max_rank_peak_mib"], c["one_process_peak_mib"],
              c["ratio"], "yes" if c["grows"] else "no"] for c in check], "lrrrrl"), ""]
    else:
        lines.append("Per-rank memory check: not run (a stage failed, the budget was spent, "
                     "or one process only).")
    return "\n".join(lines) + "\n"
