"""Early-exit benchmark: RPS against full depth, against the ideal the exit layers allow.

Same requests (the first ``bench.requests`` test prompts of a trained run), same batch sizes
(``bench.batch_sizes``); variants per batch size, timed interleaved (``gcnee.bench.timing``):

* ``full depth`` — :meth:`EarlyExitScorer.score_requests` with ``mode="full"``;
* ``exit <rule>`` — early exit at each τ of ``bench.taus`` (default ``[eval.threshold]``)
  with batch compaction (rows that exited leave the batch);
* ``exit <rule> no compaction`` — the same exits, but every row stays in the batch until the
  slowest has exited (what public early-exit code does); skipped at batch size 1, where the two
  are the same computation;
* the full-depth and compacted early-exit variants again with the shared prompt prefix flipped
  (``..., no prefix sharing`` when the scorer shares it, ``..., prefix sharing`` otherwise; the
  layer runner runs the prefix once per batch); skipped at batch size 1, where nothing is shared.

**Ideal speedup.** Given the observed exits, a request needs ``L_i`` decoder layers and ``e_i``
head evaluations (every exit head it reached), full depth needs ``N`` layers and one evaluation
of the model's own head (final norm + the two answer rows: the same cost as an exit head). With
``c`` the cost of one head evaluation in decoder-layer equivalents::

    ideal = (N + c) / mean_i(L_i + e_i * c)

``c`` comes from FLOPs (multiply-add = 2) for a request of the mean prompt length ``T``:

* decoder layer, per row: ``T * (2*h*(q + 2*kv) + 2*q*h + 6*h*I + 2*q*(T + 1) + 8*h)``
  (q/k/v/o projections, gated MLP, causal attention scores and weighted sum averaged over
  positions ``(T + 1) / 2`` keys, two RMSNorms), with ``h`` hidden size, ``q = heads *
  head_dim``, ``kv = kv_heads * head_dim``, ``I`` intermediate size;
* head evaluation, per row: ``4*h`` (RMSNorm of the last position) ``+ 4*h`` (2 x h matmul).

For SmolLM2-135M at ``T = 300``, ``c ≈ 2e-6``: heads are free in FLOPs; anything they cost in
wall time (Python, indexing, rule evaluation, rebuilding the mask after compaction) shows up as
``achieved / ideal < 1``. ``ideal_speedup_tokens`` is the same ratio from the scorer's
per-(row, position) counters, i.e. including the padding actually computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcnee.bench.timing import interleaved, median_ratio, rate, timed
from gcnee.exits.rules import ExitRule, make_rule


def decoder_layer_flops(config: Any, seq_len: float) -> float:
    """FLOPs of one decoder layer over one row of ``seq_len`` tokens (module docstring)."""
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q, kv, inter = heads * head_dim, kv_heads * head_dim, int(config.intermediate_size)
    t = float(seq_len)
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 6 * h * inter + 2 * q * (t + 1) + 8 * h
    return t * per_token


def head_flops(hidden_size: int) -> float:
    """FLOPs of one exit-head evaluation on one row: RMSNorm + 2 x hidden matmul."""
    return 8.0 * int(hidden_size)


def head_cost_layers(config: Any, seq_len: float) -> float:
    """One head evaluation in decoder-layer equivalents for a row of ``seq_len`` tokens."""
    return head_flops(int(config.hidden_size)) / decoder_layer_flops(config, seq_len)


def ideal_speedup(exit_layers: Sequence[int] | np.ndarray, head_evals: Sequence[int] | np.ndarray,
                  num_layers: int, head_cost: float = 0.0) -> float:
    """``(N + c) / mean(L_i + e_i * c)``: full depth over early exit, per request.

    ``exit_layers`` ``(n,)`` layers each request computed, ``head_evals`` ``(n,)`` head
    evaluations each made, ``num_layers`` N, ``head_cost`` c in layer equivalents.
    """
    layers = np.asarray(exit_layers, dtype=np.float64)
    evals = np.asarray(head_evals, dtype=np.float64)
    if layers.shape != evals.shape or layers.size == 0:
        raise ValueError("exit_layers and head_evals must be non-empty and of the same length")
    if (layers < 1).any() or (layers > num_layers).any():
        raise ValueError(f"exit layers must lie in 1..{num_layers}")
    return (num_layers + head_cost) / float(np.mean(layers + evals * head_cost))


def achieved_fraction(achieved: float, ideal: float) -> float:
    """Achieved speedup as a fraction of the ideal one."""
    if ideal <= 0:
        raise ValueError(f"ideal speedup must be positive, got {ideal}")
    return achieved / ideal


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
                           autocast=scorer.autocast, share_prefix=not sharing)
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
