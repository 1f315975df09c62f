"""The ``report`` stage (last in ``gcnee fit``) and ``gcnee report``.

It requires no stage: it reports whatever stages of the run have finished and says which have
not (or are outdated for the config). With ``eval.ablations`` it first runs (or, through the
normal stage cache, reuses) the sibling runs those ablations need (:mod:`gcnee.report.ablations`).
Writes ``logs/<run>/report.md`` and ``report.json``, with the exit stage's PNG plots (and the
Figure 5 plot) copied next to them so the markdown renders. In a distributed run every rank takes
part in the sibling runs' training; only rank zero writes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import gcnee.pipeline  # noqa: F401  (registers the stages reported on, before this one)
from gcnee.distributed import is_global_zero
from gcnee.paths import portable
from gcnee.report import ablations as abl
from gcnee.report.collect import collect_run, report_dir
from gcnee.report.render import render
from gcnee.run import run_dir
from gcnee.stages import StageContext, atomic_path, register, write_json

# Every section a report shows or a sibling run depends on (the report itself is cheap to redo).
REPORT_KEYS = ["run", "data", "retriever", "llm", "prompt", "exits", "trainer", "eval",
               "baselines"]


def build_report(cfg: DictConfig, execute: bool = True) -> dict[str, Any]:
    """The report of the run of ``cfg`` as a JSON-able dict (nothing written).

    ``execute``: run the sibling runs of ``eval.ablations`` (False: report those on disk).
    """
    abl.check_ablations(cfg)
    variants, notes = abl.variants(cfg)
    siblings = [abl.run_variant(cfg, v, execute) for v in variants]
    from gcnee.bench.report import machine_info

    report = collect_run(cfg)
    runs = [{"ablation": None, **abl.describe(cfg, report)}] + siblings
    requested = [str(a) for a in cfg.eval.ablations]
    ablations: dict[str, Any] = {"requested": requested, "notes": notes, "siblings": siblings}
    if "retrieval" in requested:
        ablations["table4"] = abl.table4(cfg, runs)
        ablations["retrieval_gain"] = abl.paired_gain(cfg, runs)
    if "layers" in requested:
        ablations["table3"] = abl.table3(runs)
    if "k" in requested:
        ablations["figure5"] = abl.figure5(runs)
    report.update({
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "table2": abl.table2(cfg, runs, report.get("baselines")),
        "ablations": ablations,
        "machine": machine_info(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    return report


def write_report(cfg: DictConfig, report: dict[str, Any]) -> Path:
    """``report.md`` + ``report.json`` (+ plots) under ``logs/<run>/``; returns the markdown."""
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for png in sorted((run_dir(cfg) / "exits").glob("sweep_*.png")):
        shutil.copyfile(png, out / png.name)
    a = report.get("ablations") or {}
    if a.get("figure5"):
        plot = abl.plot_figure5(a["figure5"], out / "ablation_k.png")
        a["figure5_plot"] = plot.name if plot is not None else None
    write_json(out / "report.json", report)
    md = out / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text(render(report))
    return md


def find_report(run: str, logs_dir: str | Path = "logs") -> Path:
    """``report.md`` of ``run``: a folder holding it (``logs/<run>``) or a run name."""
    tried = [Path(run) / "report.md", Path(logs_dir) / run / "report.md"]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no report for '{run}' (tried {', '.join(map(str, tried))}); write it with `gcnee fit "
        f"--config <config>` (its last stage) or `gcnee report --config <config>`")


@register("report", config_keys=REPORT_KEYS, always=True, distributed=True,
          help="logs/<run>/report.md + report.json: every stage's results, tables, ablations")
def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    report = build_report(cfg, execute=True)
    summary: dict[str, Any] = {
        "report": portable(report_dir(cfg) / "report.md", run_dir(cfg)),
        "stages": {n: s["status"] for n, s in report["stages"].items()},
        "ablations": [s["run"] for s in report["ablations"]["siblings"]],
    }
    if is_global_zero():
        md = write_report(cfg, report)
        print(md.read_text())
        print(f"[gcnee] report: {md}")
    return summary
