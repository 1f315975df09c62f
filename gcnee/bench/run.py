"""``gcnee bench all``: every benchmark in one process, one JSON and one markdown table.

Writes ``<logs>/<run>/bench/{exit,scoring,retrieval,train}.json`` (each bench's own),
``all.json`` (all of them, the machine, the command, load averages before and after) and
``bench.md`` (:func:`gcnee.bench.report.format_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gcnee.bench.early_exit import bench_dir, bench_exit
from gcnee.bench.precision import bench_precision
from gcnee.bench.report import format_report, load_average, machine_info
from gcnee.bench.scoring import bench_scoring
from gcnee.bench.train import bench_train
from gcnee.stages import atomic_path, write_json

BENCHES = ("exit", "scoring", "retrieval", "train")


def _retrieval(cfg: Any, out_dir: Path) -> dict[str, Any]:
    from gcnee.retrieval.bench import bench_retrieval

    return bench_retrieval(cfg)  # writes <logs>/<run>/bench/retrieval.json itself


RUNNERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "exit": bench_exit, "scoring": bench_scoring, "retrieval": _retrieval, "train": bench_train,
    "precision": bench_precision}  # precision is not part of `all` (it scores 3 x 256 prompts)


def bench_all(cfg: Any, which: Sequence[str] = BENCHES, command: str | None = None
              ) -> dict[str, Any]:
    """Run the benches in ``which`` (in :data:`BENCHES` order); write ``all.json`` and
    ``bench.md`` under ``<logs>/<run>/bench``; returns the combined results."""
    unknown = [w for w in which if w not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench(es) {unknown}; known: {', '.join(BENCHES)}")
    import gcnee.pipeline  # noqa: F401  (registers the stages: their status is checked)

    out = bench_dir(cfg)
    results: dict[str, Any] = {"machine": machine_info(), "command": command,
                               "run": str(cfg.run.name), "seconds": {}}
    for name in BENCHES:
        if name not in which:
            continue
        start = time.perf_counter()
        print(f"[gcnee] bench {name} ... (load average {load_average()})", flush=True)
        results[name] = RUNNERS[name](cfg, out)
        results["seconds"][name] = round(time.perf_counter() - start, 1)
    results["load_average_end"] = load_average()
    write_json(out / "all.json", results)
    text = format_report(results, command)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(text)
    print(text)
    print(f"[gcnee] bench results in {out}")
    return results


def run_one(cfg: Any, name: str) -> dict[str, Any]:
    """One bench (``gcnee bench exit|scoring|train``): its JSON, and its table printed."""
    from gcnee.bench.report import SECTIONS, format_machine

    if name not in RUNNERS:
        raise ValueError(f"unknown bench {name!r}; known: {', '.join(BENCHES)}")
    import gcnee.pipeline  # noqa: F401

    result = RUNNERS[name](cfg, bench_dir(cfg))
    fn = {key: f for key, _, f in SECTIONS}[name]
    print(format_machine(result.get("machine") or machine_info()))
    print(fn(result))
    print(f"[gcnee] -> {bench_dir(cfg) / (name + '.json')}")
    return result
