"""Early-exit benchmark: RPS against full depth, against the ideal the exit layers allow.

Same requests (the first ``bench.requests`` test prompts of a trained run), same batch sizes
(``bench.batch_sizes``); variants per batch size, timed interleaved (``gcnee.timing``):

* ``full depth`` — :meth:`EarlyExitScorer.score_requests` with ``mode="full"``;
* ``exit <rule>`` — early exit at each τ of ``bench.taus`` (default ``[eval.threshold]``)
  with batch compaction (rows that exited leave the batch);
* ``exit <rule> no compaction`` — the same exits, but every row stays in the batch until the
  slowest has exited (what public early-exit code does); skipped at batch size 1, where the two
  are the same computation;
* the full-depth and compacted early-exit variants again with the shared prompt prefix flipped
  (``..., no prefix sharing`` when the scorer shares it, ``..., prefix sharing`` otherwise; the
  layer runner runs the prefix once per batch); skipped at batch size 1, where nothing is shared.

**Ideal speedup** (:mod:`gcnee.exits.cost`): full depth's ``N`` layers (plus one head) over the
mean layers and head evaluations the exited rows needed; what the rows cost in wall time beyond
the FLOPs shows up as ``achieved / ideal < 1``. ``ideal_speedup_tokens`` is the same ratio from
the scorer's per-(row, position) counters, i.e. including the padding actually computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcnee.exits.cost import (  # noqa: F401  (re-exported: the bench's arithmetic)
    achieved_fraction,
    decoder_layer_flops,
    head_cost_layers,
    head_flops,
    ideal_speedup,
)
from gcnee.exits.rules import ExitRule, make_rule
from gcnee.timing import interleaved, median_ratio, rate, timed


def bench_rules(cfg: Any) -> list[ExitRule]:
    """One rule per τ of ``bench.taus`` (null: ``[eval.threshold]``), with the sweep's
    ``eval.rule``, ``eval.window`` and ``eval.window_min_prev``."""
    taus = cfg.bench.taus if cfg.bench.taus is not None else [cfg.eval.threshold]
    e = cfg.eval
    mp = int(getattr(e, "window_min_prev", 1))
    if e.rule == "patience":  # τ is unused: one rule
        return [make_rule("patience", m=int(e.window))]
    return [make_rule(e.rule, tau=float(t), m=int(e.window), min_prev=mp) for t in taus]


def bench_early_exit(scorer: Any, requests: Sequence[Sequence[int]], batch_sizes: Sequence[int],
                     rules: Sequence[ExitRule], repeats: int = 3,
                     profile_dir: str | Path | None = None) -> dict[str, Any]:
    """Time full depth and early exit (with / without compaction) on ``requests``.

    ``scorer``: an :class:`EarlyExitScorer`. Returns ``{"rows": [...], ...}``; each row has
    ``batch_size``, ``variant``, ``rps``, ``seconds`` (per repeat), ``mean_exit_layer``,
    ``computed_layers_per_row``, ``ideal_speedup``, ``ideal_speedup_tokens``, ``speedup``
    (median paired wall-time ratio to full depth), ``achieved_fraction``, and the same two from
    process CPU time (``speedup_cpu``, ``achieved_fraction_cpu``).
    """
    from gcnee.exits.scorer import EarlyExitScorer

    n = len(requests)
    mean_t = float(np.mean([len(r) for r in requests]))
    num_layers = int(scorer.num_layers)
    c = head_cost_layers(scorer.config, mean_t)
    sharing = scorer.runner.sharing()
    twin = EarlyExitScorer(scorer.model, scorer.heads, pad_token_id=scorer.pad_token_id,
                           autocast=scorer.autocast, share_prefix=not sharing,
                           max_length=scorer.runner.max_length)
    flipped = ", no prefix sharing" if sharing else ", prefix sharing"
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    for bs in batch_sizes:
        bs = int(bs)
        variants: dict[str, Any] = {
            "full depth": lambda bs=bs: scorer.score_requests(requests, bs, mode="full")}
        meta: dict[str, tuple[ExitRule | None, bool, bool]] = {
            "full depth": (None, True, sharing)}
        if bs > 1:
            variants["full depth" + flipped] = lambda bs=bs: twin.score_requests(
                requests, bs, mode="full")
            meta["full depth" + flipped] = (None, True, not sharing)
        for rule in rules:
            name = f"exit {rule.label()}"
            variants[name] = lambda bs=bs, rule=rule: scorer.score_requests(
                requests, bs, rule=rule, compact=True)
            meta[name] = (rule, True, sharing)
            if bs > 1:
                variants[name + " no compaction"] = lambda bs=bs, rule=rule: (
                    scorer.score_requests(requests, bs, rule=rule, compact=False))
                meta[name + " no compaction"] = (rule, False, sharing)
                variants[name + flipped] = lambda bs=bs, rule=rule: twin.score_requests(
                    requests, bs, rule=rule, compact=True)
                meta[name + flipped] = (rule, True, not sharing)
        # Warm-up (allocator, first-call costs) on one batch of each kind.
        warm = list(requests[: min(bs, n)])
        for sc in (scorer, twin) if bs > 1 else (scorer,):
            sc.score_requests(warm, bs, mode="full")
            for rule in rules:
                sc.score_requests(warm, bs, rule=rule)
        seconds, cpu, results = interleaved(variants, repeats)
        full = results["full depth"]
        for name, res in results.items():
            rule, compact, shared = meta[name]
            exit_layers = res.exit_layers.numpy()
            evals = np.ones(n) if rule is None else res.exit_heads.numpy() + 1
            ideal = ideal_speedup(exit_layers, evals, num_layers, c)
            speedup = median_ratio(seconds["full depth"], seconds[name])
            speedup_cpu = median_ratio(cpu["full depth"], cpu[name])
            row = {
                "batch_size": bs, "variant": name, "rule": rule.label() if rule else "full",
                "tau": rule.tau if rule is not None else None, "compact": compact,
                "prefix_sharing": shared,
                "rps": rate(n, seconds[name]), "seconds": [round(s, 4) for s in seconds[name]],
                "mean_exit_layer": float(exit_layers.mean()),
                "computed_layers_per_row": res.row_layers / n,
                "padded_tokens_per_row": res.token_layers / max(1, res.row_layers),
                "ideal_speedup": ideal,
                "ideal_speedup_tokens": full.token_layers / max(1, res.token_layers),
                "speedup": speedup, "achieved_fraction": achieved_fraction(speedup, ideal),
                "cpu_seconds": [round(s, 4) for s in cpu[name]], "speedup_cpu": speedup_cpu,
                "achieved_fraction_cpu": achieved_fraction(speedup_cpu, ideal),
            }
            base = name.removesuffix(" no compaction").removesuffix(flipped)
            if base != name:  # the same exits and scores as the plain variant, computed otherwise
                ref = results[base]
                row["exit_layers_equal_compact"] = bool(
                    torch.equal(res.exit_layers, ref.exit_layers))
                row["max_abs_diff_vs_compact"] = float((res.scores - ref.scores).abs().max())
                if base != name.removesuffix(" no compaction"):
                    row["speedup_prefix_sharing"] = median_ratio(
                        seconds[name] if not shared else seconds[base],
                        seconds[base] if not shared else seconds[name])
            rows.append(row)
        if profile_dir is not None and rules:
            profiles[str(bs)] = profile_exit(scorer, requests[: max(bs, 4)], bs, rules[0])
    if profile_dir is not None:
        out = Path(profile_dir)
        out.mkdir(parents=True, exist_ok=True)
        for bs, text in profiles.items():
            (out / f"profile_exit_bs{bs}.txt").write_text(text)
    return {"rows": rows, "n_requests": n, "mean_prompt_tokens": mean_t,
            "num_layers": num_layers, "exit_layers": list(scorer.heads.layers),
            "rule": rules[0].name if rules else "none", "repeats": int(repeats),
            "prefix_sharing": sharing,
            "batch_sizes": [int(b) for b in batch_sizes], "head_cost_layers": c,
            "head_flops": head_flops(int(scorer.config.hidden_size)),
            "layer_flops": decoder_layer_flops(scorer.config, mean_t),
            "profiled": sorted(profiles)}


def profile_exit(scorer: Any, requests: Sequence[Sequence[int]], batch_size: int,
                 rule: ExitRule, top: int = 25) -> str:
    """torch.profiler table (ops by self CPU time) of full depth then early exit on
    ``requests``: where the time goes besides the decoder layers' matmuls."""
    from torch.profiler import ProfilerActivity, profile, record_function

    lines = []
    for name, kw in (("full depth", {"mode": "full"}), (f"exit {rule.label()}", {"rule": rule}),
                     (f"exit {rule.label()} no compaction", {"rule": rule, "compact": False})):
        _, secs = timed(lambda kw=kw: scorer.score_requests(requests, batch_size, **kw))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(name):
                scorer.score_requests(requests, batch_size, **kw)
        lines += [f"=== {name}, batch {batch_size}, {len(requests)} requests, "
                  f"{secs:.3f} s unprofiled ===",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), ""]
    return "\n".join(lines)


def bench_exit(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The early-exit bench on a trained run (``llm/merged``, ``exits/heads.pt``); JSON to
    ``<logs>/<run>/bench/exit.json``."""
    from gcnee.bench.inputs import eval_requests, open_run
    from gcnee.bench.report import load_average, machine_info
    from gcnee.stages import write_json

    out = Path(out_dir) if out_dir is not None else bench_dir(cfg)
    run = open_run(cfg)
    requests = eval_requests(run.datamodule(), int(cfg.bench.requests))
    result = {"machine": machine_info(), "run": run.name}
    result.update(bench_early_exit(run.scorer(), requests, list(cfg.bench.batch_sizes),
                                   bench_rules(run.cfg), int(cfg.bench.repeats),
                                   profile_dir=out if cfg.bench.profile else None))
    result["load_average_end"] = load_average()
    write_json(out / "exit.json", result)
    return result


def bench_dir(cfg: Any) -> Path:
    """``<run.logs_dir>/<run.name>/bench``."""
    return Path(cfg.run.logs_dir) / str(cfg.run.name) / "bench"
