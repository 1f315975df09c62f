"""What a benchmark result is read with: the machine it ran on and markdown tables.

Every bench JSON carries :func:`machine_info` (CPU model, cores, torch threads, GPU, library
versions, load average) because the machines are shared: a number without the load it was
measured under cannot be compared with another. :func:`format_report` turns the results of
``gcnee bench all`` into the markdown of ``bench.md`` (and the README).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "lightning", "peft", "torch_geometric")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores (all / usable by this process), torch threads, GPU, versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table. Cells are ``str()``-ed (floats: use :func:`fmt` first); ``|``
    inside a cell is escaped. ``align``: one of ``l``/``r``/``c`` per column (default ``l``)."""
    if align is not None and len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    marks = {"l": "---", "r": "---:", "c": ":---:"}

    def cell(x: Any) -> str:
        return "" if x is None else str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in (align or "l" * len(headers))) + "|"]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row {list(r)} has {len(r)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(cell(x) for x in r) + " |")
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    """``x`` with ``digits`` decimals (``-`` for None/NaN)."""
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}{suffix}"


def format_machine(info: dict[str, Any]) -> str:
    """One markdown paragraph: machine, threads, versions, load average."""
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items() if val)
    load = info.get("load_average")
    load_s = ", ".join(f"{x:.2f}" for x in load) if load else "n/a"
    gpu = info["gpu"] or "none"
    return (f"Machine: {info['cpu']}, {info['cores_usable'] or info['cores']} usable cores, "
            f"torch threads {info['torch_threads']}, GPU {gpu}; Python {info['python']}, {v}. "
            f"Load average (1/5/15 min) {load_s}.")


def format_exit(res: dict[str, Any]) -> str:
    """The early-exit table: one row per (batch size, variant)."""
    rows = []
    for r in res["rows"]:
        rows.append([r["batch_size"], r["variant"], fmt(r["rps"], 2), fmt(r["mean_exit_layer"], 1),
                     fmt(r["computed_layers_per_row"], 1), fmt(r["ideal_speedup"], 2, "×"),
                     fmt(r["speedup"], 2, "×"), fmt(r["achieved_fraction"], 2),
                     fmt(r.get("speedup_cpu"), 2, "×"), fmt(r.get("achieved_fraction_cpu"), 2)])
    table = markdown_table(
        ["batch", "variant", "RPS", "mean exit layer", "layers computed / row", "ideal speedup",
         "achieved speedup", "achieved / ideal", "achieved (CPU time)", "achieved / ideal (CPU)"],
        rows, align="rlrrrrrrrr")
    return (f"{table}\n\n{res['n_requests']} test prompts (mean {res['mean_prompt_tokens']:.0f} "
            f"tokens), {res['num_layers']} decoder layers, exit heads at {res['exit_layers']}, "
            f"rule {res['rule']}; medians of {res['repeats']} interleaved repeats. Head cost "
            f"{res['head_cost_layers']:.2e} layer-equivalents per evaluation (FLOPs). Speedups are "
            f"medians of ratios paired by repeat, from wall time and from process CPU time.")


def format_scoring(res: dict[str, Any]) -> str:
    rows = [[p["path"], fmt(p["rps"], 2), fmt(p["speedup_vs_generate"], 2, "×"),
             fmt(p.get("speedup_vs_generate_cpu"), 2, "×"), f"{p['max_abs_diff']:.1e}"]
            for p in res["paths"]]
    table = markdown_table(["scoring path", "RPS", "vs generate", "vs generate (CPU time)",
                            "max |ΔP(yes)|"], rows, align="lrrrr")
    return (f"{table}\n\n{res['n_requests']} test prompts (mean {res['mean_prompt_tokens']:.0f} "
            f"tokens), batch size {res['batch_size']}, identical padded batches for every path, "
            f"attention {res.get('attention', '?')} unless the row says otherwise; "
            f"medians of {res['repeats']} interleaved repeats.")


def format_retrieval(res: dict[str, Any]) -> str:
    rows = [["GCN (LightGCN propagation + cosine top-k)",
             f"{res['gcn_seconds_per_user'] * 1e3:.3f}"],
            [f"LLM embeddings ({res['llm_model']})", f"{res['llm_seconds_per_user'] * 1e3:.1f}"]]
    table = markdown_table(["retriever", "ms / user"], rows, align="lr")
    return (f"{table}\n\n{res['subset_users']} of {res['users']} users, k = {res['k']}: GCN is "
            f"{res['speedup_gcn_over_llm']:.3g}× faster per user (LLM model load excluded).")


def format_train(res: dict[str, Any]) -> str:
    rows = [[s["stage"], s["batch_size"], fmt(s["mean_tokens"], 0), fmt(s["seconds_per_step"], 2),
             fmt(s["samples_per_second"], 2)] for s in res["stages"]]
    table = markdown_table(["training step", "batch", "mean tokens", "s / step", "samples / s"],
                           rows, align="lrrrr")
    return (f"{table}\n\nMedian of {res['steps']} optimizer steps after {res['warmup']} warm-up "
            f"step(s), real batches of the config's training split.")


def format_precision(res: dict[str, Any]) -> str:
    rows = [[v["variant"], fmt(v["rps"], 2), fmt(v["speedup"], 2, "×"), f"{v['auc']:.4f}",
             f"{v['auc_diff']:+.4f}", f"{v['spearman']:.4f}", f"{v['max_abs_diff']:.1e}",
             f"{v['mean_abs_diff']:.1e}"] for v in res["variants"]]
    table = markdown_table(["precision", "RPS", "speedup", "AUC", "AUC − fp32",
                            "Spearman vs fp32", "max |ΔP|", "mean |ΔP|"], rows, align="lrrrrrrr")
    return (f"{table}\n\n{res['n_requests']} test prompts ({res['positives']} positive, mean "
            f"{res['mean_prompt_tokens']:.0f} tokens), batch size {res['batch_size']}; "
            f"medians of {res['repeats']} interleaved repeat(s).")


SECTIONS = (("exit", "Early exit: RPS, ideal and achieved speedup", format_exit),
            ("scoring", "Scoring: our full-depth path vs `generate`", format_scoring),
            ("retrieval", "Retrieval: GCN vs LLM embeddings", format_retrieval),
            ("train", "Training throughput", format_train),
            ("precision", "Precision: fp32 vs bf16 scoring", format_precision))


def format_report(results: dict[str, Any], command: str | None = None) -> str:
    """Markdown for ``bench.md``: command, machine, then one section per bench that ran."""
    parts = ["# gcnee benchmarks", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    if "machine" in results:
        parts += [format_machine(results["machine"]), ""]
    for key, title, fn in SECTIONS:
        if key in results:
            parts += [f"## {title}", "", fn(results[key]), ""]
    if "load_average_end" in results and results["load_average_end"]:
        parts += ["Load average at the end: "
                  + ", ".join(f"{x:.2f}" for x in results["load_average_end"]) + "."]
    return "\n".join(parts).rstrip() + "\n"
