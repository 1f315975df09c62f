"""Scoring benchmark: our full-depth P(yes) paths vs the one common in public LLM-CTR code.

Every path scores the *same* left-padded batches (requests sorted by length, longest first:
:func:`gcnee.llm.runner.length_sorted_batches`) of the tuned model, timed interleaved:

* ``layer runner (shared prefix)`` — production scoring (the llm stage's validation/test
  scoring, the exit scorer's full depth, ``gcnee predict``): :class:`gcnee.llm.runner.LayerRunner`
  with the prompt prefix all rows share run once, positions from the mask, the last position's
  final norm and the two answer rows of the head (named ``layer runner`` where
  ``llm.share_prefix: auto`` leaves sharing off);
* ``layer runner, no prefix sharing`` / ``..., prefix sharing`` — the same with sharing flipped;
* ``layer runner, <other> attention`` — production scoring with the other attention kernel (sdpa
  when the model runs eager, else eager), so ``llm.attention``'s choice is measured too;
* ``HF forward, last position`` — the training forward
  (:func:`gcnee.llm.module.last_position_logits`: Hugging Face's decoder forward, the vocabulary
  head at the last position only);
* ``forward, all positions`` — a plain ``model(ids, attention_mask)`` then ``logits[:, -1]``
  (vocabulary logits at every position);
* ``generate + vocab softmax`` (the baseline) — ``model.generate(max_new_tokens=1,
  output_scores=True, return_dict_in_generate=True)``, softmax over the vocabulary, then the
  two answer columns renormalised (TALLRec-style).

All give the same P(yes) up to float rounding (``max_abs_diff`` against the baseline). Every
path runs under the same autocast (``trainer.precision``: bf16-mixed -> bf16) and, except the
other-attention row, the same attention kernel, so the paths differ only in what they compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcnee.llm.batch import length_sorted_batches
from gcnee.llm.runner import LayerRunner
from gcnee.timing import interleaved, median_ratio, rate

BASELINE = "generate + vocab softmax"


def generate_yes_probability(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             yes_id: int, no_id: int, pad_id: int) -> torch.Tensor:
    """The public-code path: ``generate`` one token with ``output_scores``, softmax over the
    vocabulary, the two answer columns renormalised. ``(B, T)`` -> ``(B,)`` float32."""
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=1, do_sample=False, num_beams=1,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=int(pad_id))
    probs = torch.softmax(out.scores[0].float(), dim=-1)[:, [yes_id, no_id]]
    return probs[:, 0] / probs.sum(dim=-1)


def runner_yes_probability(runner: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           yes_id: int, no_id: int) -> torch.Tensor:
    """Production scoring: the layer runner to the last layer, then the model's own answer
    logits. ``(B, T)`` -> ``(B,)`` float32."""
    from gcnee.llm.answer import prob_yes

    answer = torch.tensor([yes_id, no_id])
    out: dict[str, torch.Tensor] = {}

    def visit(layer: int, h: torch.Tensor, rows: torch.Tensor) -> None:
        out["p"] = prob_yes(runner.answer_logits(h, answer))

    with torch.inference_mode():
        runner.run(input_ids, attention_mask, [runner.num_layers], visit)
    return out["p"]


def hf_yes_probability(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       yes_id: int, no_id: int) -> torch.Tensor:
    """The training forward (Hugging Face's decoder, vocabulary head at the last position)."""
    from gcnee.llm.module import last_position_logits, yes_probability

    with torch.inference_mode():
        return yes_probability(last_position_logits(model, input_ids, attention_mask, False),
                               yes_id, no_id)


@contextmanager
def attention_kernel(model: Any, name: str) -> Iterator[None]:
    """Run ``model`` with another attention implementation inside the block."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def all_positions_yes_probability(model: Any, input_ids: torch.Tensor,
                                  attention_mask: torch.Tensor, yes_id: int, no_id: int
                                  ) -> torch.Tensor:
    """A plain forward (vocabulary logits at every position), then the last position."""
    from gcnee.llm.answer import prob_yes
    from gcnee.llm.batch import positions_from_mask

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions_from_mask(attention_mask),
                       use_cache=False).logits[:, -1]
    return prob_yes(logits[:, [yes_id, no_id]])


def bench_scoring_paths(model: Any, requests: Sequence[Sequence[int]],
                        batch_size: int, yes_id: int, no_id: int, pad_id: int,
                        repeats: int = 3, autocast: torch.dtype | None = None,
                        share_prefix: bool | str = "auto") -> dict[str, Any]:
    """Time every path (module docstring) on the same batches; scores compared to the baseline.

    Returns ``{"paths": [{"path", "rps", "speedup_vs_generate", "speedup_vs_generate_cpu",
    "max_abs_diff", "seconds"}], ...}`` with the baseline last (speedups: median paired ratios
    of wall time and of process CPU time).
    """
    model.eval()
    batches = length_sorted_batches(requests, batch_size, pad_id)
    n = len(requests)
    device = next(model.parameters()).device

    attention = str(model.config._attn_implementation)
    other = "sdpa" if attention == "eager" else "eager"

    def run(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            some: list | None = None, kernel: str | None = None) -> Callable[[], Any]:
        def go() -> torch.Tensor:
            out = torch.empty(n)
            with (torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                 enabled=autocast is not None),
                  nullcontext() if kernel is None else attention_kernel(model, kernel)):
                for ids, am, idx in batches if some is None else some:
                    out[idx] = fn(ids.to(device), am.to(device)).float().cpu()
            return out
        return go

    longest = max(map(len, requests), default=None)  # what the runners see (sliding windows)
    runner = LayerRunner(model, share_prefix=share_prefix, max_length=longest)
    sharing = runner.sharing()
    flipped_runner = LayerRunner(model, share_prefix=not sharing, max_length=longest)
    ours = "layer runner (shared prefix)" if sharing else "layer runner"
    flipped = "layer runner, " + ("no prefix sharing" if sharing else "prefix sharing")
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        ours: lambda i, a: runner_yes_probability(runner, i, a, yes_id, no_id),
        flipped: lambda i, a: runner_yes_probability(flipped_runner, i, a, yes_id, no_id),
        f"layer runner, {other} attention":
            lambda i, a: runner_yes_probability(runner, i, a, yes_id, no_id),
        "HF forward, last position": lambda i, a: hf_yes_probability(model, i, a, yes_id, no_id),
        "forward, all positions":
            lambda i, a: all_positions_yes_probability(model, i, a, yes_id, no_id),
        BASELINE: lambda i, a: generate_yes_probability(model, i, a, yes_id, no_id, pad_id),
    }
    kernels = {f"layer runner, {other} attention": other}
    for name, fn in fns.items():  # warm-up: one batch through every path
        run(fn, batches[:1], kernels.get(name))()
    paths = {name: run(fn, kernel=kernels.get(name)) for name, fn in fns.items()}
    seconds, cpu, results = interleaved(paths, repeats)
    base = results[BASELINE]
    rows = [{"path": name, "rps": rate(n, seconds[name]),
             "speedup_vs_generate": median_ratio(seconds[BASELINE], seconds[name]),
             "speedup_vs_generate_cpu": median_ratio(cpu[BASELINE], cpu[name]),
             "max_abs_diff": float((results[name] - base).abs().max()),
             "seconds": [round(s, 4) for s in seconds[name]]} for name in paths]
    return {"paths": rows, "n_requests": n, "batch_size": int(batch_size),
            "mean_prompt_tokens": float(np.mean([len(r) for r in requests])),
            "repeats": int(repeats), "baseline": BASELINE, "attention": attention,
            "prefix_sharing": sharing,
            "speedup_prefix_sharing": (median_ratio(seconds[flipped], seconds[ours]) if sharing
                                       else median_ratio(seconds[ours], seconds[flipped])),
            f"speedup_{attention}_over_{other}": median_ratio(
                seconds[f"layer runner, {other} attention"], seconds[ours]),
            "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
            "speedup": rows[0]["speedup_vs_generate"],
            "speedup_cpu": rows[0]["speedup_vs_generate_cpu"],
            "max_abs_diff": max(r["max_abs_diff"] for r in rows)}


def bench_scoring(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The scoring bench on a trained run's merged model; JSON to ``.../bench/scoring.json``."""
    from gcnee.bench.early_exit import bench_dir
    from gcnee.bench.inputs import eval_requests, open_run
    from gcnee.bench.report import load_average, machine_info
    from gcnee.llm.load_plan import autocast_of
    from gcnee.stages import write_json

    out = Path(out_dir) if out_dir is not None else bench_dir(cfg)
    run = open_run(cfg, full_depth=True)
    requests = eval_requests(run.datamodule(), int(cfg.bench.requests))
    yes_id, no_id = run.answer_ids
    bs = cfg.bench.scoring_batch_size
    bs = int(run.cfg.eval.batch_size if bs is None else bs)
    result = {"machine": machine_info(), "run": run.name}
    result.update(bench_scoring_paths(run.model, requests, bs, yes_id, no_id,
                                      int(run.tokenizer.pad_token_id), int(cfg.bench.repeats),
                                      autocast=autocast_of(run.cfg.trainer.precision),
                                      share_prefix=run.cfg.llm.get("share_prefix", "auto")))
    result["load_average_end"] = load_average()
    write_json(out / "scoring.json", result)
    return result
