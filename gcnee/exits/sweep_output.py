"""What the early-exit sweep writes: ``sweep.{json,csv,md}``, the Pareto plot (test AUC against
measured speedup, every rule with and without calibration, the fixed-layer baseline), the paper's
AUC/RPS-by-τ and by-m plots, and TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gcnee.stages import atomic_path, write_json

COLUMNS = ["row", "kind", "rule", "tau", "m", "layer", "calibrated", "reads", "auc", "auc_lo",
           "auc_hi", "auc_diff", "auc_diff_lo", "auc_diff_hi", "val_auc", "val_auc_loss",
           "val_ideal_speedup", "rps", "speedup", "ideal_speedup", "timed_ideal_speedup",
           "achieved_fraction",
           "mean_exit_layer", "replay_mismatches", "n_auc", "n_rps"]


def _f(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def format_sweep(result: dict[str, Any]) -> str:
    """A markdown table of the sweep rows and a line naming the setting chosen on validation."""
    lines = ["| setting | test AUC [95% CI] | − full depth [paired CI] | val AUC | speedup "
             "(RPS) | ideal | achieved / ideal | mean exit layer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        diff = ("–" if r["kind"] == "full" else
                f"{_f(r['auc_diff'], signed=True)} [{_f(r['auc_diff_lo'], signed=True)}, "
                f"{_f(r['auc_diff_hi'], signed=True)}]")
        lines.append(f"| {r['row']} | {_f(r['auc'])} [{_f(r['auc_lo'])}, {_f(r['auc_hi'])}] | "
                     f"{diff} | {_f(r.get('val_auc'))} | {r['speedup']:.2f}× "
                     f"({r['rps']:.2f}) | {r['ideal_speedup']:.2f}× | "
                     f"{r['achieved_fraction']:.2f} | {r['mean_exit_layer']:.1f} |")
    c = result.get("chosen")
    if c is None:
        lines += ["", "No setting chosen (no validation probabilities)."]
    else:
        lines += ["", f"Chosen on validation (AUC loss ≤ {result['max_auc_loss']:.3f}, largest "
                      f"ideal speedup): **{c['row']}** — validation AUC {_f(c['val_auc'])} "
                      f"(loss {_f(c['val_auc_loss'], signed=True)}), test AUC {_f(c['auc'])}, "
                      f"− full depth {_f(c['auc_diff'], signed=True)} "
                      f"[{_f(c['auc_diff_lo'], signed=True)}, "
                      f"{_f(c['auc_diff_hi'], signed=True)}], measured speedup "
                      f"{c['speedup']:.2f}× ({c['rps']:.2f} RPS; ideal "
                      f"{c['ideal_speedup']:.2f}×)."]
    return "\n".join(lines)


def write_sweep(result: dict[str, Any], out_dir: str | Path, logger: Any = None) -> list[Path]:
    """CSV, JSON, markdown and PNG plots under ``out_dir``; scalars to a TensorBoard logger."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", result)
    layers = result["layers"]
    with atomic_path(out / "sweep.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS + [f"exit_share_l{x}" for x in layers])
            for r in result["rows"]:
                w.writerow([r.get(c) for c in COLUMNS]
                           + [r["exit_share"].get(x, 0.0) for x in layers])
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(format_sweep(result) + "\n")
    paths = [out / "sweep.json", out / "sweep.csv", out / "sweep.md",
             _pareto(result, out / "sweep_pareto.png")]
    full = result["rows"][0]
    calibrated = any(r["calibrated"] for r in result["rows"])
    for kind, xlabel, name in (("tau", "threshold τ", "sweep_threshold.png"),
                               ("m", "window m", "sweep_window.png")):
        # The paper's figures, for the variant served by default (calibrated when there is one).
        rows = [r for r in result["rows"] if r["kind"] == kind
                and r["calibrated"] == calibrated and r["reads"] == "raw"]
        if rows:
            paths.append(_plot(rows, full, kind, xlabel, out / name))
    if logger is not None and hasattr(logger, "experiment"):
        exp = logger.experiment
        for i, r in enumerate(result["rows"]):
            for key in ("auc", "rps", "mean_exit_layer", "speedup"):
                exp.add_scalar(f"sweep/{key}", r[key], i)
            exp.add_text("sweep/rows", f"{i}: {r['row']}", i)
        for layer, a in result["head_auc"].items():
            exp.add_scalar(f"sweep/head_auc/layer_{int(layer):02d}", a, 0)
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"window": "tab:blue", "confidence": "tab:orange", "patience": "tab:green"}
    rows = result["rows"]
    for rule, color in colors.items():
        for cal, reads, marker, fill in ((False, "raw", "o", "none"), (True, "raw", "s", color),
                                         (True, "calibrated", "^", color)):
            pts = [r for r in rows if r["rule"] == rule and r["calibrated"] == cal
                   and r["reads"] == reads]
            if pts:
                how = "raw" if not cal else ("calibrated" if reads == "raw"
                                             else "calibrated, rule on calibrated P")
                ax.scatter([r["speedup"] for r in pts], [r["auc"] for r in pts], marker=marker,
                           facecolors=fill, edgecolors=color, label=f"{rule} ({how})", s=36)
    fixed = sorted((r for r in rows if r["rule"] == "fixed"), key=lambda r: r["speedup"])
    if fixed:
        ax.plot([r["speedup"] for r in fixed], [r["auc"] for r in fixed], "k.--", lw=1,
                label="every request at layer l")
        for r in fixed:
            ax.annotate(str(r["layer"]), (r["speedup"], r["auc"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    full = rows[0]
    ax.axhline(full["auc"], color="grey", lw=1, ls=":")
    ax.scatter([full["speedup"]], [full["auc"]], marker="D", color="black", label="full depth")
    c = result.get("chosen")
    if c is not None:
        ax.scatter([c["speedup"]], [c["auc"]], marker="*", s=220, color="red", zorder=5,
                   label=f"chosen on validation: {c['row']}")
    ax.set_xlabel("measured speedup over full depth (RPS ratio, interleaved repeats)")
    ax.set_ylabel("test AUC")
    ax.set_title("Early exit: AUC against speed")
    ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _plot(rows: list[dict], full: dict, kind: str, xlabel: str, path: Path) -> Path:
    plt = _pyplot()
    x = [r["tau"] if kind == "tau" else r["m"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(x, [r["auc"] for r in rows], "o-", color="tab:blue", label="AUC (early exit)")
    ax1.fill_between(x, [r["auc_lo"] for r in rows], [r["auc_hi"] for r in rows],
                     color="tab:blue", alpha=0.15)
    ax1.axhline(full["auc"], color="tab:blue", ls="--", lw=1, label="AUC (full depth)")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("AUC", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [r["rps"] for r in rows], "s-", color="tab:red", label="RPS (early exit)")
    ax2.axhline(full["rps"], color="tab:red", ls="--", lw=1, label="RPS (full depth)")
    ax2.set_ylabel("requests / s", color="tab:red")
    if kind == "tau" and min(x) > 0 and max(x) / min(x) > 20:
        ax1.set_xscale("log")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax1.set_title(f"AUC and RPS by {xlabel}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
