"""Scoring benchmark: our full-depth P(yes) paths vs the one common in public LLM-CTR code.

Every path scores the *same* left-padded batches (requests sorted by length, longest first, as
:meth:`EarlyExitScorer.score_requests` batches them) of the tuned model, timed interleaved:

* ``llm module (shared prefix, logits_to_keep=1)`` — production scoring of the llm stage
  (``CTRLLMModule.score``): the prompt prefix all rows share run once
  (:mod:`gcnee.llm.shared_prefix`), position ids from the mask, logits of the last position
  only, two-way softmax over the answer logits;
* ``llm module, no prefix sharing`` — the same, every row's whole prompt through the decoder;
* ``llm module, <other> attention`` — production scoring with the other attention kernel (sdpa
  when the model runs eager, else eager), so ``llm.attention``'s choice is measured too;
* ``exit scorer, full depth`` — :meth:`EarlyExitScorer.full_depth` (the exit stage's reference):
  decoder layers by hand, final norm, the two answer rows of ``lm_head``;
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

from gcnee.bench.timing import interleaved, median_ratio, rate

BASELINE = "generate + vocab softmax"


def padded_batches(requests: Sequence[Sequence[int]], batch_size: int, pad_id: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(input_ids (b, T), attention_mask (b, T), request index (b,))]``: requests sorted by
    length (longest first, stable), cut into batches, left-padded."""
    if batch_size < 1:
        raise ValueError(f"bench.scoring_batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(requests[i]) for i in idx)
        ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
        am = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(requests[i])
            ids[r, width - n:] = torch.as_tensor(list(requests[i]), dtype=torch.long)
            am[r, width - n:] = 1
        out.append((ids, am, torch.as_tensor(idx, dtype=torch.long)))
    return out


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


def module_yes_probability(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           yes_id: int, no_id: int, share_prefix: bool | str = "auto"
                           ) -> torch.Tensor:
    """``CTRLLMModule.score``: last-position logits only (``logits_to_keep=1``), the shared
    prompt prefix run once where ``llm.share_prefix`` (auto: on CPU) says so."""
    from gcnee.llm.module import last_position_logits, yes_probability

    with torch.inference_mode():
        return yes_probability(last_position_logits(model, input_ids, attention_mask,
                                                    share_prefix), yes_id, no_id)


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
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).logits[:, -1]
    return torch.softmax(logits[:, [yes_id, no_id]].float(), dim=-1)[:, 0]


def bench_scoring_paths(model: Any, scorer: Any, requests: Sequence[Sequence[int]],
                        batch_size: int, yes_id: int, no_id: int, pad_id: int,
                        repeats: int = 3, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Time every path (module docstring) on the same batches; scores compared to the baseline.

    Returns ``{"paths": [{"path", "rps", "speedup_vs_generate", "speedup_vs_generate_cpu",
    "max_abs_diff", "seconds"}], ...}`` with the baseline last (speedups: median paired ratios
    of wall time and of process CPU time).
    """
    model.eval()
    batches = padded_batches(requests, batch_size, pad_id)
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

    from gcnee.llm.shared_prefix import resolve_share_prefix

    ours = ("llm module (shared prefix, logits_to_keep=1)"
            if resolve_share_prefix("auto", device) else "llm module (logits_to_keep=1)")
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        ours: lambda i, a: module_yes_probability(model, i, a, yes_id, no_id),
        "llm module, no prefix sharing":
            lambda i, a: module_yes_probability(model, i, a, yes_id, no_id, share_prefix=False),
        f"llm module, {other} attention":
            lambda i, a: module_yes_probability(model, i, a, yes_id, no_id),
        "exit scorer, full depth": lambda i, a: scorer.full_depth(i, a).scores,
        "forward, all positions":
            lambda i, a: all_positions_yes_probability(model, i, a, yes_id, no_id),
        BASELINE: lambda i, a: generate_yes_probability(model, i, a, yes_id, no_id, pad_id),
    }
    kernels = {f"llm module, {other} attention": other}
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
            "speedup_prefix_sharing": median_ratio(seconds["llm module, no prefix sharing"],
                                                   seconds[ours]),
            f"speedup_{attention}_over_{other}": median_ratio(
                seconds[f"llm module, {other} attention"], seconds[ours]),
            "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
            "speedup": rows[0]["speedup_vs_generate"],
            "speedup_cpu": rows[0]["speedup_vs_generate_cpu"],
            "max_abs_diff": max(r["max_abs_diff"] for r in rows)}


def bench_scoring(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The scoring bench on a trained run's merged model; JSON to ``.../bench/scoring.json``."""
    from gcnee.bench.early_exit import bench_dir
    from gcnee.bench.inputs import eval_requests, load_datamodule, load_tuned_with_heads
    from gcnee.bench.report import load_average, machine_info
    from gcnee.exits.scorer import EarlyExitScorer
    from gcnee.precision import autocast_dtype
    from gcnee.stages import write_json

    out = Path(out_dir) if out_dir is not None else bench_dir(cfg)
    model, tokenizer, heads = load_tuned_with_heads(cfg)
    dm = load_datamodule(cfg, tokenizer)
    requests = eval_requests(dm, int(cfg.bench.requests))
    yes_id, no_id = (int(x) for x in heads.answer_ids.tolist())
    scorer = EarlyExitScorer(model, heads, pad_token_id=tokenizer.pad_token_id,
                             autocast=autocast_dtype(cfg.trainer.precision))
    bs = cfg.bench.scoring_batch_size
    bs = int(cfg.eval.batch_size if bs is None else bs)
    result = {"machine": machine_info(), "run": str(cfg.run.name)}
    result.update(bench_scoring_paths(model, scorer, requests, bs, yes_id, no_id,
                                      int(tokenizer.pad_token_id), int(cfg.bench.repeats),
                                      autocast=autocast_dtype(cfg.trainer.precision)))
    result["load_average_end"] = load_average()
    write_json(out / "scoring.json", result)
    return result
