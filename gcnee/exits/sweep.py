"""Threshold and window sweeps of dynamic early exit: AUC, requests per second, exit layers.

One sweep row per exit-rule setting (each τ in ``eval.thresholds`` at m = ``eval.window``, each
m in ``eval.windows`` at τ = ``eval.threshold``) plus the full-depth reference row (no early
exit). For every row:

- **AUC** over *all* evaluation samples, with a 95 % bootstrap interval. Every head's P(yes) is
  recorded in one pass (:meth:`EarlyExitScorer.all_head_probs`) and the rule is replayed
  (:func:`gcnee.exits.rules.replay`), which in float32 gives exactly the exits the online
  scorer takes.
- **RPS** measured by actually running the scorer with that rule over the first
  ``eval.rps_samples`` evaluation requests (a fixed subset, the same for every row) at
  ``eval.batch_size``. The timed run's exit layers are compared with the replay
  (``replay_mismatches``): 0 in float32; under bf16 autocast rounding depends on the batch's
  shape, so a few requests near a threshold exit one head earlier or later.
- mean exit layer and the share of requests leaving at each exit layer.

Results go to ``sweep.csv``, ``sweep.json``, ``sweep_threshold.png`` (AUC and RPS against τ, the
paper's Figure 3), ``sweep_window.png`` (against m, Figure 4), and TensorBoard when a logger is
given. ``ThresholdSweepCallback`` runs it at the end of the exit stage's test loop.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from gcnee.exits.rules import ExitRule, make_rule, replay
from gcnee.exits.scorer import EarlyExitScorer
from gcnee.metrics import auc_ci
from gcnee.precision import autocast_dtype
from gcnee.stages import atomic_path, write_json

COLUMNS = ["row", "rule", "tau", "m", "auc", "auc_lo", "auc_hi", "rps", "speedup",
           "mean_exit_layer", "n_auc", "n_rps", "seconds"]


def sweep_rules(eval_cfg: Any) -> list[tuple[str, ExitRule]]:
    """``[(kind, rule)]`` for the τ sweep (kind ``tau``) and the m sweep (kind ``m``)."""
    name = eval_cfg.rule
    mp = int(getattr(eval_cfg, "window_min_prev", 1))
    rules: list[tuple[str, ExitRule]] = []
    if name in ("window", "confidence"):
        for tau in eval_cfg.thresholds:
            rules.append(("tau", make_rule(name, tau=float(tau), m=int(eval_cfg.window),
                                           min_prev=mp)))
    if name in ("window", "patience"):
        for m in eval_cfg.windows:
            rules.append(("m", make_rule(name, tau=float(eval_cfg.threshold), m=int(m),
                                         min_prev=mp)))
    return rules


def _timed(scorer: EarlyExitScorer, requests: Sequence[Sequence[int]], batch_size: int,
           **kw: Any):
    # One warm-up batch keeps one-time costs (allocator, kernels) out of the measured rate.
    scorer.score_requests(requests[:batch_size], batch_size, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    res = scorer.score_requests(requests, batch_size, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return res, time.perf_counter() - start


HEAD_PROBS = "head_probs.pt"


def save_head_probs(path: Path, probs: torch.Tensor, sample_ids: Sequence[int],
                    layers: Sequence[int]) -> None:
    """Every head's P(yes) ``(n, H)`` per test sample, for ``gcnee evaluate`` to replay."""
    with atomic_path(path) as tmp:
        torch.save({"probs": probs.float(), "sample_ids": [int(s) for s in sample_ids],
                    "layers": [int(x) for x in layers]}, tmp)


def load_head_probs(path: Path, sample_ids: Sequence[int],
                    layers: Sequence[int]) -> torch.Tensor | None:
    """The saved head probabilities if they are for exactly these samples and heads."""
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob["sample_ids"] != [int(s) for s in sample_ids] or blob["layers"] != list(layers):
        return None
    return blob["probs"]


def run_sweep(scorer: EarlyExitScorer, requests: Sequence[Sequence[int]],
              labels: Sequence[int], eval_cfg: Any, seed: int = 0,
              progress: bool = True, head_probs: torch.Tensor | None = None) -> dict[str, Any]:
    """Sweep the exit rules of ``eval_cfg`` over ``requests`` (token-id lists) with ``labels``.

    ``head_probs`` ``(n, H)``: every head's P(yes) per request when already computed (the exit
    stage's test loop records them); otherwise one all-heads pass computes them.

    Returns ``{"rows": [...], "head_auc": {layer: auc}, "layers": [...], ...}``; every row has
    the keys of ``COLUMNS`` plus ``exit_share`` (layer -> share of requests).
    """
    from tqdm.auto import tqdm

    y = np.asarray(labels, dtype=np.int64)
    bs = int(eval_cfg.batch_size)
    n_boot = int(eval_cfg.bootstrap)
    layers = list(scorer.heads.layers)
    n_rps = len(requests) if eval_cfg.rps_samples is None else min(len(requests),
                                                                    int(eval_cfg.rps_samples))
    timed_requests = list(requests[:n_rps])

    source = "recorded" if head_probs is not None else "all-heads pass"
    if head_probs is None:
        head_probs = scorer.score_requests(requests, bs, mode="all").head_probs
    probs = head_probs.float()  # (n, H)
    if probs.shape != (len(requests), len(layers)):
        raise ValueError(f"head_probs has shape {tuple(probs.shape)}, expected "
                         f"({len(requests)}, {len(layers)})")
    head_auc = {int(layer): auc_ci(y, probs[:, j].numpy(), n_boot=0)[0]
                for j, layer in enumerate(layers)}

    def row(name: str, kind: str, rule: ExitRule | None, scores: np.ndarray,
            exit_layers: np.ndarray, timed_exit_layers: np.ndarray, seconds: float) -> dict:
        a, lo, hi = auc_ci(y, scores, n_boot=n_boot, seed=seed)
        share = {int(layer): float(np.mean(exit_layers == layer)) for layer in
                 sorted(set(layers) | set(np.unique(exit_layers).tolist()))}
        return {
            "row": name, "kind": kind, "rule": rule.name if rule else "full",
            "tau": rule.tau if rule and rule.name in ("window", "confidence") else None,
            "m": rule.m if rule and rule.name in ("window", "patience") else None,
            "auc": a, "auc_lo": lo, "auc_hi": hi, "rps": n_rps / seconds,
            "mean_exit_layer": float(np.mean(exit_layers)),
            "timed_mean_exit_layer": float(np.mean(timed_exit_layers)),
            "n_auc": int(len(y)), "n_rps": n_rps, "seconds": seconds, "exit_share": share,
        }

    settings = sweep_rules(eval_cfg)
    bar = tqdm(total=1 + len(settings), desc="threshold sweep", disable=not progress)
    full, secs = _timed(scorer, timed_requests, bs, mode="full")
    # The full-depth AUC over every sample: the own head when the last exit is the last layer.
    if layers[-1] == scorer.num_layers:
        full_scores = probs[:, -1].numpy()
    else:
        full_scores = scorer.score_requests(requests, bs, mode="full").scores.numpy()
    n_layers = scorer.num_layers
    rows = [row("full depth", "full", None, full_scores, np.full(len(y), n_layers),
                np.full(n_rps, n_layers), secs)]
    bar.update()
    for kind, rule in settings:
        heads = replay(probs, rule)
        exit_layers = np.asarray(layers)[heads.numpy()]
        scores = probs[torch.arange(len(y)), heads].numpy()
        res, secs = _timed(scorer, timed_requests, bs, rule=rule)
        mismatch = int((res.exit_layers.numpy() != exit_layers[:n_rps]).sum())
        r = row(rule.label(), kind, rule, scores, exit_layers, res.exit_layers.numpy(), secs)
        r["replay_mismatches"] = mismatch  # 0 in float32 (ties aside); bf16: a few flips
        rows.append(r)
        bar.update()
    bar.close()
    for r in rows:
        r["speedup"] = r["rps"] / rows[0]["rps"]
    return {"rows": rows, "head_auc": head_auc, "layers": layers, "batch_size": bs,
            "rule": eval_cfg.rule, "head_probs": source, "device": str(scorer.device),
            "threads": torch.get_num_threads()}


def format_sweep(result: dict[str, Any]) -> str:
    """A markdown table of the sweep rows."""
    head = ("| setting | AUC (95% CI) | RPS | speedup | mean exit layer | exits by layer |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        share = ", ".join(f"{k}:{v:.0%}" for k, v in r["exit_share"].items() if v > 0)
        lines.append(f"| {r['row']} | {r['auc']:.4f} ({r['auc_lo']:.4f}–{r['auc_hi']:.4f}) | "
                     f"{r['rps']:.2f} | {r['speedup']:.2f}× | {r['mean_exit_layer']:.1f} | "
                     f"{share} |")
    return "\n".join(lines)


def write_sweep(result: dict[str, Any], out_dir: str | Path, logger: Any = None) -> list[Path]:
    """CSV, JSON, markdown and PNG plots under ``out_dir``; scalars to a TensorBoard logger."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", result)
    with atomic_path(out / "sweep.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS + [f"exit_share_l{layer}" for layer in result["layers"]])
            for r in result["rows"]:
                w.writerow([r.get(c) for c in COLUMNS]
                           + [r["exit_share"].get(layer, 0.0) for layer in result["layers"]])
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(format_sweep(result) + "\n")
    paths = [out / "sweep.json", out / "sweep.csv", out / "sweep.md"]
    for kind, xlabel, name in (("tau", "threshold τ", "sweep_threshold.png"),
                               ("m", "window m", "sweep_window.png")):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if rows:
            paths.append(_plot(rows, result["rows"][0], kind, xlabel, out / name))
    if logger is not None and hasattr(logger, "experiment"):
        exp = logger.experiment
        for i, r in enumerate(result["rows"]):
            for key in ("auc", "rps", "mean_exit_layer", "speedup"):
                exp.add_scalar(f"sweep/{key}", r[key], i)
            exp.add_text("sweep/rows", f"{i}: {r['row']}", i)
        for layer, a in result["head_auc"].items():
            exp.add_scalar(f"sweep/head_auc/layer_{layer:02d}", a, 0)
    return paths


def _plot(rows: list[dict], full: dict, kind: str, xlabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


class ThresholdSweepCallback(L.Callback):
    """Runs the sweep at the end of the test loop of an ``ExitHeadsModule`` (backbone + heads).

    ``requests``/``labels`` are the evaluation prompts (token ids) and labels; results go to
    ``out_dir`` (rank 0 only: the sweep times a single process).
    """

    def __init__(self, requests: Sequence[Sequence[int]], labels: Sequence[int], eval_cfg: Any,
                 out_dir: str | Path, seed: int = 0,
                 sample_ids: Sequence[int] | None = None,
                 share_prefix: bool | str | None = "auto") -> None:
        self.requests, self.labels, self.sample_ids = requests, labels, sample_ids
        self.share_prefix = share_prefix
        self.eval_cfg, self.out_dir, self.seed = eval_cfg, Path(out_dir), seed
        self.result: dict[str, Any] | None = None

    def _recorded_probs(self, trainer: L.Trainer, pl_module: L.LightningModule
                        ) -> torch.Tensor | None:
        """The test loop's per-head P(yes) in request order, if it recorded all of them (one
        process; under DDP each rank holds a shard and the sweep recomputes them)."""
        recorded = getattr(pl_module, "test_probs", None)
        ids = self.sample_ids
        if ids is None and trainer.datamodule is not None:
            ids = getattr(trainer.datamodule, "datasets", {}).get("test")
            ids = ids.sample_ids if ids is not None else None
        if not recorded or ids is None or len(ids) != len(self.requests):
            return None
        if any(int(s) not in recorded for s in ids):
            return None
        return torch.stack([recorded[int(s)] for s in ids])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        scorer = EarlyExitScorer(pl_module.backbone, pl_module.heads,
                                 autocast=autocast_dtype(trainer.precision),
                                 share_prefix=self.share_prefix)
        probs = self._recorded_probs(trainer, pl_module)
        if probs is not None and self.sample_ids is not None:
            save_head_probs(self.out_dir / HEAD_PROBS, probs, self.sample_ids,
                            pl_module.heads.layers)
        self.result = run_sweep(scorer, self.requests, self.labels, self.eval_cfg, self.seed,
                                head_probs=probs)
        write_sweep(self.result, self.out_dir, trainer.logger)
        print(format_sweep(self.result))
