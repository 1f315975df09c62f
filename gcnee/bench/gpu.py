"""The prepared GPU check (``gcnee bench gpu``, ``scripts/gpu_check.py``): what a CUDA node does
with a 7B model, measured in one run of a few minutes, with no internet.

The model is a random-initialised Llama built from Vicuna-7B v1.5's ``config.json`` (shipped in
``gcnee/model_configs/``), in bf16, saved once to a temporary folder with safetensors so that
every load below goes through ``from_pretrained`` as a real checkpoint would. Parts, in order
(each guarded: a part that fails records its error and the others still run; a part that would
start after the global time budget is skipped and says so):

``load``
    ``from_pretrained`` of the saved folder with the load plan's dtype and device map
    (:func:`gcnee.llm.load_plan.load_plan`): seconds, the weights' bytes and the peak CUDA
    memory against ``gcnee plan``'s weights (:mod:`gcnee.plan`).
``lora_bf16``
    one LoRA training step (``llm.lora`` defaults, q/v) through the llm stage's own forward and
    loss (:func:`gcnee.llm.module.last_position_logits`, :func:`~gcnee.llm.module.answer_loss`)
    under bf16 autocast: step seconds, peak memory against the plan's ``llm train`` total.
``runner_vs_hf``
    the layer runner (:class:`gcnee.llm.runner.LayerRunner`, prefix sharing off and on) against
    the Hugging Face forward on left-padded prompts: max |Δlogit| over the vocabulary and max
    |ΔP(yes)|, against a bf16 tolerance.
``early_exit_rps``
    full depth vs early exit at batch 1, 8, 32, compaction vs none
    (:func:`gcnee.bench.early_exit.bench_early_exit`, interleaved repeats of
    :mod:`gcnee.timing`), with *planted* exits: answer heads whose logit gap grows with depth,
    scaled on the requests' own states so that the confidence rule lets a set share of the rows
    leave at each head (a spread of exit layers within every batch, which is what compaction
    is for).
``lora_nf4``
    the same folder loaded in nf4 (bitsandbytes, the load plan's ``BitsAndBytesConfig``), peft's
    k-bit preparation, one LoRA step: load seconds, weights' bytes and peak against the plan.
``ddp``
    one LoRA step under ``DistributedDataParallel`` in a spawned process (world size 1, nccl;
    gloo on the CPU).

``--tiny`` builds a 2-layer tiny Llama in fp32 on the CPU instead: every part that needs CUDA or
bitsandbytes' CUDA kernels says ``skipped: no CUDA``, the others run as on the GPU, so CI proves
the script (``tests/bench/test_gpu_check.py``). Output: ``<out>/gpu_check.json`` and
``<out>/gpu_check.md`` with the machine (GPU, memory, torch / CUDA / bitsandbytes versions).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

PARTS = ("load", "lora_bf16", "runner_vs_hf", "early_exit_rps", "lora_nf4", "ddp")
NEEDS_CUDA = ("lora_nf4",)
# Seconds a part needs at least (full size): it is skipped when less of the budget is left.
MIN_SECONDS = {"load": 60, "lora_bf16": 20, "runner_vs_hf": 10, "early_exit_rps": 60,
               "lora_nf4": 90, "ddp": 45}
TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, model_type="llama", pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
VICUNA_YES_NO = (3869, 1939)  # "▁Yes", "▁No" in Llama-2's tokenizer


class Check:
    """What the parts share: sizes, device, the saved folder, the loaded bf16 model."""

    def __init__(self, tiny: bool, work: Path, deadline: float) -> None:
        from gcnee.plan import shipped_config_path

        self.tiny, self.work, self.deadline = tiny, work, deadline
        self.cuda = torch.cuda.is_available() and not tiny
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.precision = "bf16-mixed" if self.cuda else "32-true"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.config = (dict(TINY_CONFIG) if tiny else
                       json.loads(shipped_config_path("lmsys/vicuna-7b-v1.5").read_text()))
        # tiny: a planted head after layer 1 and the model's own at 2; full: the paper's layers
        self.exit_layers = [1, 2] if tiny else [5, 10, 15, 20, 25, 30]
        self.answer_ids = (5, 6) if tiny else VICUNA_YES_NO
        self.train_batch, self.train_len = (2, 24) if tiny else (8, 256)
        self.folder = work / "model"
        self.model: Any = None

    def left(self) -> float:
        return self.deadline - time.time()

    def settings(self, **extra: Any) -> Any:
        """A gcnee config for ``gcnee plan`` describing what this check runs."""
        from gcnee.config import load_config

        kv = {"llm.model": str(self.folder), "trainer.precision": self.precision,
              "llm.max_length": self.train_len, "llm.batch_size": self.train_batch,
              "exits.layers": "[" + ",".join(map(str, self.exit_layers)) + "]",
              "run.checkpoints_dir": str(self.work / "checkpoints"), **extra}
        return load_config(None, [f"{k}={v}" for k, v in kv.items()])

    def plan_rows(self, **extra: Any) -> dict[str, Any]:
        from gcnee.plan import plan_memory

        plan = plan_memory(self.settings(**extra), self.config, gpu_memory=self.gpu_memory())
        return {r.stage: r for r in plan.rows}

    def gpu_memory(self) -> int:
        return (int(torch.cuda.get_device_properties(0).total_memory) if self.cuda
                else 80 * 2**30)

    def requests(self, n: int, seed: int = 0) -> list[list[int]]:
        """Prompts of random tokens: a shared 64-token prefix (8 tiny), tails of varied length."""
        g = torch.Generator().manual_seed(seed)
        vocab = int(self.config["vocab_size"])
        prefix_len, lo, hi = (16, 6, 16) if self.tiny else (64, 120, 250)
        prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
        out = []
        for _ in range(n):
            k = int(torch.randint(lo, hi, (1,), generator=g))
            out.append(prefix + torch.randint(3, vocab, (k,), generator=g).tolist())
        return out


# -- helpers -----------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _load_kwargs(check: Check, quantization: str | None) -> dict[str, Any]:
    from gcnee.llm.load_plan import load_plan

    kw = load_plan(check.precision, quantization, "gpu" if check.cuda else "cpu",
                   device=check.device).from_pretrained_kwargs()
    return {**kw, "attn_implementation": "sdpa"}


def _lora_step(model: torch.nn.Module, check: Check) -> dict[str, Any]:
    """One optimizer step of LoRA (q, v) through the llm stage's forward and loss."""
    from gcnee.llm.batch import left_pad
    from gcnee.llm.module import add_lora, answer_loss, last_position_logits

    lora = SimpleNamespace(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    peft_model = add_lora(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    reqs = [r[: check.train_len] for r in check.requests(check.train_batch, seed=1)]
    ids, am = left_pad(reqs, 0)
    ids, am = ids.to(check.device), am.to(check.device)
    labels = torch.arange(len(reqs), device=check.device) % 2
    yes, no = check.answer_ids
    _reset_peak()
    t0 = time.perf_counter()
    with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=check.cuda):
        logits = last_position_logits(peft_model, ids, am, share_prefix=False)
        loss = answer_loss(logits, labels, yes, no, "vocab")
    loss.backward()
    grad = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - t0
    out = {"loss": round(loss.item(), 4), "grad_norm": grad, "step_s": round(seconds, 3),
           "trainable_params": sum(p.numel() for p in params),
           "batch": list(ids.shape), "peak_bytes": _peak()}
    if not (math.isfinite(out["loss"]) and grad > 0):
        raise RuntimeError(f"LoRA step gave loss {out['loss']}, gradient norm {grad}")
    del opt, params, logits, loss
    return {"result": out, "model": peft_model}


# -- parts -------------------------------------------------------------------------------------

def part_load(check: Check) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    cfg = LlamaConfig(**{k: v for k, v in check.config.items() if not k.startswith("_")})
    with torch.device(check.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=check.dtype)
    _sync()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(check.folder)  # safetensors
    save_s = time.perf_counter() - t0
    del model
    _reset_peak()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(check.folder, **_load_kwargs(check, None)).eval()
    _sync()
    load_s = time.perf_counter() - t0
    check.model = model
    plan = check.plan_rows()["llm eval + record"]
    weights = _param_bytes(model)
    return {"build_s": round(build_s, 1), "save_s": round(save_s, 1), "load_s": round(load_s, 1),
            "dtype": str(next(model.parameters()).dtype), "device": str(check.device),
            "params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": weights, "peak_bytes": _peak(),
            "plan_weights_bytes": plan.gpu_weights,
            "weights_vs_plan": _ratio(weights, plan.gpu_weights),
            "peak_vs_plan": _ratio(_peak(), plan.gpu_weights)}


def part_lora_bf16(check: Check) -> dict[str, Any]:
    out = _lora_step(check.model, check)
    check.model = out["model"].unload().eval()  # the plain model back for the parts below
    res = out["result"]
    row = check.plan_rows()["llm train"]
    planned = row.gpu_total - 2**30  # max_memory_allocated does not see the CUDA context
    res.update({"dtype": "bf16 autocast" if check.cuda else "fp32", "plan_total_bytes": planned,
                "peak_vs_plan": _ratio(res["peak_bytes"], planned)})
    return res


def part_runner_vs_hf(check: Check) -> dict[str, Any]:
    from gcnee.llm.batch import left_pad, positions_from_mask
    from gcnee.llm.runner import LayerRunner
    from gcnee.precision import float32_linear

    model = check.model
    reqs = check.requests(4, seed=2)
    ids, am = left_pad(reqs, 0)
    ids, am = ids.to(check.device), am.to(check.device)
    head = model.get_output_embeddings()
    yes_no = list(check.answer_ids)
    with torch.inference_mode():
        last = model.model(input_ids=ids, attention_mask=am, position_ids=positions_from_mask(am),
                           use_cache=False).last_hidden_state[:, -1]
        ref = float32_linear(last, head.weight)
        out: dict[str, Any] = {}
        for share in (False, True):
            runner = LayerRunner(model, share_prefix=share)
            got: dict[str, torch.Tensor] = {}

            def visit(layer: int, h: torch.Tensor, rows: torch.Tensor, got=got,
                      runner=runner) -> None:
                got["logits"] = float32_linear(runner.decoder.norm(h), head.weight)

            stats = runner.run(ids, am, [runner.num_layers], visit)
            dl = (got["logits"] - ref).abs().max().item()
            p_ref = torch.softmax(ref[:, yes_no], -1)[:, 0]
            p_got = torch.softmax(got["logits"][:, yes_no], -1)[:, 0]
            key = "shared_prefix" if share else "plain"
            out[key] = {"max_abs_dlogit": dl, "max_abs_dp_yes": (p_got - p_ref).abs().max().item(),
                        "prefix": stats.prefix}
    tol = 0.05 if check.dtype == torch.bfloat16 else 1e-4
    out["logit_scale"] = ref.abs().max().item()
    out["tolerance_dp"] = tol
    out["within_tolerance"] = all(v["max_abs_dp_yes"] <= tol for k, v in out.items()
                                  if isinstance(v, dict))
    if not out["within_tolerance"]:
        raise RuntimeError(f"runner differs from the HF forward beyond {tol}: {out}")
    return out


def plant_exits(scorer: Any, requests: list[list[int]], tau: float = 0.9,
                seed: int = 0) -> list[float]:
    """Set the answer heads of ``scorer`` so that the confidence rule at ``tau`` fires for a
    growing share of the rows at each head: head ``j``'s logit gap is ``s_j · (norm_j(h) · w)``
    for a random unit ``w``, with ``s_j`` scaled on the requests' own states so that about
    ``(j + 1) / H`` of the rows are confident enough there. Returns those target shares."""
    from gcnee.llm.batch import length_sorted_batches

    heads = scorer.heads
    layers = [x for x in heads.layers if not heads.is_own_head(x)]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(int(heads.hidden_size), generator=g)
    w = (w / w.norm()).to(scorer.device)
    zs: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
    with torch.no_grad():
        for ids, am, _ in length_sorted_batches(requests, 8, scorer.pad_token_id):
            states = scorer.runner.states(ids, am, layers)
            for x in layers:
                zs[x].append(heads.norms[str(x)](states[x].float()).float() @ w)
    gap = math.log(tau / (1 - tau))
    shares = []
    for j, x in enumerate(layers):
        share = (j + 1) / (len(layers) + 1)
        z = torch.cat(zs[x]).abs()
        scale = gap / float(torch.quantile(z, 1 - share).clamp_min(1e-6))
        proj = heads.projs[str(x)]
        with torch.no_grad():
            proj.weight.copy_(torch.stack([w, -w]) * (scale / 2))
            if proj.bias is not None:
                proj.bias.zero_()
        shares.append(round(share, 3))
    return shares


def part_early_exit_rps(check: Check) -> dict[str, Any]:
    from gcnee.bench.early_exit import bench_early_exit
    from gcnee.exits.heads import ExitHeads
    from gcnee.exits.rules import make_rule
    from gcnee.exits.scorer import EarlyExitScorer

    model = check.model
    heads = ExitHeads.from_model(model, check.exit_layers, check.answer_ids, head="answer",
                                 init="random").to(check.device)
    scorer = EarlyExitScorer(model, heads, pad_token_id=0, share_prefix="auto")
    requests = check.requests(16 if check.tiny else 64, seed=3)
    shares = plant_exits(scorer, requests)
    rule = make_rule("confidence", tau=0.9)
    result = bench_early_exit(scorer, requests, [1, 8, 32], [rule],
                              repeats=1 if check.tiny else 3)
    rows = [{k: r.get(k) for k in ("batch_size", "variant", "rps", "speedup", "ideal_speedup",
                                   "achieved_fraction", "mean_exit_layer", "compact",
                                   "max_abs_diff_vs_compact")} for r in result["rows"]]
    return {"planted_shares": shares, "rule": rule.label(), "n_requests": result["n_requests"],
            "mean_prompt_tokens": result["mean_prompt_tokens"],
            "prefix_sharing": result["prefix_sharing"], "rows": rows}


def part_lora_nf4(check: Check) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from gcnee.llm.backbone import prepare_for_kbit

    check.model = None  # the bf16 model's 13.5 GB would count in this part's peak
    gc.collect()
    _reset_peak()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(check.folder, **_load_kwargs(check, "nf4"))
    _sync()
    load_s = time.perf_counter() - t0
    weights = int(model.get_memory_footprint())
    load_peak = _peak()
    model = prepare_for_kbit(model)
    out = _lora_step(model, check)
    res = out["result"]
    rows = check.plan_rows(**{"llm.quantization": "nf4"})
    planned = rows["llm train"].gpu_total - 2**30
    res.update({"load_s": round(load_s, 1), "weights_bytes": weights, "load_peak_bytes": load_peak,
                "plan_weights_bytes": rows["llm train"].gpu_weights,
                "weights_vs_plan": _ratio(weights, rows["llm train"].gpu_weights),
                "plan_total_bytes": planned, "peak_vs_plan": _ratio(res["peak_bytes"], planned)})
    del out, model
    _reset_peak()
    return res


def part_ddp(check: Check) -> dict[str, Any]:
    out = check.work / "ddp.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    cmd = [sys.executable, "-m", "gcnee.bench.gpu", "--ddp-worker", str(out)]
    if check.tiny:
        cmd.append("--tiny")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=max(10.0, min(180.0, check.left())))
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"DDP worker exited {proc.returncode}: {proc.stderr[-2000:]}")
    res = json.loads(out.read_text())
    res["process_s"] = round(time.perf_counter() - t0, 1)
    return res


def ddp_worker(out: str, tiny: bool) -> None:
    """One LoRA step under DistributedDataParallel in this process (launched by
    :func:`part_ddp` with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = torch.cuda.is_available() and not tiny
    backend = "nccl" if cuda else "gloo"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend)
    try:
        check = Check(tiny, Path(out).parent, time.time() + 600)
        # Vicuna's width at 2 layers: the DDP machinery, not the depth, is under test.
        cfg = {**check.config, "num_hidden_layers": 2}
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(
                LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}),
                dtype=check.dtype, attn_implementation="sdpa")
        from gcnee.llm.batch import left_pad
        from gcnee.llm.module import add_lora, answer_loss, last_position_logits

        peft_model = add_lora(model, SimpleNamespace(r=8, alpha=16, dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))

        class Forward(torch.nn.Module):  # DDP's reducer is armed by its own forward
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
                return last_position_logits(self.m, ids, am, share_prefix=False)

        ddp = torch.nn.parallel.DistributedDataParallel(
            Forward(peft_model), device_ids=[dev.index] if cuda else None)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-4)
        ids, am = left_pad([r[: check.train_len] for r in check.requests(4, seed=4)], 0)
        ids, am = ids.to(dev), am.to(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = ddp(ids, am)
            loss = answer_loss(logits, torch.tensor([1, 0, 1, 0], device=dev), *check.answer_ids)
        loss.backward()  # DDP's reducer all-reduces the LoRA gradients here
        opt.step()
        t = torch.ones(1, device=dev)
        dist.all_reduce(t)
        _sync()
        Path(out).write_text(json.dumps({
            "backend": backend, "world_size": dist.get_world_size(), "rank": dist.get_rank(),
            "loss": loss.item(), "step_s": round(time.perf_counter() - t0, 3),
            "all_reduce_sum": float(t), "layers": 2,
            "peak_bytes": _peak()}))
    finally:
        dist.destroy_process_group()


PART_FNS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "load": part_load, "lora_bf16": part_lora_bf16, "runner_vs_hf": part_runner_vs_hf,
    "early_exit_rps": part_early_exit_rps, "lora_nf4": part_lora_nf4, "ddp": part_ddp}
NEEDS_MODEL = ("lora_bf16", "runner_vs_hf", "early_exit_rps")


# -- the run -----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    from gcnee.bench.report import _version, machine_info

    info = machine_info()
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["bitsandbytes"] = _version("bitsandbytes")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{p.major}.{p.minor}"
        info["gpu_count"] = torch.cuda.device_count()
    return info


def run_gpu_check(out: str | Path = "logs/gpu_check", tiny: bool = False,
                  budget_s: float = 480.0, parts: list[str] | None = None,
                  workdir: str | Path | None = None) -> dict[str, Any]:
    """Run the parts (module docstring) within ``budget_s`` seconds; writes
    ``<out>/gpu_check.{json,md}`` and returns the JSON's content."""
    wanted = list(PARTS) if parts is None else list(parts)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="gcnee-gpu-check-", dir=workdir))
    check = Check(tiny, work, start + budget_s)
    scale = 0.05 if tiny else 1.0
    result: dict[str, Any] = {"machine": machine(), "tiny": tiny, "budget_s": budget_s,
                              "model": "tiny 2-layer Llama (fp32, CPU)" if tiny else
                              "random-initialised Llama, Vicuna-7B v1.5 config (bf16)",
                              "parts": {}}
    try:
        for name in PARTS:
            if name not in wanted:
                continue
            t0 = time.time()
            entry: dict[str, Any]
            if name in NEEDS_CUDA and not check.cuda:
                entry = {"status": "skipped: no CUDA"}
            elif name in NEEDS_MODEL and check.model is None:
                entry = {"status": "skipped: no model (the load part did not run or failed)"}
            elif check.left() < MIN_SECONDS[name] * scale:
                entry = {"status": f"skipped: time budget ({check.left():.0f} s left)"}
            else:
                print(f"[gcnee] gpu check: {name} ({check.left():.0f} s of the budget left)",
                      flush=True)
                try:
                    entry = {"status": "ok", **PART_FNS[name](check)}
                except Exception as err:  # recorded; the other parts still run
                    entry = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                             "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.time() - t0, 1)
            result["parts"][name] = entry
    finally:
        check.model = None
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.time() - start, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(format_markdown(result))
    print(format_markdown(result), flush=True)
    return result


def _fmt(v: Any, key: str = "") -> str:
    if key.endswith("bytes") and isinstance(v, (int, float)):
        return f"{v / 2**30:.3g} GiB"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_markdown(result: dict[str, Any]) -> str:
    """The check's results as markdown: machine, one row per part, the RPS table."""
    from gcnee.bench.report import markdown_table

    m = result["machine"]
    lines = ["# GPU check", "",
             f"Model: {result['model']}. Total {result['total_s']} s (budget "
             f"{result['budget_s']:.0f} s).", "",
             f"Machine: GPU {m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, capability "
             f"{m.get('gpu_capability')}), CPU {m.get('cpu')}; torch "
             f"{m['versions'].get('torch')} (CUDA {m.get('torch_cuda')}), transformers "
             f"{m['versions'].get('transformers')}, peft {m['versions'].get('peft')}, "
             f"bitsandbytes {m.get('bitsandbytes')}.", ""]
    rows = []
    for name, e in result["parts"].items():
        keys = [k for k in e if k not in ("status", "seconds", "traceback", "rows", "error")]
        detail = e.get("error") or ", ".join(
            f"{k}={_fmt(e[k], k)}" for k in keys
            if not isinstance(e[k], (dict, list)))
        for k in keys:
            if isinstance(e[k], dict):
                detail += f"; {k}: " + ", ".join(f"{a}={_fmt(b)}" for a, b in e[k].items())
        rows.append([name, e["status"], e["seconds"], detail])
    lines += [markdown_table(["part", "status", "s", "results"], rows), ""]
    rps = result["parts"].get("early_exit_rps", {}).get("rows")
    if rps:
        lines += ["Early exit, planted exits "
                  f"({result['parts']['early_exit_rps']['planted_shares']} confident by each "
                  "head):", "",
                  markdown_table(["batch", "variant", "RPS", "speedup", "ideal", "mean exit"],
                                 [[r["batch_size"], r["variant"], _fmt(r["rps"]),
                                   _fmt(r["speedup"]), _fmt(r["ideal_speedup"]),
                                   _fmt(r["mean_exit_layer"])] for r in rps],
                                 align="rlrrrr"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python scripts/gpu_check.py [--tiny] [--out DIR] [--budget-s S] [--parts a,b]``."""
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer fp32 model on the CPU")
    p.add_argument("--out", default="logs/gpu_check", help="output folder")
    p.add_argument("--budget-s", type=float, default=480.0, help="global time budget")
    p.add_argument("--parts", default=None, help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--workdir", default=None, help="where the temporary model folder goes")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ddp_worker:
        ddp_worker(a.ddp_worker, a.tiny)
        return 0
    parts = [x for x in a.parts.split(",") if x] if a.parts else None
    result = run_gpu_check(a.out, tiny=a.tiny, budget_s=a.budget_s, parts=parts,
                           workdir=a.workdir)
    return 1 if any(e["status"] == "error" for e in result["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
