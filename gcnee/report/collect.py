"""Read what the stages of a run wrote into ``checkpoints/<run>/<stage>/`` for the report.

Nothing here runs a stage: a stage that has not finished is reported as ``not run``, one whose
completion marker does not match the config as ``outdated`` (with the reason), and its section is
filled from whatever it wrote last. Each ``*_section`` function takes a stage's summary (the
``summary`` of its ``_SUCCESS.json``) and returns the JSON-able part the report shows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gcnee.paths import portable
from gcnee.run import run_dir, stage_states
from gcnee.stages import read_json


def report_dir(cfg: DictConfig) -> Path:
    """``<run.logs_dir>/<run.name>``: where ``report.md`` and ``report.json`` go."""
    return Path(cfg.run.logs_dir) / str(cfg.run.name)


def data_section(s: dict[str, Any]) -> dict[str, Any]:
    """Users/items/interactions, samples and positive rate per split, skipped lines per file."""
    a = s.get("after_reading", {})
    return {
        "format": s.get("format"), "path": s.get("path"),
        "users": a.get("users"), "items": a.get("items"), "interactions": a.get("interactions"),
        "before_filtering": s.get("before_filtering"),
        "items_without_title": s.get("items_without_title"),
        "samples": (s.get("samples") or {}).get("total"),
        "label": (s.get("samples") or {}).get("label"),
        "split": s.get("split"),
        "splits": s.get("splits", {}),
        "few_shot": s.get("few_shot"),
        "classes": s.get("classes") or {},
        "warnings": s.get("warnings") or [],
        "graph_interactions": (s.get("graph") or {}).get("interactions"),
        "history_length": s.get("history_length"),
        "skipped_lines": {f["path"]: {"lines": f.get("lines"), "skipped": f.get("bad"),
                                      "reasons": f.get("reasons", {})}
                          for f in s.get("files", [])},
    }


def retriever_section(s: dict[str, Any]) -> dict[str, Any]:
    """Kind, graph size, validation recall@k of the retriever vs popularity, seconds, cold start."""
    recall = {}
    for key, value in s.items():
        m = re.fullmatch(r"val_recall@(\d+)_(\w+)", key)
        if m:
            recall["k"] = int(m.group(1))
            recall[m.group(2)] = value
    return {
        "kind": s.get("kind"), "k": s.get("k"), "layers_mode": s.get("layers_mode"),
        "users": s.get("users"), "items": s.get("items"), "edges": s.get("edges"),
        "recall": recall,
        "train_seconds": s.get("train_seconds"), "epochs_run": s.get("epochs_run"),
        "search_seconds": s.get("search_seconds"),
        "cold_start": s.get("cold_start", {}),
    }


def llm_section(s: dict[str, Any]) -> dict[str, Any]:
    """Per split and scorer (tuned, untuned, item_mean, history_mean): AUC, 95% CI, log-loss..."""
    return {k: s.get(k) for k in ("metrics", "train_samples", "truncated", "prompt_tokens",
                                  "final_train_loss", "seconds")}


def exits_section(s: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Per-head AUC (validation from the stage's metrics, test from the sweep), the sweep rows
    and the plots the exit stage drew."""
    out: dict[str, Any] = {"layers": s.get("layers", []), "seconds": s.get("seconds")}
    val = {int(k.rsplit("_", 1)[1]): v for k, v in (s.get("val") or {}).items()
           if k.startswith("val/auc/head_")}
    sweep_path = folder / "sweep.json"
    sweep = read_json(sweep_path) if sweep_path.is_file() else None
    test = {int(k): v for k, v in (sweep or {}).get("head_auc", {}).items()}
    out["head_auc"] = [{"layer": layer, "val_auc": val.get(layer), "test_auc": test.get(layer)}
                       for layer in out["layers"]]
    if sweep is not None:
        out["sweep"] = {k: sweep.get(k) for k in ("rows", "batch_size", "rule", "device",
                                                  "threads", "chosen", "max_auc_loss",
                                                  "calibration", "n_val", "layers")}
    out["train_samples"] = s.get("train_samples")
    out["plots"] = sorted(p.name for p in folder.glob("sweep_*.png"))
    return out


def configured_row(rows: list[dict[str, Any]], eval_cfg: Any,
                   calibrated: bool = False) -> dict[str, Any] | None:
    """The sweep row of the configured exit rule (``eval.rule`` at ``eval.threshold``,
    ``eval.window``) as it is served: with calibrated scores when the heads are calibrated,
    the rule reading ``eval.rule_reads``; None when the sweep did not include that setting."""
    rule = str(eval_cfg.rule)
    tau, m = float(eval_cfg.threshold), int(eval_cfg.window)
    reads = str(eval_cfg.get("rule_reads", "raw")) if calibrated else "raw"
    for r in rows:
        if r.get("rule") != rule:
            continue
        if r.get("tau") is not None and abs(float(r["tau"]) - tau) > 1e-12:
            continue
        if r.get("m") is not None and int(r["m"]) != m:
            continue
        if "calibrated" in r and (bool(r["calibrated"]) != calibrated
                                  or r.get("reads", "raw") != reads):
            continue
        return r
    return None


def served_row(sweep: dict[str, Any], eval_cfg: Any) -> tuple[dict[str, Any] | None, str]:
    """The sweep row of the exit setting the run serves (``gcnee.run.apply_chosen_setting``)
    and, in words, which it is: with ``eval.exit_setting=chosen`` the setting the exit stage
    chose on validation, else (or with no choice recorded) the configured one
    (:func:`configured_row`)."""
    rows = sweep.get("rows") or []
    chosen = sweep.get("chosen")
    if str(eval_cfg.get("exit_setting", "chosen")) == "chosen" and chosen:
        row = next((r for r in rows if r.get("row") == chosen.get("row")), None)
        if row is not None:
            return row, f"{row['row']}, chosen on validation"
    row = configured_row(rows, eval_cfg, calibrated=bool(sweep.get("calibration")))
    return row, (f"rule {eval_cfg.rule} tau={eval_cfg.threshold} m={eval_cfg.window} "
                 "(eval.rule/threshold/window)")


def full_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The full-depth (no early exit) row of a sweep."""
    return next((r for r in rows if r.get("kind") == "full"), None)


def baselines_section(s: dict[str, Any]) -> dict[str, Any]:
    """Per traditional model: AUC (CI), log-loss on the LLM's test subset and the full test."""
    return {"models": s.get("models", {}), "eval_subset": s.get("eval_subset"),
            "test_samples": s.get("test_samples"), "train_samples": s.get("train_samples"),
            "note": s.get("note")}


def collect_run(cfg: DictConfig) -> dict[str, Any]:
    """Everything the report shows about one run (no ablations): stage states and sections."""
    states = stage_states(cfg)
    # Relative to the working directory where it lies inside it: report.json moves with the run.
    out: dict[str, Any] = {"run": str(cfg.run.name),
                           "checkpoints": portable(run_dir(cfg), Path.cwd()),
                           "stages": {n: {k: v for k, v in st.items() if k != "summary"}
                                      for n, st in states.items()}}
    base = run_dir(cfg)
    for name, fn in (("data", data_section), ("retriever", retriever_section),
                     ("llm", llm_section), ("baselines", baselines_section)):
        st = states.get(name)
        out[name] = fn(st["summary"]) if st and st["summary"] is not None else None
    st = states.get("exits")
    out["exits"] = (exits_section(st["summary"], base / "exits")
                    if st and st["summary"] is not None else None)
    return out
