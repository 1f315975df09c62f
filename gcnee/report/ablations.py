"""Ablations as sibling runs, and the paper's comparison tables built from runs.

``eval.ablations`` lists what the report compares (paper Tables 2-4, Figure 5):

- ``retrieval``: the same run without retrieval (``<run>-noretr``, ``retriever.kind=none``; for a
  run that already has none, ``<run>-gcn`` with ``kind=gcn``). Table 4 (retriever on/off x early
  exit on/off: AUC and RPS) and the TALLRec row of Table 2. Stages data..exits.
- ``layers``: the LightGCN user embedding from the other layer mode (``<run>-last`` with
  ``retriever.layers_mode=last``, or ``<run>-average``). Table 3. Stages data..llm.
- ``k``: ``retriever.k`` in ``eval.ablation_ks`` (``<run>-k1``, ...). Figure 5 (AUC and RPS by
  number of retrieved users). Stages data..exits.
- ``llm_retriever``: ``<run>-llmretr`` with ``retriever.kind=llm``, the LLM-retriever row of
  Table 2. Stages data..llm.

A sibling run is an ordinary run under a derived name (``checkpoints/<run>-<suffix>/``), run with
:func:`gcnee.stages.run_pipeline`, so its stages are cached and resumed like any other; a stage of
the parent whose fingerprint equals the sibling's (the data stage, always) is copied instead of
recomputed. Siblings carry ``eval.ablations=[]``, so they never start siblings of their own.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gcnee.config import ConfigError
from gcnee.distributed import barrier, is_global_zero
from gcnee.report.collect import collect_run, full_row, served_row
from gcnee.run import run_dir
from gcnee.stages import MARKER, fingerprint, run_pipeline, stage_status

ABLATIONS = ("retrieval", "layers", "k", "llm_retriever")
WITH_EXITS = ["data", "retriever", "llm", "exits"]
LLM_ONLY = ["data", "retriever", "llm"]
TRADITIONAL = (("deepfm", "DeepFM"), ("din", "DIN"), ("sim", "SIM"), ("gru4rec", "GRU4Rec"))


@dataclass
class Variant:
    """One sibling run: ``<run>-<suffix>`` with ``overrides``, running ``stages``."""

    ablation: str
    suffix: str
    overrides: dict[str, Any]
    stages: list[str] = field(default_factory=lambda: list(WITH_EXITS))

    def override_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


def check_ablations(cfg: DictConfig) -> list[str]:
    """``eval.ablations`` validated (a ConfigError names the key and the valid names)."""
    names = [str(a) for a in cfg.eval.ablations]
    bad = [a for a in names if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"eval.ablations: unknown ablation(s) {', '.join(map(repr, bad))}; "
                          f"valid: {', '.join(ABLATIONS)}")
    if "k" in names and not list(cfg.eval.get("ablation_ks", []) or []):
        raise ConfigError("eval.ablations lists 'k' but eval.ablation_ks is empty")
    return names


def variants(cfg: DictConfig) -> tuple[list[Variant], list[str]]:
    """The sibling runs ``eval.ablations`` asks for, and notes on what was left out and why."""
    rc = cfg.retriever
    out: list[Variant] = []
    notes: list[str] = []
    for name in check_ablations(cfg):
        if name == "retrieval":
            out.append(Variant(name, "noretr", {"retriever.kind": "none"}) if rc.kind != "none"
                       else Variant(name, "gcn", {"retriever.kind": "gcn"}))
        elif name == "layers":
            modes = ["average", "last"]
            if rc.kind == "gcn":
                other = "last" if rc.layers_mode == "average" else "average"
                out.append(Variant(name, other, {"retriever.layers_mode": other}, LLM_ONLY))
            else:
                out += [Variant(name, f"gcn-{m}", {"retriever.kind": "gcn",
                                                   "retriever.layers_mode": m}, LLM_ONLY)
                        for m in modes]
        elif name == "k":
            if rc.kind == "none":
                notes.append("eval.ablations 'k' skipped: retriever.kind=none retrieves nobody")
                continue
            for k in sorted({int(k) for k in cfg.eval.ablation_ks} - {int(rc.k)}):
                out.append(Variant(name, f"k{k}", {"retriever.k": k}))
        elif name == "llm_retriever":
            if rc.kind == "llm":
                notes.append("eval.ablations 'llm_retriever': the run itself uses retriever.kind"
                             "=llm")
                continue
            out.append(Variant(name, "llmretr", {"retriever.kind": "llm"}, LLM_ONLY))
    return out, notes


def derive(cfg: DictConfig, v: Variant) -> DictConfig:
    """The sibling run's config: ``cfg`` + ``v.overrides``, run name ``<run>-<suffix>``."""
    child = cfg.copy()
    child.run.name = f"{cfg.run.name}-{v.suffix}"
    for key, value in v.overrides.items():
        OmegaConf.update(child, key, value, merge=False)
    child.eval.ablations = []
    if "ablation_ks" in child.eval:
        child.eval.ablation_ks = []
    return child


def reuse_parent_stages(parent: DictConfig, child: DictConfig, stages: list[str]) -> list[str]:
    """Copy the parent's finished stages whose fingerprint equals the child's (e.g. ``data``)
    into the child's run folder, unless the child's own are up to date. Returns those copied."""
    copied = []
    for name in stages:
        src, dst = run_dir(parent) / name, run_dir(child) / name
        if stage_status(child, name)[0] or not (src / MARKER).is_file():
            continue
        if fingerprint(parent, name) != fingerprint(child, name) or not stage_status(parent,
                                                                                      name)[0]:
            continue
        copied.append(name)
        if not is_global_zero():  # rank zero copies, the others wait at the barrier below
            continue
        tmp = dst.with_name(f".{name}.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    barrier()
    return copied


def run_variant(cfg: DictConfig, v: Variant, execute: bool) -> dict[str, Any]:
    """Run (``execute``) or just read a sibling run; its collected results with what it is."""
    child = derive(cfg, v)
    info: dict[str, Any] = {"ablation": v.ablation, "run": str(child.run.name),
                            "overrides": v.overrides, "stages_run": v.stages, "error": None}
    if execute:
        try:
            copied = reuse_parent_stages(cfg, child, v.stages)
            if copied:
                print(f"[gcnee] report: sibling run '{child.run.name}' reuses stage(s) "
                      f"{', '.join(copied)} of '{cfg.run.name}'")
            print(f"[gcnee] report: sibling run '{child.run.name}' ({v.override_text()})")
            run_pipeline(child, v.stages)
        except Exception as err:  # noqa: BLE001 - one failed sibling must not lose the report
            info["error"] = f"{type(err).__name__}: {err}"
            print(f"[gcnee] report: sibling run '{child.run.name}' failed: {info['error']}",
                  file=sys.stderr)
    info.update(describe(child, collect_run(child)))
    return info


def describe(cfg: DictConfig, run: dict[str, Any]) -> dict[str, Any]:
    """What the tables need from one run: its retriever settings, the tuned LLM's test metrics,
    and the exit sweep's full-depth row and the row of the setting the run serves
    (:func:`gcnee.report.collect.served_row`)."""
    llm = (run.get("llm") or {}).get("metrics") or {}
    sweep = (run.get("exits") or {}).get("sweep") or {}
    rows = sweep.get("rows") or []
    early_exit, setting = served_row(sweep, cfg.eval)
    return {
        "run": str(cfg.run.name), "kind": str(cfg.retriever.kind), "k": int(cfg.retriever.k),
        "layers_mode": str(cfg.retriever.layers_mode),
        "stages": {n: s["status"] for n, s in run["stages"].items()},
        "llm_test": (llm.get("test") or {}).get("tuned"),
        "full": full_row(rows),
        "early_exit": early_exit, "early_exit_setting": setting,
    }


def _metric(m: dict[str, Any] | None, rps: float | None = None) -> dict[str, Any] | None:
    if not m:
        return None
    out = {k: m.get(k) for k in ("auc", "auc_lo", "auc_hi", "log_loss", "accuracy", "n")
           if m.get(k) is not None}
    if m.get("n_auc") is not None:
        out["n"] = m["n_auc"]
    if rps is not None or m.get("rps") is not None:
        out["rps"] = rps if rps is not None else m["rps"]
    if m.get("mean_exit_layer") is not None:
        out["mean_exit_layer"] = m["mean_exit_layer"]
    return out


def _find(runs: list[dict[str, Any]], kind: str, cfg: DictConfig, **want: Any) -> dict | None:
    for r in runs:
        if r["kind"] != kind:
            continue
        if kind != "none" and r["k"] != want.get("k", int(cfg.retriever.k)):
            continue
        if kind == "gcn" and r["layers_mode"] != want.get("layers_mode",
                                                          str(cfg.retriever.layers_mode)):
            continue
        return r
    return None


def table2(cfg: DictConfig, runs: list[dict[str, Any]], baselines: dict | None
           ) -> list[dict[str, Any]]:
    """The paper's Table 2 rows (test AUC): traditional models, TALLRec, LLM-retriever,
    GCN-retriever, GCN-earlyexit; rows the run lacks say which override produces them."""
    rows: list[dict[str, Any]] = []
    models = (baselines or {}).get("models") or {}
    for key, label in TRADITIONAL:
        r = models.get(key)
        rows.append({"category": "full-shot", "model": label,
                     "metrics": _metric(r["subset"]) if r else None,
                     "source": "baselines stage (LLM's test subset)" if r else None,
                     "how": None if r else f"baselines.models=[{key}] (or all: "
                                           "baselines.models=[deepfm,din,gru4rec,sim])"})
    retr = "eval.ablations=[retrieval]"
    for label, kind, how in (("TALLRec", "none", f"{retr} (sibling with retriever.kind=none)"),
                             ("LLM-retriever", "llm", "eval.ablations=[llm_retriever]"),
                             ("GCN-retriever", "gcn", f"retriever.kind=gcn or {retr}")):
        r = _find(runs, kind, cfg)
        m = _metric(r["llm_test"]) if r else None
        rows.append({"category": "few-shot", "model": label, "metrics": m,
                     "source": f"llm stage of run '{r['run']}'" if m else None,
                     "how": None if m else how})
    r = _find(runs, "gcn", cfg)
    m = _metric(r["early_exit"]) if r else None
    rows.append({"category": "few-shot", "model": "GCN-earlyexit", "metrics": m,
                 "source": (f"exit sweep of run '{r['run']}', "
                            f"{r['early_exit_setting']}") if m else None,
                 "how": None if m else (
                     f"retriever.kind=gcn or {retr}, with the exits stage and eval.threshold/"
                     "eval.window among the swept values")})
    return rows


def table4(cfg: DictConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retriever on/off x early exit on/off: AUC (95% CI) and RPS from the exit sweeps."""
    main = runs[0]
    pair = [main] + [r for r in runs[1:] if r["ablation"] == "retrieval"]
    rows = []
    for r in sorted(pair, key=lambda r: r["kind"] != "none"):
        for ee, key in (("w/o", "full"), ("w/", "early_exit")):
            rows.append({"retriever": "w/o" if r["kind"] == "none" else f"w/ ({r['kind']})",
                         "early_exit": ee, "run": r["run"], "metrics": _metric(r[key])})
    return rows


def read_tuned_scores(folder: Path) -> dict[int, tuple[int, float]] | None:
    """``{sample_id: (label, tuned P(yes))}`` from an llm stage's ``scores_test.csv``."""
    import csv

    path = folder / "llm" / "scores_test.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return {int(r["sample_id"]): (int(r["label"]), float(r["tuned"]))
                for r in csv.DictReader(f)}


def paired_gain(cfg: DictConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Tuned test AUC with retrieval minus without, on the same samples: paired bootstrap CI
    (tighter than comparing the two runs' own intervals). None unless both runs scored the
    same test samples."""
    from gcnee.metrics import auc_diff_ci

    pair = [runs[0]] + [r for r in runs[1:] if r["ablation"] == "retrieval"]
    with_r = next((r for r in pair if r["kind"] != "none"), None)
    without = next((r for r in pair if r["kind"] == "none"), None)
    if with_r is None or without is None:
        return None
    base = Path(cfg.run.checkpoints_dir)
    a, b = read_tuned_scores(base / with_r["run"]), read_tuned_scores(base / without["run"])
    if not a or not b or sorted(a) != sorted(b):
        return None
    ids = sorted(a)
    y = [a[i][0] for i in ids]
    d, lo, hi = auc_diff_ci(y, [a[i][1] for i in ids], [b[i][1] for i in ids],
                            n_boot=int(cfg.eval.bootstrap), seed=int(cfg.run.seed))
    return {"with": with_r["run"], "without": without["run"], "kind": with_r["kind"],
            "auc_diff": d, "lo": lo, "hi": hi, "n": len(ids)}


def table3(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LightGCN layer average vs last layer: the tuned LLM's test AUC."""
    main = runs[0]
    pair = ([main] if main["kind"] == "gcn" else []) + [r for r in runs[1:]
                                                       if r["ablation"] == "layers"]
    return [{"layers_mode": r["layers_mode"], "run": r["run"], "metrics": _metric(r["llm_test"])}
            for r in sorted(pair, key=lambda r: r["layers_mode"])]


def figure5(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By number of retrieved users k: tuned AUC, full-depth and early-exit AUC/RPS."""
    main = runs[0]
    ks = ([main] if main["kind"] != "none" else []) + [r for r in runs[1:]
                                                       if r["ablation"] == "k"]
    return [{"k": r["k"], "run": r["run"], "llm": _metric(r["llm_test"]),
             "full": _metric(r["full"]), "early_exit": _metric(r["early_exit"])}
            for r in sorted(ks, key=lambda r: r["k"])]


def plot_figure5(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """AUC and RPS (early exit where the sweep has it, else full depth) against k."""
    pts = [(r["k"], r["early_exit"] or r["full"]) for r in rows]
    pts = [(k, m) for k, m in pts if m and m.get("rps") is not None]
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gcnee.stages import atomic_path

    x = [k for k, _ in pts]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(x, [m["auc"] for _, m in pts], "o-", color="tab:blue", label="AUC")
    ax1.set_xlabel("retrieved users k")
    ax1.set_ylabel("AUC", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [m["rps"] for _, m in pts], "s-", color="tab:red", label="RPS")
    ax2.set_ylabel("requests / s", color="tab:red")
    ax1.set_title("AUC and RPS by number of retrieved users (early exit)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
