"""The ``data`` stage: raw files -> interactions, items, CTR samples, split, graph, few-shot.

Writes ``PreparedData`` (see ``gcnee.data.tables``) and ``summary.json`` into
``checkpoints/<run>/data/``: counts before and after every filter, samples and positive rate per
split, skipped lines per file with reasons, items without titles, history lengths. Nothing is
dropped without being counted there.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gcnee.config import ConfigError
from gcnee.data.errors import DataError
from gcnee.data.samples import build_samples, few_shot_ids, graph_interactions, split_samples
from gcnee.data.tables import SPLITS, PreparedData, Sample
from gcnee.stages import StageContext, register, write_json

FETCHABLE = ("ml-100k",)


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


def prepare(data_cfg: Any, seed: int) -> tuple[PreparedData, dict[str, Any]]:
    """Read, sample, split; returns the prepared data and its summary (no files written)."""
    from gcnee.data.readers import read_raw

    _fetch_if_configured(data_cfg)
    try:
        if not Path(data_cfg.path).exists():
            raise DataError(f"data folder not found: {data_cfg.path} (data.path)")
        raw = read_raw(data_cfg, seed=seed)
    except DataError as err:
        if data_cfg.source and "not found" in str(err):
            # The paper configs: one message saying where the files come from and where to go.
            raise DataError(
                f"the raw {data_cfg.format} files for this config are missing ({err}).\n"
                f"  Get them from: {data_cfg.source}\n"
                f"  Put them in:   {data_cfg.path}/ (or set data.path=...; file names: "
                f"data.interactions_file / data.items_file)") from None
        raise
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
        lines.append(f"  file {f['path']}: {f['lines']:,} lines, {f['bad']:,} skipped "
                     f"[{reasons}]{first}" + (f"; excluded [{excluded}]" if excluded else ""))
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
    lines.append(f"  few-shot training samples: {summary['few_shot']:,}")
    return "\n".join(lines)


@register("data", config_keys=["data", "run.seed"],
          help="raw files -> interactions, items, CTR samples, train/val/test split")
def run(ctx: StageContext) -> dict[str, Any]:
    prepared, summary = prepare(ctx.cfg.data, int(ctx.cfg.run.seed))
    prepared.save(ctx.out_dir)
    write_json(ctx.out_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary
