"""``report.json`` -> ``report.md``: one markdown section per stage, tables, plots, machine."""

from __future__ import annotations

from typing import Any

from gcnee.bench.report import fmt, markdown_table

SCORER_NAMES = {"tuned": "LLM tuned", "untuned": "LLM untuned", "item_mean": "item mean (train)",
                "history_mean": "history mean (prompt)"}


def _n(x: Any) -> str:
    return "-" if x is None else f"{x:,}" if isinstance(x, int) else str(x)


def _auc(m: dict[str, Any] | None) -> str:
    if not m or m.get("auc") is None:
        return "-"
    ci = (f" [{m['auc_lo']:.3f}, {m['auc_hi']:.3f}]"
          if m.get("auc_lo") is not None and m["auc_lo"] == m["auc_lo"] else "")
    return f"{m['auc']:.4f}{ci}"


def _missing(report: dict[str, Any], stage: str) -> str:
    st = report["stages"].get(stage, {})
    return (f"_Stage `{stage}` {st.get('status', 'not registered')}: run "
            f"`gcnee fit --config <config> --stages {stage}`._")


def stages_md(report: dict[str, Any]) -> str:
    rows = [[name, st["status"] + (f" ({st['why']})" if st.get("why") and st["status"] ==
                                   "outdated" else ""),
             fmt(st.get("seconds"), 1), st.get("finished") or "-"]
            for name, st in report["stages"].items()]
    total = sum(st.get("seconds") or 0 for st in report["stages"].values())
    return (markdown_table(["stage", "status", "wall time (s)", "finished"], rows, align="llrl")
            + f"\n\nTotal wall time of the finished stages: {total:.1f} s.")


def data_md(d: dict[str, Any]) -> str:
    lines = [f"{d['format']} from `{d['path']}`: {_n(d['users'])} users, {_n(d['items'])} items, "
             f"{_n(d['interactions'])} interactions; {_n(d['samples'])} samples "
             f"(label = {d['label']}), split `{d['split']}`, {_n(d['few_shot'])} few-shot "
             f"training samples, retriever graph {_n(d['graph_interactions'])} interactions.", ""]
    rows = [[name, _n(s.get("samples")), _n(s.get("users")), fmt(s.get("positive_rate"), 3)]
            for name, s in d["splits"].items()]
    lines.append(markdown_table(["split", "samples", "users", "positive rate"], rows, "lrrr"))
    classes = d.get("classes") or {}
    if classes:
        crows = [[name.replace("_", " "), _n(c.get("positives")), _n(c.get("negatives")),
                  ", ".join(f"{k}={v}" for k, v in c.items()
                            if k not in ("positives", "negatives", "samples")) or "-"]
                 for name, c in classes.items()]
        lines += ["", "Classes of the sets the LLM is tuned and evaluated on (few positives or "
                  "negatives mean wide AUC intervals):", "",
                  markdown_table(["set", "positives", "negatives", "drawn with"], crows, "lrrl")]
    for w in d.get("warnings") or []:
        lines += ["", f"**Warning:** {w}"]
    skipped = [[f"`{path}`", _n(f["lines"]), _n(f["skipped"]),
                ", ".join(f"{k}: {v}" for k, v in f["reasons"].items()) or "-"]
               for path, f in d["skipped_lines"].items()]
    if skipped:
        lines += ["", markdown_table(["file", "lines", "skipped", "reasons"], skipped, "lrrl")]
    return "\n".join(lines)


def retriever_md(r: dict[str, Any]) -> str:
    rec = r["recall"]
    k = rec.get("k")
    kind = r["kind"]
    parts = [f"`retriever.kind={kind}`, k = {r['k']}"
             + (f", layers `{r['layers_mode']}`" if kind == "gcn" else "")
             + f"; graph of {_n(r['users'])} users, {_n(r['items'])} items, {_n(r['edges'])} "
             "edges."]
    if k is not None:
        rows = [[name, f"{v:.4f}"] for name, v in rec.items() if name != "k"]
        parts += ["", markdown_table(["scorer", f"validation recall@{k}"], rows, "lr")]
    parts += ["", f"Seconds to train: {fmt(r['train_seconds'], 1)} "
              f"({_n(r['epochs_run'])} epochs); to retrieve (embed + top-k search, all users): "
              f"{fmt(r['search_seconds'], 3)}."]
    cold = r.get("cold_start") or {}
    if cold:
        keys = sorted({k for c in cold.values() for k in c if k != "samples"})
        rows = [[split, _n(c.get("samples"))] + [_n(c.get(k, 0)) for k in keys]
                for split, c in cold.items()]
        parts += ["", "Cold start (how each evaluation sample's user is served):", "",
                  markdown_table(["split", "samples", *keys], rows, "l" + "r" * (len(keys) + 1))]
    return "\n".join(parts)


def llm_md(m: dict[str, Any]) -> str:
    rows = []
    for split in ("test", "val"):
        for name, s in ((m.get("metrics") or {}).get(split) or {}).items():
            rows.append([split, SCORER_NAMES.get(name, name), _auc(s), fmt(s.get("log_loss"), 4),
                         fmt(s.get("accuracy"), 3), _n(s.get("n"))])
    out = markdown_table(["split", "scorer", "AUC [95% CI]", "log-loss", "accuracy", "n"], rows,
                         "llrrrr")
    for split in ("test", "val"):
        for name, s in ((m.get("metrics") or {}).get(split) or {}).items():
            if s.get("tuned_minus_auc") is not None:
                out += (f"\n\n{SCORER_NAMES.get(name, name)} was scored on {_n(s.get('n'))} of "
                        f"the {split} samples (`eval.untuned_max_samples`): there the tuned "
                        f"model's AUC is {fmt(s.get('tuned_auc_same_samples'), 4)}, tuned − "
                        f"untuned {s['tuned_minus_auc']:+.4f} [{s['tuned_minus_auc_lo']:+.3f}, "
                        f"{s['tuned_minus_auc_hi']:+.3f}] (paired bootstrap).")
    return (out + f"\n\n{_n(m.get('train_samples'))} few-shot training samples; final training "
            f"loss {fmt(m.get('final_train_loss'), 4)}; truncated prompts "
            f"{m.get('truncated')}; prompt tokens {m.get('prompt_tokens')}. Item/history means "
            "are rating-scale scorers (no log-loss).")


def exits_md(e: dict[str, Any]) -> str:
    rows = [[h["layer"], fmt(h["val_auc"], 4), fmt(h["test_auc"], 4)] for h in e["head_auc"]]
    parts = ["Per-head AUC:", "", markdown_table(["exit layer", "val AUC", "test AUC"], rows,
                                                  "rrr")]
    if e.get("train_samples"):
        parts += ["", f"Heads trained on {_n(e['train_samples'])} training samples."]
    sweep = e.get("sweep")
    cal = (sweep or {}).get("calibration")
    if cal:
        crows = [[layer, c.get("kind"), fmt(c.get("log_loss_raw"), 4),
                  fmt(c.get("log_loss_cal"), 4), _n(c.get("n"))] for layer, c in cal.items()]
        parts += ["", "Calibration per head, fitted on validation (log-loss out of fold):", "",
                  markdown_table(["exit layer", "map", "log-loss raw", "log-loss calibrated",
                                  "n"], crows, "rlrrr")]
    if sweep:
        from gcnee.exits.sweep_output import format_sweep

        parts += ["", f"Early-exit sweep (AUC on the test split, chosen on validation; batch "
                  f"size {sweep['batch_size']}, {sweep['device']}, {sweep['threads']} "
                  "threads):", "", format_sweep(sweep)]
    parts += [""] + [f"![{p}]({p})" for p in e.get("plots", [])]
    return "\n".join(parts).rstrip()


def table2_md(rows: list[dict[str, Any]]) -> str:
    body = [[r["category"], r["model"], _auc(r["metrics"]),
             fmt((r["metrics"] or {}).get("log_loss"), 4), _n((r["metrics"] or {}).get("n")),
             r["source"] if r["metrics"] else f"not run: `{r['how']}`"] for r in rows]
    return markdown_table(["category", "model", "test AUC [95% CI]", "log-loss", "n", "source"],
                          body, "llrrrl")


def _auc_rps(m: dict[str, Any] | None) -> tuple[str, str]:
    return _auc(m), fmt((m or {}).get("rps"), 2)


def ablations_md(a: dict[str, Any]) -> str:
    parts = []
    if a.get("table4"):
        body = [[r["retriever"], r["early_exit"], *_auc_rps(r["metrics"]),
                 fmt((r["metrics"] or {}).get("mean_exit_layer"), 1), f"`{r['run']}`"]
                for r in a["table4"]]
        parts += ["### Table 4: retriever × early exit", "",
                  markdown_table(["retriever", "early exit", "test AUC [95% CI]", "RPS",
                                  "mean exit layer", "run"], body, "llrrrl"), ""]
        g = a.get("retrieval_gain")
        if g:
            parts += [f"Tuned LLM with {g['kind']} retrieval minus without, on the same "
                      f"{g['n']:,} test samples (paired bootstrap): {g['auc_diff']:+.4f} "
                      f"[{g['lo']:+.4f}, {g['hi']:+.4f}].", ""]
    if a.get("table3"):
        body = [[r["layers_mode"], _auc(r["metrics"]), f"`{r['run']}`"] for r in a["table3"]]
        parts += ["### Table 3: LightGCN layer average vs last layer", "",
                  markdown_table(["user embedding", "tuned LLM test AUC [95% CI]", "run"], body,
                                 "lrl"), ""]
    if a.get("figure5"):
        body = [[r["k"], _auc(r["llm"]), *_auc_rps(r["full"]), *_auc_rps(r["early_exit"]),
                 f"`{r['run']}`"] for r in a["figure5"]]
        parts += ["### Figure 5: by number of retrieved users k", "",
                  markdown_table(["k", "tuned LLM AUC", "full-depth AUC", "full-depth RPS",
                                  "early-exit AUC", "early-exit RPS", "run"], body, "rrrrrrl")]
        if a.get("figure5_plot"):
            parts += ["", f"![{a['figure5_plot']}]({a['figure5_plot']})"]
        parts.append("")
    for s in a.get("siblings", []):
        how = " ".join(f"{k}={v}" for k, v in s["overrides"].items())
        if s.get("error"):
            parts.append(f"- sibling run `{s['run']}` ({how}) failed: {s['error']}")
        missing = [n for n in s["stages_run"] if s["stages"].get(n) != "up to date"]
        if missing:
            parts.append(f"- sibling run `{s['run']}` ({how}): stage(s) {', '.join(missing)} "
                         "not finished or outdated; `gcnee fit --config <config> "
                         f"eval.ablations=[{s['ablation']}]` runs them")
    parts += [f"- {n}" for n in a.get("notes", [])]
    return "\n".join(parts).rstrip()


def machine_md(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    return (f"CPU {m['cpu']} ({m['cores']} cores, {m.get('cores_usable') or '-'} usable, torch "
            f"threads {m['torch_threads']}); GPU {m['gpu'] or 'none'}; Python {m['python']} on "
            f"{m['platform']}. Versions: {v}. Load average (1/5/15 min) "
            f"{m.get('load_average') or '-'}.")


def render(report: dict[str, Any]) -> str:
    """The markdown of ``report.md``."""
    parts = [f"# gcnee run report: {report['run']}", "",
             f"Generated {report['generated']} from `{report['checkpoints']}`. Reprint with "
             f"`gcnee report {report['run']}`; rebuild with `gcnee report --config <config>`.",
             "", "## Stages", "", stages_md(report)]
    sections = (("Data", "data", data_md), ("Retriever", "retriever", retriever_md),
                ("LLM (CTR scores)", "llm", llm_md), ("Exit heads and early exit", "exits",
                                                      exits_md))
    for title, key, fn in sections:
        parts += ["", f"## {title}", "", fn(report[key]) if report.get(key)
                  else _missing(report, key)]
    parts += ["", "## Table 2: comparison (test AUC)", "",
              "Traditional models: all of train, scored on the LLM's test subset. Few-shot rows "
              "from the llm stage (tuned) or the exit sweep (the setting the run serves).", "",
              table2_md(report["table2"])]
    abl = report.get("ablations") or {}
    if abl.get("requested"):
        parts += ["", "## Ablations (`eval.ablations`: " + ", ".join(abl["requested"]) + ")",
                  "", ablations_md(abl)]
    else:
        parts += ["", "## Ablations", "", "_None requested: set e.g. "
                  "`eval.ablations=[retrieval,layers,k]` for the paper's Tables 3-4 and "
                  "Figure 5._"]
    parts += ["", "## Software and hardware", "", machine_md(report["machine"])]
    return "\n".join(parts).rstrip() + "\n"
