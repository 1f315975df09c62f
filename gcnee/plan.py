r"""``gcnee plan``: what each stage holds in GPU memory, host memory and on disk, from the model's
``config.json`` alone (no weights are read, no torch model is built).

Where the config comes from (:func:`find_model_config`): ``--model-config FILE``; a local model
folder's ``config.json`` (``llm.model``); the fetched default model's folder; a config shipped
in ``gcnee/model_configs/`` for the paper's hub ids (:data:`SHIPPED`); the local Hugging Face
cache. Anything else is an error that says where to put a ``config.json``.

Symbols: ``V`` vocabulary, ``H`` hidden size, ``I`` intermediate size, ``N`` decoder layers,
``a``/``kv`` attention/key-value heads, ``d = H / a`` head dim (or ``head_dim``), ``B`` the
per-GPU batch, ``T = llm.max_length``, ``E`` exit layers, ``s`` bytes of the compute dtype
(``trainer.precision``: ``bf16-*``/``16-*`` 2, ``32-*`` 4). GiB = 2^30 bytes.

**Parameters** (counted from the shapes): per layer ``q: H·a·d``, ``k, v: H·kv·d``, ``o: a·d·H``
(+ biases where the model type has them: Qwen2 q/k/v), ``gate, up, down: H·I`` each, two norms
``2H`` (Qwen3: + ``2d`` q/k norms); plus embeddings ``V·H``, final norm ``H`` and the output
head ``V·H`` unless tied.

**Weights on the GPU.** Frozen and merged models in the compute dtype (``P·s``; the load-plan
semantics: ``bf16-*`` bf16, ``16-*`` fp16, ``32-*`` fp32). ``llm.quantization=nf4``: the decoder's
linear layers at 4.5 bits per parameter (4-bit codes plus double-quantized block constants),
``int8``: 1 byte per parameter plus one fp32 scale per output row; the rest (embeddings, head,
norms, biases) is cast to fp32 by peft's k-bit preparation in the llm stage (``4`` bytes), and kept
in the compute dtype by the exit stage (quantized base plus the adapter, not merged).

**Trainable parameters** (LoRA, exit heads) train in fp32 under ``-mixed`` and ``32-*``: ``4``
bytes weight + ``4`` gradient + ``8`` AdamW moments = 16 bytes per trainable parameter; under
``bf16-true``/``16-true`` the LoRA adapters are cast with everything else (``4·s`` = 8 bytes;
the exit heads stay fp32). LoRA on ``llm.lora.target_modules`` adds ``r·(in + out)`` per
adapted projection per layer (shapes from the config). A quantized model with ``-true``
precision is refused, as the load plan (``gcnee.llm.load_plan``) refuses it.

**Activations of a training step** (saved for backward; measured per decoder layer and token
with autograd's saved-tensor hooks on a LoRA(q, v) Llama, sdpa, on the CPU):
``A_layer = B·T·((14.5 + 6s)·H + 3s·I)`` bytes (the 14.5·H are RMSNorm's fp32 tensors);
eager attention adds ``B·a·T²·(4 + s)`` (fp32 softmax and its cast). Without gradient
checkpointing ``N·A_layer``; with it ``N·B·T·H·s`` (layer inputs) plus one recomputed layer
``A_layer``. Both are shown; the total uses checkpointing when the stage turns it on
(``llm.gradient_checkpointing``; null: on for a quantized base). Added to both: the backward's
working set of one layer (``A_layer``), the final norm ``8·B·T·H`` and the head:
``llm.loss=vocab`` reads the whole head in fp32 (a ``4·V·H`` copy kept for backward when the
weights are not fp32, and ``B·V`` fp32 logits and their softmax, ``8·B·V``); ``binary`` two rows
(``8·B`` + ``8·H``).

**Inference** (scoring, state recording, the frozen backbone of the exit stage): one layer's
working set ``B·T·(4H + 3I)·s`` (+ eager ``B·a·T²·(4 + s)``), no saved activations.

**Exit heads** (``exits.head``): ``full`` = a norm and a ``V·H`` projection per trainable exit
layer, ``answer`` = a norm and ``2·H``; the head at layer ``N`` (the model's own) holds 2 rows
and is frozen. Trainable heads: 16 bytes per parameter (above); their step also holds fp32
logits ``8·B·V`` (full) per head.

**Recorded states.** The llm stage records the last position's output at the ``E`` exit layers
for its validation and test samples: each rank streams its batches to a shard on disk
(``gcnee.llm.states``; host: one batch, ``B·E·H·4``), rank 0 merges them into
``hidden_{val,test}.npy``, ``(n_val + n_test)·E·H·4`` bytes (fp32; the shards take the same
again until the merge ends, shown as the disk peak). The exit stage memory-maps them and reads a
batch's rows; it keeps its own training samples' states in host memory only when
``exits.epochs > 1`` (``n_train·E_trained·H·4`` per rank). Export: the merged weights are built
on the host (``P·s``, rank 0), not as a second copy on the GPU; a quantized base is not merged
(the adapter is saved, the exit stage runs quantized base + adapter). Samples come from the data
stage's ``summary.json`` when it exists (capped by ``eval.max_samples``,
``llm.max_train_samples``, ``exits.*``), else from ``--samples``, else "unknown".

Host memory also counts the datamodule's token cache, ``(n_train + n_val + n_test)·T·8``.

**DDP** (``trainer.devices``): every rank holds a full replica and its own batch, so the per-GPU
columns do not change with the number of GPUs; host memory is per rank (x ranks per node).
A fixed 1 GiB is added per GPU for the CUDA context and allocator slack.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gcnee.config import ConfigError

GiB = 2**30
CUDA_CONTEXT = 1 * GiB
DEFAULT_GPU_MEMORY = 80 * GiB
NF4_BITS = 4.5  # 4-bit codes + double-quantized absmax per 64-block (bitsandbytes)
TRAINABLE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg, exp_avg_sq

# Hub ids whose config.json ships with the package (gcnee/model_configs/).
SHIPPED = {
    "lmsys/vicuna-7b-v1.5": "vicuna-7b-v1.5.json",
    "Qwen/Qwen2.5-7B": "Qwen2.5-7B.json",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen2.5-7B-Instruct.json",
}
# Model types whose q/k/v projections carry a bias whatever ``attention_bias`` says.
_QKV_BIAS = ("qwen2",)
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shipped_config_path(name: str) -> Path:
    """The packaged ``config.json`` copy for a hub id in :data:`SHIPPED`."""
    return Path(str(resources.files("gcnee") / "model_configs" / SHIPPED[name]))


def find_model_config(cfg: Any, model_config: str | Path | None = None) -> tuple[dict, str]:
    """``(config.json as a dict, where it was found)`` for ``cfg.llm.model`` (module docstring);
    ``ConfigError`` saying where to put one when none is found."""
    model = str(cfg.llm.model)
    candidates: list[Path] = []
    if model_config is not None:
        candidates.append(Path(model_config))
    path = Path(model).expanduser()
    if path.is_dir():
        candidates.append(path / "config.json")
    elif model.endswith(".gguf"):
        candidates.append(path.parent / "config.json")
    candidates.append(Path(cfg.run.checkpoints_dir) / "base" / model / "config.json")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text()), str(c)
    if model_config is not None:
        raise ConfigError(f"--model-config: no such file: {model_config}")
    if model in SHIPPED:
        p = shipped_config_path(model)
        return json.loads(p.read_text()), f"{p} (shipped copy of {model}'s config.json)"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a valid hub id, or no hub library
        found = None
    if isinstance(found, str):
        return json.loads(Path(found).read_text()), f"{found} (Hugging Face cache)"
    from gcnee.preflight import DEFAULT_MODEL_NAMES

    if model in DEFAULT_MODEL_NAMES:
        raise ConfigError(f"gcnee plan: the default model {model} is not fetched yet (its "
                          f"config.json goes to {candidates[-1]}): run `gcnee model fetch "
                          f"{model}` first")
    raise ConfigError(
        f"gcnee plan: no config.json for llm.model={model!r}. Put the model's config.json in a "
        f"folder and set llm.model=<that folder> (a local model folder has one), or pass "
        f"--model-config path/to/config.json; shipped configs: {', '.join(SHIPPED)}")


# -- shapes ------------------------------------------------------------------------------------

@dataclass
class Shapes:
    """The sizes of a decoder-only LM read from its ``config.json``."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, c: dict) -> Shapes:
        c = {**c.get("text_config", {}), **c}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in c]
        if missing:
            raise ConfigError(f"gcnee plan: config.json lacks {', '.join(missing)}")
        h, a = int(c["hidden_size"]), int(c["num_attention_heads"])
        mt = str(c.get("model_type", "llama"))
        return cls(model_type=mt, vocab=int(c["vocab_size"]), hidden=h,
                   intermediate=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]),
                   heads=a, kv_heads=int(c.get("num_key_value_heads") or a),
                   head_dim=int(c.get("head_dim") or h // a),
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=mt in _QKV_BIAS or bool(c.get("attention_bias", False)),
                   qk_norm=mt.startswith("qwen3"))

    def projections(self) -> dict[str, tuple[int, int]]:
        """``{name: (in_features, out_features)}`` of one decoder layer's linear layers."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.projections().values())

    def layer_other_params(self) -> int:
        """Norms and biases of one layer (kept unquantized)."""
        p = self.projections()
        bias = p["q_proj"][1] + p["k_proj"][1] + p["v_proj"][1] if self.qkv_bias else 0
        return 2 * self.hidden + bias + (2 * self.head_dim if self.qk_norm else 0)

    def embedding_params(self) -> int:
        """Embeddings, final norm and (untied) output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def total_params(self) -> int:
        return (self.layers * (self.layer_linear_params() + self.layer_other_params())
                + self.embedding_params())

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Trainable LoRA parameters: ``r·(in + out)`` per adapted projection per layer."""
        p = self.projections()
        unknown = [t for t in targets if t not in p]
        if unknown:
            raise ConfigError(f"llm.lora.target_modules: {unknown} are not projections of a "
                              f"{self.model_type} layer ({', '.join(p)})")
        return self.layers * sum(r * (p[t][0] + p[t][1]) for t in targets)


# -- precision ---------------------------------------------------------------------------------

def compute_bytes(precision: str) -> int:
    """Bytes per element of the compute dtype of ``trainer.precision`` on CUDA (bf16/16: 2,
    32: 4), as the load plan (:mod:`gcnee.llm.load_plan`) loads the weights."""
    from gcnee.llm.load_plan import load_plan

    return load_plan(precision, device="cuda").compute_dtype.itemsize


def trainable_bytes(precision: str) -> int:
    """Bytes per trainable LoRA parameter: weight + gradient + two AdamW moments, in fp32 unless
    ``-true`` half precision casts the adapters too."""
    p = str(precision)
    return 4 * compute_bytes(p) if p in ("bf16-true", "16-true") else TRAINABLE_BYTES


def weight_bytes(shapes: Shapes, precision: str, quantization: str | None,
                 rest_fp32: bool) -> float:
    """Bytes of the model's weights on one GPU (module docstring). ``rest_fp32``: the
    unquantized parameters were cast to fp32 (peft's k-bit preparation)."""
    s = compute_bytes(precision)
    if quantization is None:
        return shapes.total_params() * s
    lin = shapes.layers * shapes.layer_linear_params()
    rest = shapes.total_params() - lin
    if quantization == "nf4":
        q = lin * NF4_BITS / 8
    elif quantization == "int8":
        rows = shapes.layers * sum(o for _, o in shapes.projections().values())
        q = lin + 4 * rows
    else:
        raise ConfigError(f"llm.quantization={quantization!r} is not one of nf4, int8")
    return q + rest * (4 if rest_fp32 else s)


def layer_train_activations(shapes: Shapes, batch: int, seq: int, s: int, eager: bool) -> float:
    """Saved activations of one decoder layer's training forward (bytes)."""
    h, i = shapes.hidden, shapes.intermediate
    out = batch * seq * ((14.5 + 6 * s) * h + 3 * s * i)
    if eager:
        out += batch * shapes.heads * seq * seq * (4 + s)
    return out


def layer_inference_workspace(shapes: Shapes, batch: int, seq: int, s: int,
                              eager: bool) -> float:
    """One layer's live tensors in a no-grad forward (bytes)."""
    out = batch * seq * (4 * shapes.hidden + 3 * shapes.intermediate) * s
    if eager:
        out += batch * shapes.heads * seq * seq * (4 + s)
    return out


def head_bytes(shapes: Shapes, kind: str, layers: list[int]) -> tuple[int, int]:
    """``(trainable params, frozen params)`` of the exit heads (``exits.head``)."""
    trainable = [x for x in layers if x != shapes.layers]
    rows = shapes.vocab if kind == "full" else 2
    per = shapes.hidden * rows + shapes.hidden
    frozen = 2 * shapes.hidden + shapes.hidden if shapes.layers in layers else 0
    return per * len(trainable), frozen


def parse_memory(text: str) -> int:
    """``80GB``, ``40GiB``, ``80G``, ``81920MB`` or a number of GB -> bytes (GB = GiB: GPU
    memory is sold in binary units, an "A100 80GB" has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-memory: cannot read {text!r} (e.g. 80GB, 40GiB)")
    unit = {"": 2**30, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def visible_gpu_memory() -> tuple[int, str]:
    """``(bytes, what)`` of the visible GPU, else :data:`DEFAULT_GPU_MEMORY`."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return int(p.total_memory), p.name
    except Exception:  # no torch / broken driver: the default stands
        pass
    return DEFAULT_GPU_MEMORY, "no GPU visible: 80 GiB assumed"


# -- samples -----------------------------------------------------------------------------------

def sample_counts(cfg: Any, samples: str | None = None) -> tuple[dict[str, int | None], str]:
    """``({llm_train, val, test, exit_train, exit_val}, source)``: the data stage's split sizes
    (``summary.json``) or ``--samples`` (``N`` for every split, or ``train=..,val=..,test=..``),
    capped as the stages cap them; None where unknown."""
    summary = Path(cfg.run.checkpoints_dir) / str(cfg.run.name) / "data" / "summary.json"
    split: dict[str, int | None] = {"train": None, "val": None, "test": None, "few_shot": None}
    source = "unknown (no data stage output; pass --samples)"
    if samples is not None:
        parts = [p for p in str(samples).split(",") if p]
        try:
            if len(parts) == 1 and "=" not in parts[0]:
                split = dict.fromkeys(split, int(parts[0]))
            else:
                split.update({k.strip(): int(v) for k, v in (p.split("=") for p in parts)})
        except ValueError:
            raise ConfigError(f"--samples: cannot read {samples!r} (N, or train=N,val=N,test=N)"
                              ) from None
        if split.get("few_shot") is None:
            split["few_shot"] = split["train"]
        source = f"--samples {samples}"
    elif summary.is_file():
        d = json.loads(summary.read_text())
        split = {k: int(v["samples"]) for k, v in d["splits"].items()}
        split["few_shot"] = int(d.get("few_shot", split["train"]))
        source = str(summary)

    def cap(n: int | None, limit: Any) -> int | None:
        return n if n is None or limit is None else min(n, int(limit))

    e = cfg.eval
    val = cap(split["val"], e.val_max_samples if e.val_max_samples is not None
              else e.max_samples)
    train = cap(split["few_shot"], cfg.llm.max_train_samples)
    ex = cfg.exits
    return {"llm_train": train, "val": val, "test": cap(split["test"], e.max_samples),
            "exit_train": (cap(split["train"], ex.max_train_samples)
                           if ex.max_train_samples is not None else train),
            "exit_val": cap(split["val"], ex.val_samples) if ex.val_samples is not None
            else val}, source


# -- the plan ----------------------------------------------------------------------------------

@dataclass
class StageRow:
    """One stage's bytes per GPU (``gpu_*``), per rank on the host, and on disk (None: unknown)."""

    stage: str
    gpu_weights: float
    gpu_trainable: float  # trainable params + gradients + optimizer state
    act_no_ckpt: float
    act_ckpt: float
    uses_ckpt: bool
    gpu_heads: float
    gpu_total: float
    fits: str
    host: float | None
    disk: float | None
    notes: str = ""


@dataclass
class Plan:
    model: str
    config_source: str
    params: int
    shapes: dict
    settings: dict
    samples: dict
    samples_source: str
    gpu_memory: int
    gpu_memory_source: str
    rows: list[StageRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fits(total: float, gpu: int) -> str:
    if total > gpu:
        return "no"
    return "tight" if total > 0.9 * gpu else "yes"


def _mul(n: int | None, per: float) -> float | None:
    return None if n is None else n * per


def _add(*xs: float | None) -> float | None:
    return None if any(x is None for x in xs) else float(sum(xs))  # type: ignore[arg-type]


def plan_memory(cfg: Any, model_config: dict, config_source: str = "",
                gpu_memory: int | None = None, gpu_memory_source: str = "",
                samples: str | None = None) -> Plan:
    """The per-stage memory plan of ``cfg`` for the model described by ``model_config``
    (a ``config.json`` dict); formulas in the module docstring."""
    sh = Shapes.from_config(model_config)
    from gcnee.llm.load_plan import load_plan

    prec, quant = str(cfg.trainer.precision), cfg.llm.quantization
    if prec == "auto":  # what auto means on the GPUs this plans for (bf16: A100, H100, ...)
        prec = "bf16-mixed"
    load_plan(prec, quant, device="cuda")  # the combinations the loaders refuse, refused here
    s = compute_bytes(prec)
    eager = str(cfg.llm.attention) == "eager"
    if gpu_memory is None:
        gpu_memory, gpu_memory_source = visible_gpu_memory()
    counts, counts_source = sample_counts(cfg, samples)
    layers = sorted({int(x) for x in cfg.exits.layers if 1 <= int(x) <= sh.layers})
    E = len(layers)
    T, H, V = int(cfg.llm.max_length), sh.hidden, sh.vocab
    lora = sh.lora_params(int(cfg.llm.lora.r), list(cfg.llm.lora.target_modules))
    rows: list[StageRow] = []

    def row(stage: str, weights: float, trainable: float, no_ck: float, ck: float,
            use_ck: bool, heads: float, extra: float, host: float | None, disk: float | None,
            notes: str = "") -> None:
        total = weights + trainable + (ck if use_ck else no_ck) + heads + extra + CUDA_CONTEXT
        rows.append(StageRow(stage, weights, trainable, no_ck, ck, use_ck, heads, total,
                             _fits(total, gpu_memory), host, disk, notes))

    # llm stage, training: frozen base + LoRA (fp32) + saved activations + the head's logits.
    b = int(cfg.llm.batch_size)
    w_llm = weight_bytes(sh, prec, quant, rest_fp32=True)
    a_layer = layer_train_activations(sh, b, T, s, eager)
    common = a_layer + 8 * b * T * H  # backward working set, final norm
    if str(cfg.llm.loss) == "vocab":
        head_fp32 = 0 if (s == 4 or quant is not None) else 4 * V * H
        common += head_fp32 + 8 * b * V
    else:
        common += 8 * b + 8 * H
    no_ck = sh.layers * a_layer + common
    ck = sh.layers * b * T * H * s + a_layer + common
    ckpt_bytes = lora * (4 + 8)  # Lightning's last.ckpt: LoRA weights + AdamW moments
    # The datamodule's token cache: every split's prompts, int64 ids (upper bound: T each).
    tokens = _mul(_add(counts["llm_train"], counts["val"], counts["test"]), 8 * T)
    use_ck = cfg.llm.get("gradient_checkpointing")
    use_ck = quant is not None if use_ck is None else bool(use_ck)
    row("llm train", w_llm, lora * trainable_bytes(prec), no_ck, ck, use_ck, 0, 0,
        host=tokens, disk=ckpt_bytes,
        notes="checkpointing on (llm.gradient_checkpointing)" if use_ck else
        "no checkpointing (llm.gradient_checkpointing=true to turn it on)")

    # llm stage, evaluation (validation + test scoring through the layer runner, states kept).
    eb = int(cfg.llm.eval_batch_size)
    inf = layer_inference_workspace(sh, eb, T, s, eager)
    n_eval = _add(counts["val"], counts["test"])
    states = _mul(n_eval, E * H * 4)
    row("llm eval + record", w_llm, 0, inf, inf, False, 0, 0, host=_add(tokens, eb * E * H * 4),
        disk=_mul(n_eval, 2 * E * H * 4),
        notes=f"states of {E} exit layers streamed to disk per rank ({_gib(states)} GiB "
              "merged; shards as much again until merged)")
    # llm stage, export: the merged weights are built on the host (rank 0); k-bit: adapter only.
    merged = sh.total_params() * s if quant is None else 0
    row("llm export", w_llm, 0, 0, 0, False, 0, 0, host=merged + lora * 4,
        disk=merged + lora * 4,
        notes="merged/ built on the host" if quant is None else
        "quantized base: adapter/ only (not merged)")

    # exit stage: frozen merged backbone (compute dtype; quantized base + adapter if k-bit),
    # trainable heads, the backbone's no-grad workspace at exits.batch_size.
    xb = int(cfg.exits.batch_size)
    w_exit = weight_bytes(sh, prec, quant, rest_fp32=False) + (lora * 4 if quant else 0)
    trainable, frozen = head_bytes(sh, str(cfg.exits.head), layers)
    n_trained = len([x for x in layers if x != sh.layers])
    head_act = n_trained * xb * ((8 * V if cfg.exits.head == "full" else 8 * 2) + 8 * H)
    inf_x = layer_inference_workspace(sh, xb, T, s, eager)
    cache = (_mul(counts["exit_train"], n_trained * H * 4) if int(cfg.exits.epochs) > 1
             else 0.0)
    heads_disk = (trainable + frozen) * 4  # every head is fp32 (gcnee.exits.heads)
    row("exits train", w_exit, trainable * TRAINABLE_BYTES, inf_x + head_act, inf_x + head_act,
        False, frozen * 4, 0, host=cache, disk=heads_disk + trainable * 12,
        notes=f"{n_trained} trained {cfg.exits.head} heads (fp32); "
              + ("training states cached on the host" if cache else
                 "one epoch: no state cache") + "; val/test states memory-mapped")
    sb = int(cfg.eval.batch_size)
    inf_s = layer_inference_workspace(sh, sb, T, s, eager)
    row("exits sweep", w_exit, 0, inf_s, inf_s, False, heads_disk, 0,
        host=sb * E * H * 4, disk=heads_disk,
        notes="early-exit scoring of the test split at eval.batch_size")

    settings = {"precision": prec, "quantization": quant, "max_length": T,
                "batch_size": b, "eval_batch_size": eb, "exit_batch_size": xb,
                "sweep_batch_size": sb, "loss": str(cfg.llm.loss),
                "lora": {"r": int(cfg.llm.lora.r),
                         "target_modules": list(cfg.llm.lora.target_modules),
                         "params": lora},
                "exit_layers": layers, "exit_head": str(cfg.exits.head),
                "devices": cfg.trainer.devices, "strategy": str(cfg.trainer.strategy),
                "attention": str(cfg.llm.attention)}
    return Plan(model=str(cfg.llm.model), config_source=config_source,
                params=sh.total_params(), shapes=asdict(sh), settings=settings,
                samples=counts, samples_source=counts_source, gpu_memory=int(gpu_memory),
                gpu_memory_source=gpu_memory_source, rows=rows)


def plan_from_config(cfg: Any, gpu_memory: str | None = None, samples: str | None = None,
                     model_config: str | Path | None = None) -> Plan:
    """:func:`plan_memory` with the model's config found by :func:`find_model_config` and
    ``--gpu-memory`` parsed (None: the visible GPU's, else 80 GiB)."""
    mc, where = find_model_config(cfg, model_config)
    mem = parse_memory(gpu_memory) if gpu_memory is not None else None
    return plan_memory(cfg, mc, where, mem, f"--gpu-memory {gpu_memory}" if mem else "",
                       samples)


def _gib(x: float | None) -> str:
    if x is None:
        return "unknown"
    return f"{x / GiB:.2f}" if x < GiB else f"{x / GiB:.1f}"


def format_plan(plan: Plan) -> str:
    """The plan as text: a header and one markdown table row per stage (GiB)."""
    st = plan.settings
    lora = st["lora"]
    ranks = os.environ.get("WORLD_SIZE")
    head = [
        f"model: {plan.model} ({plan.params / 1e9:.2f}e9 parameters; config: "
        f"{plan.config_source})",
        f"precision {st['precision']}, quantization {st['quantization']}, max_length "
        f"{st['max_length']}, batch {st['batch_size']} (eval {st['eval_batch_size']}, exits "
        f"{st['exit_batch_size']}, sweep {st['sweep_batch_size']}) per GPU, loss {st['loss']}, "
        f"LoRA r={lora['r']} on {','.join(lora['target_modules'])} ({lora['params']:,} params)",
        f"exit heads: {st['exit_head']} at layers {st['exit_layers']}; devices "
        f"{st['devices']}, strategy {st['strategy']} (DDP: every GPU holds all of this)"
        + (f"; WORLD_SIZE={ranks}" if ranks else ""),
        f"samples: {plan.samples} ({plan.samples_source})",
        f"GPU memory: {plan.gpu_memory / GiB:.0f} GiB ({plan.gpu_memory_source or 'given'}); "
        f"totals include {CUDA_CONTEXT / GiB:.0f} GiB CUDA context",
        "",
        "| stage | GPU weights | trainable+grads+optim | activations no ckpt | activations "
        "ckpt | heads | total / GPU | fits? | host / rank | disk |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in plan.rows:
        mark = ("", " *") if r.uses_ckpt else (" *", "")
        head.append(
            f"| {r.stage} | {_gib(r.gpu_weights)} | {_gib(r.gpu_trainable)} | "
            f"{_gib(r.act_no_ckpt)}{mark[0]} | {_gib(r.act_ckpt)}{mark[1]} | "
            f"{_gib(r.gpu_heads)} | {_gib(r.gpu_total)} | {r.fits} | {_gib(r.host)} | "
            f"{_gib(r.disk)} |")
    head += ["", "GiB; * = the activations in the total. " + "; ".join(
        f"{r.stage}: {r.notes}" for r in plan.rows if r.notes)]
    return "\n".join(head)
