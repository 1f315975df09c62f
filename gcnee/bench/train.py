"""Training-throughput benchmark: samples/s of the LoRA step and of the exit-head step.

Each stage's own LightningModule (``CTRLLMModule``, ``ExitHeadsModule``) runs in a
``lightning.Trainer`` for ``bench.train_warmup + bench.train_steps`` optimizer steps on real,
shuffled training batches of the config (``llm.batch_size`` / ``exits.batch_size``); a callback
times every step from batch start to the end of the optimizer step (forward, backward, AdamW).
No checkpoint, log or model is written: it only watches for regressions.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf


class StepTimer(L.Callback):
    """Seconds and batch shape of every training step (batch start -> after optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.shapes: list[tuple[int, int]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        self.shapes.append(tuple(batch["input_ids"].shape))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def step_stats(seconds: list[float], shapes: list[tuple[int, int]], warmup: int
               ) -> dict[str, Any]:
    """Median seconds per step and samples/s over the steps after ``warmup``."""
    sec, shp = seconds[warmup:], shapes[warmup: len(seconds)]
    if not sec:
        raise ValueError(f"no timed step after {warmup} warm-up step(s): the training split has "
                         f"too few batches (bench.train_steps / bench.train_warmup)")
    return {"timed_steps": len(sec), "seconds_per_step": float(statistics.median(sec)),
            "samples_per_second": float(statistics.median(b / s for (b, _), s in zip(shp, sec))),
            "mean_tokens": float(statistics.mean(t for _, t in shp)),
            "seconds": [round(s, 4) for s in sec]}


def time_training_steps(module: L.LightningModule, datamodule: L.LightningDataModule,
                        trainer_cfg: Any, steps: int, warmup: int = 1) -> dict[str, Any]:
    """Run ``warmup + steps`` optimizer steps of ``module`` (single process) and time them."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=trainer_cfg.accelerator, devices=1, precision=trainer_cfg.precision,
            max_steps=int(warmup) + int(steps), max_epochs=-1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
            use_distributed_sampler=False, default_root_dir=tmp)
        trainer.fit(module, datamodule=datamodule)
    return step_stats(timer.seconds, timer.shapes, int(warmup))


def lora_variants(cfg: Any) -> list[tuple[str, dict[str, Any]]]:
    """The LoRA step as configured, then with prefix sharing flipped and with the other
    attention kernel: ``[(row label suffix, llm.* changes)]`` (ratios measured in one run)."""
    from gcnee.llm.backbone import attn_implementation
    from gcnee.llm.load_plan import local_device
    from gcnee.llm.shared_prefix import resolve_share_prefix

    device = local_device(cfg.trainer.accelerator)
    sharing = resolve_share_prefix(cfg.llm.share_prefix, device)
    attention = attn_implementation(cfg.llm.attention, cfg.trainer.accelerator) or "sdpa"
    other = "sdpa" if attention == "eager" else "eager"
    return [("", {}),
            (f", prefix sharing {'off' if sharing else 'on'}",
             {"share_prefix": "false" if sharing else "true"}),
            (f", {other} attention", {"attention": other})]


def bench_train(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """LoRA step (base model + fresh adapters, ``llm.*``; :func:`lora_variants`) and exit-head
    step (merged model + fresh heads, ``exits.*``) of a run; JSON to ``.../bench/train.json``."""
    from gcnee.bench.early_exit import bench_dir
    from gcnee.bench.inputs import open_run
    from gcnee.bench.report import load_average, machine_info
    from gcnee.exits.heads import ExitHeads
    from gcnee.exits.module import ExitHeadsModule
    from gcnee.llm.backbone import answer_token_ids, load_backbone, prepare_for_training
    from gcnee.llm.load_plan import plan_of
    from gcnee.llm.module import CTRLLMModule
    from gcnee.stages import write_json

    out = Path(out_dir) if out_dir is not None else bench_dir(cfg)
    steps, warmup = int(cfg.bench.train_steps), int(cfg.bench.train_warmup)
    result: dict[str, Any] = {"machine": machine_info(), "run": str(cfg.run.name),
                              "steps": steps, "warmup": warmup, "stages": []}
    L.seed_everything(int(cfg.run.seed), verbose=False)
    # The tuned run: its prompts (token cache) for both stages, its merged model for the heads.
    run = open_run(cfg, full_depth=True)
    cfg = run.cfg

    for label, change in lora_variants(cfg):
        llm_cfg = OmegaConf.merge(cfg.llm, change)
        model, tokenizer = load_backbone(llm_cfg, cfg.run.checkpoints_dir, plan=plan_of(cfg))
        model = prepare_for_training(model, llm_cfg)
        yes_id, no_id = answer_token_ids(tokenizer, list(cfg.llm.answer_words),
                                         cfg.llm.use_chat_template)
        dm = run.datamodule()
        lora = CTRLLMModule(model, yes_id, no_id, llm_cfg)
        stats = time_training_steps(lora, dm, cfg.trainer, steps, warmup)
        result["stages"].append({
            "stage": f"llm (LoRA){label}", "batch_size": int(cfg.llm.batch_size),
            "lora": {"r": int(cfg.llm.lora.r), "target_modules": list(cfg.llm.lora.target_modules)},
            "attention": str(model.config._attn_implementation),
            "share_prefix": str(llm_cfg.share_prefix), **stats})
        del lora, model

    heads = ExitHeads.from_model(run.model, list(cfg.exits.layers), run.answer_ids,
                                 head=cfg.exits.head, init=cfg.exits.init)
    dm = run.datamodule(batch_size=int(cfg.exits.batch_size))
    module = ExitHeadsModule(run.model, heads, lr=float(cfg.exits.lr), beta=float(cfg.exits.beta),
                             lr_depth=cfg.exits.lr_depth,
                             share_prefix=cfg.llm.get("share_prefix", "auto"),
                             max_length=int(cfg.llm.max_length))
    stats = time_training_steps(module, dm, cfg.trainer, steps, warmup)
    result["stages"].append({"stage": "exits (heads)", "batch_size": int(cfg.exits.batch_size),
                             "layers": list(cfg.exits.layers), "head": cfg.exits.head, **stats})
    result["load_average_end"] = load_average()
    write_json(out / "train.json", result)
    return result
