"""A quantized run's two ways to serve its adapter, compared on the same prompts.

(A) what gcnee serves: the 4/8-bit base with the LoRA adapter on top, unmerged (the function
    the llm stage recorded states from and the exit heads were trained on);
(B) one explicit dequantize-and-merge: every quantized weight dequantized to float32, the
    adapter merged in, a plain float32 model.

Prints P(yes) differences and both AUCs on the first ``--n`` test prompts of a run's token
cache. Usage (a trained run of ``--config``; ``llm.quantization`` picks the quantization the
base is loaded with)::

    python scripts/qlora_served_vs_merged.py --config configs/ml100k.yaml --n 256 \\
        llm.quantization=nf4
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def dequantize_and_merge(model: torch.nn.Module) -> torch.nn.Module:
    """(B): every LoRA-wrapped bitsandbytes layer of a peft model becomes a float32
    ``nn.Linear`` holding ``dequantize(W) + s·BA`` (peft's own ``merge_and_unload`` would
    quantize the merged weight again); returns the plain base model."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    base_model = model.get_base_model()
    wrapped = [(name, m) for name, m in base_model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        base = module.get_base_layer()
        state = base.state if isinstance(base, bnb.nn.Linear8bitLt) else base.weight.quant_state
        weight = dequantize_bnb_weight(base.weight, state=state).float()
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(weight + delta)
            if base.bias is not None:
                dense.bias.copy_(base.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(base_model.get_submodule(parent_name), child, dense)
    base_model.hf_quantizer = None
    return torch.nn.Module.float(base_model).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from gcnee.config import load_config
    from gcnee.exits.heads import ExitHeads
    from gcnee.exits.scorer import EarlyExitScorer
    from gcnee.llm.backbone import load_backbone, prepare_for_kbit
    from gcnee.metrics import auc
    from gcnee.run import TrainedRun

    cfg = load_config(args.config, args.overrides)
    run = TrainedRun.open(cfg, full_depth=True, tables=False)  # prompts and answer ids
    dm = run.datamodule()
    test = dm.datasets["test"]
    prompts = [list(x) for x in test.input_ids[: args.n]]
    labels = np.asarray(test.labels[: args.n])
    from peft import PeftModel

    base, _ = load_backbone(cfg.llm, cfg.run.checkpoints_dir)
    served = PeftModel.from_pretrained(prepare_for_kbit(base, gradient_checkpointing=False),
                                       run.folder / "llm" / "adapter").eval()
    scores = {}
    for name in ("A: quantized base + adapter", "B: dequantized + merged, float32"):
        model = served if name.startswith("A") else dequantize_and_merge(served)
        n = int(model.config.num_hidden_layers)
        heads = ExitHeads.from_model(model, [n], run.answer_ids, head="answer", init="copy")
        scorer = EarlyExitScorer(model, heads, pad_token_id=run.tokenizer.pad_token_id,
                                 max_length=int(cfg.llm.max_length))
        with torch.no_grad():
            scores[name] = scorer.score_requests(prompts, 8, mode="full").scores.numpy()
    a, b = scores.values()
    print(json.dumps({
        "quantization": cfg.llm.quantization, "n": len(prompts),
        "max_abs_dp": float(np.abs(a - b).max()), "mean_abs_dp": float(np.abs(a - b).mean()),
        "auc": {k: float(auc(labels, v)) for k, v in scores.items()}}, indent=1))


if __name__ == "__main__":
    main()
