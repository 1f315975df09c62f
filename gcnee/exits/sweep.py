"""The early-exit sweep: AUC against requests per second for every exit rule, setting chosen on
validation.

**Rows.** The full-depth reference; the paper's ``window`` rule at each τ of ``eval.thresholds``
(m = ``eval.window``, the paper's Figure 3) and each m of ``eval.windows`` (τ =
``eval.threshold``, Figure 4); ``confidence`` at each τ of ``eval.confidence_thresholds``;
``patience`` at each m of ``eval.patience_windows``; and the simplest baseline, every request
leaving at exit layer l (``fixed``), for each head but the last (``eval.sweep_rules`` picks the
families). With a per-head calibration (:mod:`gcnee.exits.calibration`), each rule row comes
three ways: raw scores (no calibration), calibrated scores with the rule reading raw P(yes), and
calibrated scores with the rule reading calibrated P(yes) (``eval.sweep_rule_reads`` picks the
last two).

**AUC** of a row is replayed from every head's recorded raw P(yes) (:func:`gcnee.exits.rules.
replay`; in float32 the exits the online scorer takes, tested): on the test split with a 95 %
bootstrap interval and a paired bootstrap interval of the difference to full depth, and on the
validation split, where calibrated rows are *cross-fitted*, so that a calibrated row is not
judged on the samples its maps were fitted on.

**Choice, on validation only.** Validation AUC is the mean of the AUCs within 5 stratified folds,
each fold's calibrated scores coming from maps fitted on the other four (the same folds for every
row, so differences are paired). Among the rows whose validation AUC is at most
``eval.max_auc_loss`` below full depth's, the one with the largest ideal speedup on validation
(:mod:`gcnee.exits.cost`) is ``chosen``; its test AUC, paired interval and measured RPS are then
reported. Test never picks anything.

**RPS** is measured, not predicted: the first ``eval.rps_samples`` test requests are scored at
``eval.batch_size`` by the online scorer (batch compaction) for every distinct exit pattern
(rows with identical exits on those requests share one timing), all patterns interleaved over
``eval.rps_repeats`` repeats in a shuffled order per repeat (:mod:`gcnee.timing`); a row's
speedup is the median of its paired ratios to full depth (from wall time, and from process CPU
time, which other processes on a shared machine disturb less), beside its ideal speedup over all
test requests and achieved / ideal, the ideal of the timed requests' own exits (a small timed
subset can exit differently from all).
Under bf16 the timed scorer's exits can differ from the replay for a few near-threshold
requests (``replay_mismatches``: bf16 rounding depends on the batch's shape); in float32 they
agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from gcnee.exits.cost import head_cost_layers, ideal_speedup
from gcnee.exits.rules import ExitRule, make_rule, replay
from gcnee.exits.scorer import EarlyExitScorer
from gcnee.metrics import auc, auc_ci, auc_diff_ci
from gcnee.progress import ProgressLog
from gcnee.stages import atomic_path
from gcnee.timing import interleaved, median_ratio, rate

FAMILIES = ("window", "confidence", "patience", "fixed")
HEAD_PROBS = "head_probs.pt"  # test split; validation: head_probs_val.pt


@dataclass(frozen=True)
class Setting:
    """One sweep row: a rule (None = full depth), whether scores are calibrated, and what the
    rule reads (``raw`` or ``calibrated`` P(yes))."""

    kind: str  # full | tau | m | confidence | patience | fixed
    rule: ExitRule | None
    calibrated: bool = False
    reads: str = "raw"

    def label(self, layers: Sequence[int]) -> str:
        if self.rule is None:
            return "full depth"
        if self.rule.name == "fixed":
            return f"every request at layer {layers[self.rule.m - 1]}"
        how = ("" if not self.calibrated else
               " · calibrated" + (", rule on calibrated P" if self.reads == "calibrated" else ""))
        return self.rule.label() + how


def sweep_settings(eval_cfg: Any, n_heads: int, calibrated: bool) -> list[Setting]:
    """The rows of the sweep (module docstring), full depth first, without duplicates."""
    mp = int(getattr(eval_cfg, "window_min_prev", 1))
    families = list(getattr(eval_cfg, "sweep_rules", None) or FAMILIES)
    reads = [str(r) for r in (getattr(eval_cfg, "sweep_rule_reads", None)
                              or ("raw", "calibrated"))]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"eval.sweep_rules: {bad} not among {FAMILIES}")
    rules: list[tuple[str, ExitRule]] = []
    if "window" in families:
        rules += [("tau", make_rule("window", tau=float(t), m=int(eval_cfg.window), min_prev=mp))
                  for t in eval_cfg.thresholds]
        rules += [("m", make_rule("window", tau=float(eval_cfg.threshold), m=int(m),
                                  min_prev=mp)) for m in eval_cfg.windows]
    if "confidence" in families:
        rules += [("confidence", make_rule("confidence", tau=float(t)))
                  for t in eval_cfg.confidence_thresholds]
    if "patience" in families:
        rules += [("patience", make_rule("patience", m=int(m)))
                  for m in eval_cfg.patience_windows if int(m) < n_heads]
    out = [Setting("full", None)]
    for kind, rule in rules:
        variants = [(False, "raw")] + ([(True, r) for r in reads] if calibrated else [])
        out += [Setting(kind, rule, c, r) for c, r in variants]
    if "fixed" in families:
        out += [Setting("fixed", make_rule("fixed", m=j + 1)) for j in range(n_heads - 1)]
    seen, unique = set(), []
    for s in out:  # the m sweep repeats the τ sweep's (threshold, window) row
        key = (s.rule, s.calibrated, s.reads)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def _exits(s: Setting, raw: torch.Tensor, cal: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exit head index, score) per row of one setting, replayed on recorded probabilities."""
    n, h = raw.shape
    if s.rule is None:
        head = torch.full((n,), h - 1, dtype=torch.long)
    else:
        head = replay(cal if s.reads == "calibrated" else raw, s.rule)
    source = cal if s.calibrated else raw
    return head.numpy(), source[torch.arange(n), head].numpy()


def val_folds(labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """A fold id ``(n,)`` per validation sample, stratified by class and seeded."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        fold[idx] = rng.permutation(len(idx)) % folds
    return fold


def cross_fitted(probs: torch.Tensor, labels: np.ndarray, layers: Sequence[int], kind: str,
                 fold: np.ndarray) -> torch.Tensor:
    """Validation probabilities ``(n, H)`` calibrated out of fold: the rows of fold k by maps
    fitted on the other folds."""
    from gcnee.exits.calibration import Calibration

    y = np.asarray(labels)
    out = torch.empty_like(probs)
    for k in np.unique(fold):
        test = torch.from_numpy(fold == k)
        cal = Calibration.fit(probs[~test], y[~test.numpy()], layers, kind=kind)
        out[test] = cal.apply_all(probs[test], layers)
    return out


def fold_auc(labels: np.ndarray, scores: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of the AUC within each fold: each fold is scored by one set of maps, so
    no ranking crosses two calibrations (pooling out-of-fold scores would)."""
    y = np.asarray(labels)
    values = [auc(y[fold == k], scores[fold == k]) for k in np.unique(fold)
              if 0 < y[fold == k].sum() < (fold == k).sum()]
    return float(np.mean(values)) if values else float("nan")


def run_sweep(scorer: EarlyExitScorer, requests: Sequence[Sequence[int]],
              labels: Sequence[int], eval_cfg: Any, seed: int = 0,
              head_probs: torch.Tensor | None = None, val_probs: torch.Tensor | None = None,
              val_labels: Sequence[int] | None = None, calibration: Any = None,
              calibration_kind: str = "none") -> dict[str, Any]:
    """Sweep every setting of ``eval_cfg`` over the test ``requests`` (token-id lists) with
    ``labels``; choose on validation (module docstring).

    ``head_probs`` ``(n, H)``: every head's raw P(yes) per test request when already recorded
    (else one all-heads pass computes them); ``val_probs`` / ``val_labels``: the same for the
    validation split (no validation: nothing is chosen). ``calibration``: the maps fitted on all
    of validation (``exits.calibration`` = ``calibration_kind``), applied to test; the
    validation rows are cross-fitted with the same kind.

    Returns ``{"rows": [...], "chosen": {...} | None, "head_auc": {layer: test AUC},
    "val_head_auc": {...}, ...}``; rows carry ``auc``/``auc_lo``/``auc_hi`` (test),
    ``auc_diff``/``auc_diff_lo``/``auc_diff_hi`` (paired, to full depth), ``val_auc``,
    ``val_auc_loss``, ``val_ideal_speedup``, ``rps``, ``speedup``, ``ideal_speedup``,
    ``achieved_fraction``, ``mean_exit_layer``, ``exit_share``.
    """
    y = np.asarray(labels, dtype=np.int64)
    bs, n_boot = int(eval_cfg.batch_size), int(eval_cfg.bootstrap)
    layers = list(scorer.heads.layers)
    source = "recorded" if head_probs is not None else "all-heads pass"
    if head_probs is None:
        head_probs = scorer.score_requests(requests, bs, mode="all").head_probs
    raw = head_probs.float()
    if raw.shape != (len(requests), len(layers)):
        raise ValueError(f"head_probs has shape {tuple(raw.shape)}, expected "
                         f"({len(requests)}, {len(layers)})")
    calibrated = calibration is not None and not calibration.is_identity
    cal = calibration.apply_all(raw, layers) if calibrated else raw
    val = None
    if val_probs is not None and val_labels is not None and len(val_labels):
        vy = np.asarray(val_labels, dtype=np.int64)
        vraw = val_probs.float()
        fold = val_folds(vy, seed=seed)
        vcal = cross_fitted(vraw, vy, layers, calibration_kind, fold) if calibrated else vraw
        val = (vy, vraw, vcal, fold)
    settings = sweep_settings(eval_cfg, len(layers), calibrated)
    n_layers = scorer.num_layers
    mean_t = float(np.mean([len(r) for r in requests])) if len(requests) else 1.0
    c = head_cost_layers(scorer.config, mean_t)
    layer_of = np.asarray(layers)

    def ideal(heads: np.ndarray, full: bool) -> float:
        if full:
            return 1.0
        return ideal_speedup(layer_of[heads], heads + 1, n_layers, c)

    full_exit, full_scores = _exits(settings[0], raw, cal)
    if layers[-1] != n_layers:  # the last exit head is not the model's own: score full depth
        full_scores = scorer.score_requests(requests, bs, mode="full").scores.numpy()
        full_exit = None
    v_full = None
    if val is not None:
        v_full = _exits(settings[0], val[1], val[2])[1] if full_exit is not None else None
    rows = []
    for s in settings:
        full = s.rule is None
        heads, scores = (None, full_scores) if full else _exits(s, raw, cal)
        exit_layers = np.full(len(y), n_layers) if full else layer_of[heads]
        a, lo, hi = auc_ci(y, scores, n_boot=n_boot, seed=seed)
        d, dlo, dhi = ((0.0, 0.0, 0.0) if full else
                       auc_diff_ci(y, scores, full_scores, n_boot=n_boot, seed=seed))
        row = {"row": s.label(layers), "kind": s.kind,
               "rule": "full" if full else s.rule.name,
               "tau": s.rule.tau if s.rule and s.rule.name in ("window", "confidence") else None,
               "m": s.rule.m if s.rule and s.rule.name in ("window", "patience") else None,
               "layer": int(layer_of[s.rule.m - 1]) if s.rule and s.rule.name == "fixed"
               else None,
               "calibrated": s.calibrated, "reads": s.reads,
               "auc": a, "auc_lo": lo, "auc_hi": hi,
               "auc_diff": d, "auc_diff_lo": dlo, "auc_diff_hi": dhi,
               "mean_exit_layer": float(exit_layers.mean()),
               "ideal_speedup": 1.0 if full else ideal(heads, False),
               "exit_share": {int(x): float(np.mean(exit_layers == x))
                              for x in sorted(set(layers) | {n_layers})
                              if np.any(exit_layers == x)},
               "n_auc": int(len(y))}
        if val is not None and (not full or v_full is not None):
            vh, vs = (None, v_full) if full else _exits(s, val[1], val[2])
            row["val_auc"] = fold_auc(val[0], vs, val[3])
            row["val_ideal_speedup"] = 1.0 if full else ideal(vh, False)
        rows.append((s, heads, row))
    _time_rows(scorer, requests, eval_cfg, rows, calibration, ideal)
    full_row = rows[0][2]
    for _, _, r in rows:
        if "val_auc" in r and "val_auc" in full_row:
            r["val_auc_loss"] = full_row["val_auc"] - r["val_auc"]
    chosen = choose(rows_only(rows), float(getattr(eval_cfg, "max_auc_loss", 0.005)))
    return {"rows": rows_only(rows), "chosen": chosen, "layers": layers, "batch_size": bs,
            "rule": str(eval_cfg.rule), "max_auc_loss": float(eval_cfg.max_auc_loss),
            "head_auc": {int(x): auc(y, raw[:, j].numpy()) for j, x in enumerate(layers)},
            "val_head_auc": ({int(x): auc(val[0], val[1][:, j].numpy())
                              for j, x in enumerate(layers)} if val is not None else {}),
            "calibration": calibration.summary() if calibrated else None,
            "n_val": 0 if val is None else int(len(val[0])), "head_probs": source,
            "device": str(scorer.device), "threads": torch.get_num_threads()}


def rows_only(rows: list[tuple[Setting, Any, dict]]) -> list[dict[str, Any]]:
    return [r for _, _, r in rows]


def choose(rows: list[dict[str, Any]], max_auc_loss: float) -> dict[str, Any] | None:
    """The row with the largest validation ideal speedup among those whose validation AUC is
    at most ``max_auc_loss`` below full depth's (ties: the higher validation AUC); None
    without validation."""
    ok = [r for r in rows if r.get("val_auc_loss") is not None
          and r["val_auc_loss"] <= max_auc_loss + 1e-12]
    if not ok:
        return None
    best = max(ok, key=lambda r: (round(r["val_ideal_speedup"], 9), r["val_auc"]))
    return {k: best.get(k) for k in ("row", "rule", "tau", "m", "layer", "calibrated", "reads",
                                     "val_auc", "val_auc_loss", "val_ideal_speedup", "auc",
                                     "auc_lo", "auc_hi", "auc_diff", "auc_diff_lo",
                                     "auc_diff_hi", "rps", "speedup", "ideal_speedup",
                                     "timed_ideal_speedup", "achieved_fraction",
                                     "mean_exit_layer")}


def _time_rows(scorer: EarlyExitScorer, requests: Sequence[Sequence[int]], eval_cfg: Any,
               rows: list[tuple[Setting, Any, dict]], calibration: Any, ideal: Any) -> None:
    """Measure RPS for every distinct exit pattern on the timed subset, interleaved; fill each
    row's ``rps``, ``speedup``, ``timed_ideal_speedup`` (the ideal of the timed requests' own
    exits), ``achieved_fraction`` (of that ideal) and ``replay_mismatches``."""
    n = len(requests) if eval_cfg.rps_samples is None else min(len(requests),
                                                                int(eval_cfg.rps_samples))
    timed = list(requests[:n])
    bs = int(eval_cfg.batch_size)
    repeats = int(getattr(eval_cfg, "rps_repeats", 3))
    patterns: dict[bytes, str] = {}
    calls: dict[str, tuple[EarlyExitScorer, dict[str, Any]]] = {}
    for s, heads, row in rows:
        key = b"full" if heads is None else heads[:n].tobytes()
        if key not in patterns:
            patterns[key] = row["row"]
            if s.rule is None:
                calls[row["row"]] = (scorer, {"mode": "full"})
            else:
                online = EarlyExitScorer(
                    scorer.model, scorer.heads, pad_token_id=scorer.pad_token_id,
                    autocast=scorer.autocast, share_prefix=scorer.runner.share_prefix,
                    calibration=calibration if s.calibrated else None, rule_reads=s.reads,
                    max_length=scorer.runner.max_length)
                calls[row["row"]] = (online, {"rule": s.rule})
        row["timed_as"] = patterns[key]
    # Warm-up: the whole timed set once at full depth (every batch shape), one batch of each
    # other pattern, so first-call and allocation costs stay out of the timings.
    scorer.score_requests(timed, bs, mode="full")
    for sc, kw in calls.values():
        sc.score_requests(timed[:bs], bs, **kw)
    log = ProgressLog("exits: sweep timing", total=len(calls) * repeats, unit="timed run")

    def run(sc: EarlyExitScorer, kw: dict[str, Any]) -> Any:
        out = sc.score_requests(timed, bs, **kw)
        log.update()
        return out

    runs = {name: (lambda sc=sc, kw=kw: run(sc, kw)) for name, (sc, kw) in calls.items()}
    seconds, cpu, results = interleaved(runs, repeats, shuffle=0)
    log.done()
    full = rows[0][2]["row"]
    for s, heads, row in rows:
        name = row["timed_as"]
        row["rps"] = rate(n, seconds[name])
        row["speedup"] = median_ratio(seconds[full], seconds[name])
        row["speedup_cpu"] = median_ratio(cpu[full], cpu[name])
        row["timed_ideal_speedup"] = 1.0 if heads is None else ideal(heads[:n], False)
        row["achieved_fraction"] = row["speedup"] / row["timed_ideal_speedup"]
        row["n_rps"], row["rps_seconds"] = n, [round(x, 4) for x in seconds[name]]
        if heads is not None:
            online = results[name].exit_heads.numpy()
            row["replay_mismatches"] = int((online != heads[:n]).sum())


def save_head_probs(path: Path, probs: torch.Tensor, sample_ids: Sequence[int],
                    layers: Sequence[int]) -> None:
    """Every head's raw P(yes) ``(n, H)`` per sample of one split, for ``gcnee evaluate``."""
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


def _ordered(recorded: dict[int, torch.Tensor] | None, ids: Sequence[int] | None
             ) -> torch.Tensor | None:
    if not recorded or ids is None or any(int(s) not in recorded for s in ids):
        return None
    return torch.stack([recorded[int(s)] for s in ids])


class ThresholdSweepCallback(L.Callback):
    """Runs the sweep at the end of the test loop of an ``ExitHeadsModule`` (backbone + heads).

    ``requests``/``labels``/``sample_ids``: the test prompts (token ids); ``val_labels`` /
    ``val_ids``: the validation split's (its head probabilities come from the module's
    validation loop). Results go to ``out_dir`` (rank 0 only: the sweep times one process).
    """

    def __init__(self, requests: Sequence[Sequence[int]], labels: Sequence[int], eval_cfg: Any,
                 out_dir: str | Path, seed: int = 0,
                 sample_ids: Sequence[int] | None = None,
                 share_prefix: bool | str | None = "auto",
                 val_ids: Sequence[int] | None = None, val_labels: Sequence[int] | None = None,
                 calibration: Any = None, calibration_kind: str = "none") -> None:
        self.requests, self.labels, self.sample_ids = requests, labels, sample_ids
        self.share_prefix = share_prefix
        self.val_ids, self.val_labels = val_ids, val_labels
        self.calibration, self.calibration_kind = calibration, calibration_kind
        self.eval_cfg, self.out_dir, self.seed = eval_cfg, Path(out_dir), seed
        self.result: dict[str, Any] | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from gcnee.exits.sweep_output import format_sweep, write_sweep
        from gcnee.llm.load_plan import autocast_of

        if not trainer.is_global_zero:
            return
        scorer = EarlyExitScorer(pl_module.backbone, pl_module.heads,
                                 autocast=autocast_of(trainer.precision),
                                 share_prefix=self.share_prefix,
                                 max_length=pl_module.runner.max_length)
        layers = pl_module.heads.layers
        # One process records every sample; under DDP each rank holds a shard and the sweep
        # recomputes the test probabilities (validation: no choice is made).
        probs = (_ordered(getattr(pl_module, "test_probs", None), self.sample_ids)
                 if self.sample_ids is not None and len(self.sample_ids) == len(self.requests)
                 else None)
        vprobs = _ordered(getattr(pl_module, "val_probs", None), self.val_ids)
        if probs is not None:
            save_head_probs(self.out_dir / HEAD_PROBS, probs, self.sample_ids, layers)
        if vprobs is not None:
            save_head_probs(self.out_dir / "head_probs_val.pt", vprobs, self.val_ids, layers)
        self.result = run_sweep(scorer, self.requests, self.labels, self.eval_cfg, self.seed,
                                head_probs=probs, val_probs=vprobs,
                                val_labels=self.val_labels if vprobs is not None else None,
                                calibration=self.calibration,
                                calibration_kind=self.calibration_kind)
        write_sweep(self.result, self.out_dir, trainer.logger)
        print(format_sweep(self.result))
