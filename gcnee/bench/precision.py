"""Precision benchmark: does scoring in bfloat16 keep the fp32 scores, and how much faster is it?

Variants of the tuned model's production scoring path (:class:`gcnee.llm.runner.LayerRunner`
to the last layer, the model's own two answer logits, two-way softmax):

* ``fp32`` — the reference;
* ``bf16 autocast`` — fp32 weights, bf16 matmuls (what ``trainer.precision=bf16-mixed`` does);
* ``bf16 weights`` — a bfloat16 copy of the model (``trainer.precision=bf16-true``).

Every variant scores the same ``bench.precision_samples`` test prompts (batches of
``eval.batch_size``, sorted by length); timing is interleaved over ``bench.repeats`` repeats as in
the other benches, and the scores of the last repeat are compared with fp32: AUC, the AUC
difference, Spearman correlation and the largest change of P(yes).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcnee.bench.scoring import runner_yes_probability
from gcnee.llm.batch import length_sorted_batches
from gcnee.llm.runner import LayerRunner
from gcnee.metrics import auc
from gcnee.timing import interleaved, median_ratio, rate

REFERENCE = "fp32"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (ties broken by position: scores are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def bench_precision_paths(model: Any, requests: Sequence[Sequence[int]], labels: Sequence[int],
                          batch_size: int, yes_id: int, no_id: int, pad_id: int,
                          repeats: int = 1) -> dict[str, Any]:
    """Score ``requests`` with each variant (module docstring); speed and agreement with fp32.

    Returns ``{"variants": [{"variant", "rps", "speedup", "auc", "auc_diff", "spearman",
    "max_abs_diff", "mean_abs_diff", "seconds"}], "n_requests", ...}``, fp32 first.
    """
    model.eval()
    batches = length_sorted_batches(requests, batch_size, pad_id)
    n = len(requests)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)

    longest = max(map(len, requests), default=None)  # what the runners see (sliding windows)
    runner = LayerRunner(model, max_length=longest)
    bf16_runner = LayerRunner(bf16_model, max_length=longest)
    setups: dict[str, tuple[Any, Callable[[], Any]]] = {
        REFERENCE: (runner, contextlib.nullcontext),
        "bf16 autocast": (runner, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "bf16 weights": (bf16_runner, contextlib.nullcontext),
    }

    def run(m: Any, ctx: Callable[[], Any], some: list | None = None) -> torch.Tensor:
        out = torch.empty(n)
        with ctx():
            for ids, am, idx in some or batches:
                out[idx] = runner_yes_probability(m, ids, am, yes_id, no_id).float()
        return out

    for m, ctx in setups.values():  # warm-up: one batch each
        run(m, ctx, batches[:1])
    variants = {name: (lambda m=m, ctx=ctx: run(m, ctx)) for name, (m, ctx) in setups.items()}
    seconds, _, results = interleaved(variants, repeats)
    y = np.asarray(labels, dtype=np.int64)
    ref = results[REFERENCE].numpy()
    ref_auc = auc(y, ref)
    rows = []
    for name in variants:
        p = results[name].numpy()
        a = auc(y, p)
        rows.append({"variant": name, "rps": rate(n, seconds[name]),
                     "speedup": median_ratio(seconds[REFERENCE], seconds[name]),
                     "auc": a, "auc_diff": a - ref_auc,
                     "spearman": spearman(ref, p), "max_abs_diff": float(np.abs(p - ref).max()),
                     "mean_abs_diff": float(np.abs(p - ref).mean()),
                     "seconds": [round(s, 3) for s in seconds[name]]})
    return {"variants": rows, "n_requests": n, "batch_size": int(batch_size),
            "mean_prompt_tokens": float(np.mean([len(r) for r in requests])),
            "repeats": int(repeats), "positives": int(y.sum())}


def bench_precision(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The precision bench on a trained run's merged model; JSON to ``.../bench/precision.json``."""
    from gcnee.bench.early_exit import bench_dir
    from gcnee.bench.inputs import open_run
    from gcnee.bench.report import load_average, machine_info
    from gcnee.stages import write_json

    out = Path(out_dir) if out_dir is not None else bench_dir(cfg)
    run = open_run(cfg, full_depth=True)
    test = run.datamodule().datasets["test"]
    n = len(test) if cfg.bench.precision_samples is None else int(cfg.bench.precision_samples)
    requests = [list(x) for x in test.input_ids[:n]]
    labels = list(test.labels[:n])
    yes_id, no_id = run.answer_ids
    result = {"machine": machine_info(), "run": run.name}
    result.update(bench_precision_paths(run.model, requests, labels, int(run.cfg.eval.batch_size),
                                        yes_id, no_id, int(run.tokenizer.pad_token_id),
                                        int(cfg.bench.precision_repeats)))
    result["load_average_end"] = load_average()
    write_json(out / "precision.json", result)
    return result
