"""The ``data`` stage: raw files -> interactions, items, CTR samples, split, graph, few-shot.

Writes ``PreparedData`` (see ``gcnee.data.tables``) and ``summary.json`` into
``checkpoints/<run>/data/``: counts before and after every filter, samples and positive rate per
split, skipped lines per file with reasons, items without titles, history lengths. Nothing is
dropped without being counted there.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gcnee.config import ConfigError
from gcnee.data.errors import DataError, DataWarning
from gcnee.data.samples import (
    build_samples,
    capped_train,
    class_counts,
    eval_subset,
    few_shot_ids,
    graph_interactions,
    split_samples,
)
from gcnee.data.tables import SPLITS, PreparedData, Sample
from gcnee.stages import StageContext, register, write_json

FETCHABLE = ("ml-100k",)
# A split whose positive rate is outside this range gets a warning: few-shot tuning on it
# teaches the LLM the prior (BookCrossing at rating >= 5: 0.964, tuned AUC below untuned).
POSITIVE_RATE_RANGE = (0.1, 0.9)


def missing_files_error(data_cfg: Any, err: DataError) -> DataError:
    """``err``, or for a config with ``data.source`` and a missing file, one message saying
    where the files come from and where they go (the paper configs)."""
    if data_cfg.source and "not found" in str(err):
        return DataError(
            f"the raw {data_cfg.format} files for this config are missing ({err}).\n"
            f"  Get them from: {data_cfg.source}\n"
            f"  Put them in:   {data_cfg.path}/ (or set data.path=...; file names: "
            f"data.interactions_file / data.items_file)")
    return err


def _fetch_if_configured(data_cfg: Any) -> None:
    if data_cfg.fetch is None:
        return
    if data_cfg.fetch not in FETCHABLE:
        raise ConfigError(
            f"data.fetch must be null or one of {', '.join(FETCHABLE)}, got {data_cfg.fetch!r}"
        )
    if data_cfg.format != "recbole":
        raise ConfigError(
            f"data.fetch={data_cfg.fetch} provides RecBole atomic files: set data.format=recbole "
            f"(got data.format={data_cfg.format!r}) or data.fetch=null"
        )
    from gcnee.data.fetch import fetch_ml100k

    fetch_ml100k(Path(data_cfg.path))


def _split_stats(samples: list[Sample]) -> dict[str, Any]:
    n = len(samples)
    return {
        "samples": n,
        "users": len({s.user for s in samples}),
        "positive_rate": round(sum(s.label for s in samples) / n, 4) if n else None,
    }


def _history_stats(samples: list[Sample]) -> dict[str, float]:
    lengths = np.array([len(s.history_items) for s in samples])
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
            "median": float(np.median(lengths)), "max": int(lengths.max())}


def class_counts_summary(prepared: PreparedData, data_cfg: Any, seed: int,
                         llm_cfg: Any = None, eval_cfg: Any = None) -> dict[str, Any]:
    """Positives and negatives of the few-shot set, of its ``llm.max_train_samples`` cap and
    of the evaluation subsets (``eval.val_max_samples`` / ``eval.max_samples``) the later
    stages draw with the same seed; the values those keys had here are recorded with them."""
    few = prepared.few_shot()
    out: dict[str, Any] = {"few_shot": class_counts(few)}
    cap = getattr(llm_cfg, "max_train_samples", None) if llm_cfg is not None else None
    if cap is not None:
        out["llm_train"] = {"llm.max_train_samples": int(cap), **class_counts(
            capped_train(few, int(cap), str(data_cfg.few_shot_balance), seed))}
    if eval_cfg is not None:
        val_max = eval_cfg.val_max_samples
        val_max = eval_cfg.max_samples if val_max is None else val_max
        for split, limit, key in (("val", val_max, "eval.val_max_samples"),
                                  ("test", eval_cfg.max_samples, "eval.max_samples")):
            out[f"eval_{split}"] = {key: limit, **class_counts(
                eval_subset(prepared.splits[split], limit, seed))}
    return out


def balance_warnings(splits: dict[str, list[Sample]], classes: dict[str, Any],
                     data_cfg: Any) -> list[str]:
    """One warning per split whose positive rate is outside ``POSITIVE_RATE_RANGE``."""
    lo, hi = POSITIVE_RATE_RANGE
    out = []
    few = classes["few_shot"]
    for name in SPLITS:
        stats = _split_stats(splits[name])
        rate = stats["positive_rate"]
        if rate is None or lo <= rate <= hi:
            continue
        msg = (f"the {name} split's positive rate is {rate:.3f}, outside [{lo}, {hi}] "
               f"(label = rating {data_cfg.label_op} {data_cfg.label_threshold})")
        if name == "train":
            msg += (f"; the few-shot set holds {few['positives']:,} positives and "
                    f"{few['negatives']:,} negatives (data.few_shot_balance="
                    f"{data_cfg.few_shot_balance}): tuned on so few of one class the LLM "
                    "learns the prior")
            if str(data_cfg.few_shot_balance) == "none":
                msg += "; set data.few_shot_balance=balanced (or stratified)"
        out.append(msg)
    return out


def prepare(data_cfg: Any, seed: int, llm_cfg: Any = None,
            eval_cfg: Any = None) -> tuple[PreparedData, dict[str, Any]]:
    """Read, sample, split; returns the prepared data and its summary (no files written).

    ``llm_cfg`` / ``eval_cfg`` (optional) only add the class counts of the LLM's training cap
    and the evaluation subsets to the summary; they do not change the prepared data.
    """
    from gcnee.data.readers import read_raw

    _fetch_if_configured(data_cfg)
    notes: list[str] = []
    try:
        if not Path(data_cfg.path).exists():
            raise DataError(f"data folder not found: {data_cfg.path} (data.path)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            raw = read_raw(data_cfg, seed=seed)
    except DataError as err:
        raise missing_files_error(data_cfg, err) from None
    for w in caught:  # kept in the summary, and shown again as the warnings they are
        if issubclass(w.category, DataWarning):
            notes.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    inter, items = raw.interactions, raw.items
    if len(inter) == 0:
        raise DataError(f"no interactions left after reading {data_cfg.path} (data.path); "
                        "see the skipped lines per file and data.keep_implicit/missing_title")
    samples = build_samples(inter, items, data_cfg)
    splits = split_samples(samples, data_cfg, seed)
    graph = graph_interactions(inter, splits)
    shots = few_shot_ids(splits["train"], data_cfg, seed)
    prepared = PreparedData(interactions=inter, graph=graph, items=items, splits=splits,
                            few_shot_ids=shots)
    classes = class_counts_summary(prepared, data_cfg, seed, llm_cfg, eval_cfg)
    balance = balance_warnings(splits, classes, data_cfg)
    for note in balance:
        warnings.warn(note, DataWarning, stacklevel=2)
    notes += balance

    n_held_out = len(splits["val"]) + len(splits["test"])
    summary = {
        "format": data_cfg.format,
        "path": str(data_cfg.path),
        "before_filtering": {"users": raw.users_before, "items": raw.items_before,
                             "interactions": raw.interactions_before},
        "after_reading": {"users": int(len(np.unique(inter.user))), "items": len(items),
                          "items_rated": int(len(np.unique(inter.item))),
                          "interactions": len(inter)},
        "items_without_title": raw.items_without_title,
        "missing_title": data_cfg.missing_title,
        "files": [asdict(f) for f in raw.files],
        "samples": {
            "total": len(samples),
            "users": len({s.user for s in samples}),
            "interactions_without_enough_history": len(inter) - len(samples),
            "min_history": int(data_cfg.min_history),
            "max_history": int(data_cfg.max_history),
            "label": f"rating {data_cfg.label_op} {data_cfg.label_threshold}",
        },
        "history_length": _history_stats(samples),
        "split": data_cfg.split,
        "splits": {name: _split_stats(splits[name]) for name in SPLITS},
        "graph": {"interactions": len(graph),
                  "excluded_val_test_targets": n_held_out,
                  "excluded_repeats_of_held_out_pairs": len(inter) - len(graph) - n_held_out},
        "few_shot": len(shots),
        "few_shot_balance": str(data_cfg.few_shot_balance),
        "classes": classes,
        "warnings": notes,
    }
    return prepared, summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a readable plain-text table."""
    lines = [f"data: {summary['format']} from {summary['path']}"]
    b, a = summary["before_filtering"], summary["after_reading"]
    lines.append(f"  {'':<22}{'users':>10}{'items':>10}{'interactions':>14}")
    lines.append(f"  {'before filtering':<22}{b['users']:>10,}{b['items']:>10,}"
                 f"{b['interactions']:>14,}")
    lines.append(f"  {'after reading':<22}{a['users']:>10,}{a['items']:>10,}"
                 f"{a['interactions']:>14,}")
    lines.append(f"  items without title: {summary['items_without_title']:,} "
                 f"(data.missing_title={summary['missing_title']})")
    for f in summary["files"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in f["reasons"].items()) or "-"
        first = f" (first at lines {', '.join(map(str, f['first_bad']))})" if f["bad"] else ""
        excluded = ", ".join(f"{k}: {v:,}" for k, v in f.get("excluded", {}).items())
        repaired = ", ".join(f"{k}: {v:,}" for k, v in f.get("repaired", {}).items())
        lines.append(f"  file {f['path']}: {f['lines']:,} lines, {f['bad']:,} skipped "
                     f"[{reasons}]{first}" + (f"; excluded [{excluded}]" if excluded else "")
                     + (f"; repaired [{repaired}]" if repaired else "")
                     + _header_text(f.get("header") or {}))
    s = summary["samples"]
    lines.append(f"  samples: {s['total']:,} from {s['users']:,} users; label = {s['label']}; "
                 f"{s['interactions_without_enough_history']:,} interactions with fewer than "
                 f"{s['min_history']} earlier ones are history only")
    h = summary["history_length"]
    lines.append(f"  history length: min {h['min']}, mean {h['mean']}, median {h['median']}, "
                 f"max {h['max']} (cap {s['max_history']})")
    lines.append(f"  {'split (' + summary['split'] + ')':<22}{'samples':>10}{'users':>10}"
                 f"{'positive':>14}")
    for name, st in summary["splits"].items():
        rate = f"{st['positive_rate']:.3f}" if st["positive_rate"] is not None else "-"
        lines.append(f"  {name:<22}{st['samples']:>10,}{st['users']:>10,}{rate:>14}")
    g = summary["graph"]
    lines.append(f"  graph: {g['interactions']:,} interactions (val/test targets excluded: "
                 f"{g['excluded_val_test_targets']:,}, repeats of their pairs: "
                 f"{g['excluded_repeats_of_held_out_pairs']:,})")
    classes = summary.get("classes", {})
    few = classes.get("few_shot")
    lines.append(f"  few-shot training samples: {summary['few_shot']:,}"
                 + (f" ({few['positives']:,} positive, {few['negatives']:,} negative; "
                    f"data.few_shot_balance={summary.get('few_shot_balance')})" if few else ""))
    for key, what in (("llm_train", "LLM training cap"), ("eval_val", "val evaluation subset"),
                      ("eval_test", "test evaluation subset")):
        c = classes.get(key)
        if c:
            setting = next(f"{k}={'null (all)' if v is None else v}" for k, v in c.items()
                           if "." in k)
            lines.append(f"  {what} ({setting}): {c['samples']:,} samples, "
                         f"{c['positives']:,} positive, {c['negatives']:,} negative")
    for note in summary.get("warnings", []):
        lines.append(f"  WARNING: {note}")
    return "\n".join(lines)


def _header_text(header: dict[str, Any]) -> str:
    if not header:
        return ""
    if header.get("header"):
        names = ", ".join(header.get("names", []))
        return f"; header ({header.get('how')}): {names}"
    return f"; no header ({header.get('how')})"


@register("data", config_keys=["data", "run.seed"],
          help="raw files -> interactions, items, CTR samples, train/val/test split")
def run(ctx: StageContext) -> dict[str, Any]:
    prepared, summary = prepare(ctx.cfg.data, int(ctx.cfg.run.seed), ctx.cfg.llm, ctx.cfg.eval)
    prepared.save(ctx.out_dir)
    write_json(ctx.out_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary
