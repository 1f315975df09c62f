"""Typed configuration: dataclass schemas, YAML loading, ``key=value`` overrides, validation.

A config file is YAML merged over the schema defaults below; command-line overrides are OmegaConf
dotlist entries (``llm.lora.r=16``). Unknown keys and wrong types fail at once with a message that
names the key and what would have been valid. The resolved config is saved beside every stage
output (``config.yaml``), so every result can be traced to the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class RunConfig:
    name: str | None = None  # defaults to the config file's stem
    seed: int = 0
    checkpoints_dir: str = "checkpoints"  # outputs: <checkpoints_dir>/<name>/<stage>/
    logs_dir: str = "logs"  # TensorBoard and report: <logs_dir>/<name>/


@dataclass
class DataConfig:
    # amazon | bookcrossing | movielens-100k | movielens-1m | recbole
    format: str = "recbole"
    path: str = "data/ml-100k"  # folder holding the raw files
    # Embedded datasets fetched automatically when `path` is missing (only "ml-100k" exists).
    fetch: str | None = None
    # Where to obtain the raw files (shown when they are missing); the paper configs set it.
    source: str | None = None
    # File names inside `path`; null means the format's default (see gcnee/data/readers.py).
    interactions_file: str | None = None
    items_file: str | None = None
    users_file: str | None = None
    # Parsing; null means the format's default.
    sep: str | None = None
    encoding: str | None = None
    # Header lines: null = detected per file (a first line that parses as a data row is data);
    # true/false for every file; or per file, e.g. {interactions: false, items: true} (keys:
    # interactions, items, users; a missing key = detect). The data summary records each decision.
    header: Any = None
    missing_title: str = "drop"  # drop | id: items without a title are dropped or titled by id
    keep_implicit: bool = False  # BookCrossing rating 0 (implicit feedback)
    max_bad_fraction: float = 0.01  # share of malformed lines per file above which the run stops
    # Samples (docs/method.md §1)
    label_threshold: float = 3.0
    label_op: str = ">"  # ">" or ">=": label = rating <op> label_threshold
    max_history: int = 15
    min_history: int = 3
    split: str = "random"  # random | global_time
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    few_shot_count: int | None = None  # training samples the LLM sees (count) ...
    few_shot_fraction: float | None = None  # ... or fraction of train; both null: all of train
    # Classes in the few-shot set: none = a plain seeded draw (the split's imbalance, measured
    # default); stratified = exactly the train split's positive rate; balanced = as many
    # negatives as positives where the data allows (both null above: the majority is cut down).
    few_shot_balance: str = "none"


@dataclass
class RetrieverConfig:
    kind: str = "gcn"  # gcn | llm | random | none
    k: int = 4  # similar users per user
    layers_mode: str = "average"  # average | last
    include_layer0: bool = True  # whether the layer average includes the input embeddings
    embedding_dim: int = 64
    num_layers: int = 3
    lr: float = 1e-3
    epochs: int = 50
    batch_size: int = 2048
    num_negatives: int = 1
    weight_decay: float = 1e-4  # L2 on the batch's embeddings (PyG's BPRLoss lambda_reg)
    patience: int = 5  # early stopping on validation recall@k
    recall_k: int = 20
    search_chunk: int = 1024  # users per block in the cosine top-k search (memory chunk x users)
    # Added by the retriever stage (gcnee/retrieval):
    edges: str = "all"  # all | positive: graph edges = all interactions or rating <op> threshold
    llm_batch_size: int = 8  # kind llm / bench: users per LM forward
    llm_max_length: int = 512  # kind llm / bench: history tokens kept (most recent)
    max_users_llm: int | None = 256  # bench retrieval: users the LLM side embeds (null: all)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LLMConfig:
    model: str = "smollm2-135m-instruct"  # default, local HF folder, GGUF file, or hub id
    answer_words: list[str] = field(default_factory=lambda: ["Yes", "No"])
    quantization: str | None = None  # null | nf4 | int8
    max_length: int = 512
    use_chat_template: bool = True
    loss: str = "vocab"  # vocab | binary
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 4
    eval_batch_size: int = 8
    accumulate_grad_batches: int = 1
    # Cap on the few-shot samples tuned on (seeded subset; null = all of data.few_shot_*), so
    # the training budget can change without rerunning the data and retriever stages.
    max_train_samples: int | None = None
    # Attention kernel: auto = eager on CPU (measured faster than torch's SDPA for these short
    # prompts, in training most: README "Benchmarks"), sdpa on GPU; or eager | sdpa (the layer
    # runner that scores and records states builds its own masks for these two kernels only).
    attention: str = "auto"
    # Recompute each decoder layer's activations in the backward pass instead of keeping them
    # (LoRA training): about a third more compute for a fraction of the activation memory
    # (`gcnee plan` shows both). null = on for a quantized base (QLoRA's usual setting), else off.
    gradient_checkpointing: bool | None = None
    # Run the prompt prefix all rows of a batch share once (gcnee/llm/shared_prefix.py): true,
    # false, or auto = on CPU only (on GPU the extra small forward is not measured to pay).
    share_prefix: str = "auto"


@dataclass
class PromptConfig:
    instruction: str = (
        "Predict whether the user will like the target item. Answer Yes or No."
    )
    examples_per_user: int = 3
    # target_first: a similar user's own rating of the target (if any) before their recent items
    example_order: str = "target_first"  # target_first | recent
    example_template: str = "User {name} rated {title} with {rating} stars."
    history_template: str = "{title} ({rating} stars)"
    target_template: str = "Target item: {title}"
    question: str = "Will the user like the target item? Answer Yes or No."
    # Added with the prompt builder (gcnee/llm/prompts.py):
    examples_header: str = "Ratings by users with similar taste:"  # "" = no header line
    history_header: str = "The user's ratings, oldest first:"
    history_items: int | None = None  # most recent history items shown; null = all of the sample's
    # An explicit aggregate of the similar users' ratings of the target
    # (docs/measurements.md §4), shown as the first example line when at least one of them rated
    # it.
    target_aggregate: bool = False
    target_aggregate_template: str = (
        "On average, similar users rated {title} {mean:.1f} stars ({count} of {k} rated it)."
    )


@dataclass
class ExitsConfig:
    layers: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 25, 30])
    head: str = "answer"  # full | answer
    init: str = "copy"  # random | copy
    lr: float = 1e-3
    beta: float = 0.1  # lr_d = lr * exp(-beta * d)
    lr_depth: str = "head"  # what d counts: head (index among trained heads, 0..) | layer
    epochs: int = 1
    batch_size: int = 8
    # Per-head calibration fitted on validation after head training (gcnee/exits/calibration.py):
    # none | platt | isotonic | auto (per head, the lower out-of-fold log-loss).
    calibration: str = "auto"
    # Training samples the heads see: null = the llm stage's few-shot set; a larger count draws
    # further (seeded) training samples, whose prompts and backbone states are built once.
    max_train_samples: int | None = None
    # Validation samples the calibration is fitted on and the sweep chooses on: null = the llm
    # stage's (eval.val_max_samples, whose recorded states are reused); a larger subset costs
    # one backbone pass per further sample.
    val_samples: int | None = None


@dataclass
class TrainerConfig:
    """Passed through to ``lightning.Trainer`` (epochs and batch sizes live in each stage)."""

    accelerator: str = "auto"
    devices: Any = 1  # int, list of ids, or "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    # Lightning's precision, or auto: bf16-mixed where bf16 is native (CUDA with bf16, CPUs with
    # AVX-512 BF16 or AMX), 32-true on other CPUs (gcnee.precision.resolve_precision).
    precision: str = "32-true"
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    deterministic: bool = False
    enable_progress_bar: bool = True
    num_workers: int = 0  # DataLoader workers
    # Training stages rewrite ckpt/last.ckpt every this many optimizer steps (null: each epoch
    # end); a killed `gcnee fit` resumes from it.
    checkpoint_every_n_steps: int | None = 20


@dataclass
class EvalConfig:
    max_samples: int | None = 2000  # evaluation samples per split (deterministic subset)
    val_max_samples: int | None = None  # validation subset size; null = same as max_samples
    # The untuned LLM (a reference row) is scored on a seeded subset of at most this many of
    # each evaluation subset's samples (null: all of them); the tuned model on all.
    untuned_max_samples: int | None = None
    batch_size: int = 8
    rule: str = "window"  # window | confidence | patience | fixed (window = the head number)
    thresholds: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])
    windows: list[int] = field(default_factory=lambda: [1, 2, 3])
    # The τ sweep runs at window m = `window`; the m sweep at τ = `threshold` (paper Figs 3, 4).
    threshold: float = 0.05
    window: int = 2
    # Requests timed per sweep row (a deterministic subset of the evaluation samples; null =
    # all). AUC is always over every evaluation sample (replayed from one all-heads pass).
    rps_samples: int | None = 512
    # window rule: previous discrepancies needed before it may fire (1 = partial window, so the
    # third exit head is the earliest exit; >= m waits for a full window). gcnee/exits/rules.py
    window_min_prev: int = 1
    # The sweep's other rule families (gcnee/exits/sweep.py): confidence at these τ, patience at
    # these m, and "fixed" (every request at one exit layer) for each head.
    sweep_rules: list[str] = field(
        default_factory=lambda: ["window", "confidence", "patience", "fixed"])
    confidence_thresholds: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9])
    patience_windows: list[int] = field(default_factory=lambda: [2, 3])
    # What the exit rule reads when the heads are calibrated: raw | calibrated P(yes) (scores are
    # calibrated either way).
    rule_reads: str = "raw"
    # The exit rule a trained run serves (predict, serve): chosen = the setting the exit stage
    # chose on validation (its summary's "chosen": rule, τ, m, what the rule reads), config =
    # eval.rule / threshold / window / rule_reads as given.
    exit_setting: str = "chosen"
    # Which calibrated rows the sweep adds for each rule: what their rule reads.
    sweep_rule_reads: list[str] = field(default_factory=lambda: ["raw", "calibrated"])
    # The report's chosen setting: the fastest on validation whose validation AUC is at most this
    # much below full depth's.
    max_auc_loss: float = 0.005
    rps_repeats: int = 3  # interleaved repeats of the sweep's timed runs (medians)
    bootstrap: int = 1000  # resamples for AUC confidence intervals
    # Sibling runs the report compares (gcnee/report/ablations.py): retrieval | layers | k |
    # llm_retriever; [] = none (each is a further llm (+exits) run).
    ablations: list[str] = field(default_factory=list)
    ablation_ks: list[int] = field(default_factory=lambda: [1, 2, 8])  # `k`: retriever.k values


@dataclass
class BaselinesConfig:
    """Traditional CTR baselines of the paper's Table 2 (gcnee/baselines), on all of train."""

    models: list[str] = field(default_factory=list)  # deepfm | din | gru4rec | sim; [] = stage off
    embedding_dim: int = 16
    use_ratings: bool = True  # history behaviour = item embedding + embedding of its rating
    lr: float = 1e-3
    weight_decay: float = 1e-2  # AdamW's own default (decoupled)
    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int = 2048
    patience: int = 2  # early stopping on validation AUC (best epoch's weights are kept)
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])  # DIN/SIM/GRU4Rec head (DIN)
    dropout: float = 0.0  # DIN/SIM/GRU4Rec head
    deepfm_hidden: list[int] = field(default_factory=lambda: [400, 400, 400])  # DeepFM paper
    deepfm_dropout: float = 0.5  # DeepFM paper
    din_attention_hidden: list[int] = field(default_factory=lambda: [80, 40])  # activation unit
    din_activation: str = "dice"  # dice | prelu (activation unit and head of DIN and SIM)
    gru_hidden: int = 100  # GRU4Rec paper
    sim_search: str = "auto"  # hard (genre match) | soft (embedding inner product) | auto
    sim_topk: int = 8  # behaviours the General Search Unit keeps
    sim_heads: int = 2  # Exact Search Unit attention heads
    sim_short_len: int = 5  # most recent behaviours of SIM's short-term (DIN) branch
    # torch intra-op threads while the baselines train (tiny tensors: more threads mostly add
    # synchronisation, 10x slower on a busy 2-core machine); null = torch's default
    num_threads: int | None = 1


@dataclass
class BenchConfig:
    """``gcnee bench`` (gcnee/bench/): what is timed and how often."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # early-exit bench
    requests: int = 32  # test prompts timed per variant (the first n of the test subset)
    repeats: int = 3  # interleaved repeats per variant; medians are reported
    # τ values of eval.rule (at m = eval.window) timed against full depth; null: [eval.threshold]
    # (one τ keeps `bench all` under ~15 min on 2 cores; each extra τ adds ~2 min)
    taus: list[float] | None = None
    scoring_batch_size: int | None = None  # scoring bench; null = eval.batch_size
    train_steps: int = 3  # timed optimizer steps per training bench (after train_warmup)
    train_warmup: int = 1
    profile: bool = False  # torch.profiler of one early-exit batch per batch size
    # `gcnee bench precision`: test prompts scored in fp32, bf16 autocast and bf16 weights
    # (null = the whole test subset) and interleaved repeats of that scoring
    precision_samples: int | None = 256
    precision_repeats: int = 1


@dataclass
class ServeBenchConfig:
    """``gcnee bench serve`` (gcnee/bench/serve.py): the load driven at each server variant."""

    # Server variants, started one after the other: full (full depth), exit (early exit),
    # batch1 (early exit, no batching: serve.max_batch_size=1).
    variants: list[str] = field(default_factory=lambda: ["full", "exit", "batch1"])
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # open loop, requests/s
    concurrency: list[int] = field(default_factory=lambda: [1, 4])  # closed-loop clients
    # Each load level stops at whichever comes first: this many requests, this many seconds of
    # sending; then it waits up to drain_s for the answers still out.
    requests: int = 200
    seconds: float = 10.0
    drain_s: float = 30.0
    p99_ms: float = 1000.0  # target for "sustainable throughput": highest rate with p99 under it
    samples: int = 256  # distinct test-split requests cycled through (the first n)
    startup_s: float = 600.0  # how long a variant's server may take to report ready
    seed: int = 0  # Poisson arrival times


@dataclass
class ServeConfig:
    """``gcnee serve`` (gcnee/serve/): the HTTP service; the exit rule is ``eval``'s."""

    host: str = "127.0.0.1"  # loopback only unless set (--host)
    port: int = 8000
    early_exit: bool = True  # false: full depth, the tuned model's own P(yes)
    max_batch_size: int = 8  # rows per model batch; 1 = no batching
    batch_timeout: float = 0.01  # seconds a batch waits to fill (the longest wait to start)
    queue_limit: int = 256  # rows admitted and not yet answered; more: 503 + Retry-After
    retry_after_s: int = 1  # the Retry-After header of a 503
    max_body_bytes: int = 1_000_000  # larger POST bodies: 413
    max_list: int = 256  # requests in one POST body; more: 413
    workers: int = 1  # model workers per device (each loads the run)
    # torch intra-op threads per worker (null: torch's default). On a CPU shared with other
    # processes, 1 avoids threads waiting for each other at every op (noticed: a 1-row batch of
    # the tiny model 5-13 ms with 1 thread against ~360 ms with 2 on the loaded 2-core machine).
    threads: int | None = None
    timeout: float = 60.0  # seconds a request may wait for a worker before a 504
    drain_s: float = 30.0  # on SIGTERM: seconds in-flight requests may take to finish
    bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)  # gcnee bench
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # gcnee serve


# The trainer settings that can change a training stage's results (progress bars, logging
# intervals and DataLoader workers do not, so changing them never reruns a stage).
TRAINER_RESULT_KEYS = [f"trainer.{k}" for k in (
    "accelerator", "devices", "strategy", "num_nodes", "precision", "gradient_clip_val",
    "deterministic")]


# Keys with a fixed set of values, checked when the config is loaded so that a typo fails in
# well under a second, before torch/transformers are imported; each stage checks again with its
# own constant (tests/test_config.py keeps the two in step).
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.format": ("amazon", "bookcrossing", "movielens-100k", "movielens-1m", "recbole"),
    "data.missing_title": ("drop", "id"),
    "data.label_op": (">", ">="),
    "data.split": ("random", "global_time"),
    "data.few_shot_balance": ("none", "stratified", "balanced"),
    "retriever.kind": ("gcn", "llm", "random", "none"),
    "retriever.layers_mode": ("average", "last"),
    "retriever.edges": ("all", "positive"),
    "llm.loss": ("vocab", "binary"),
    "llm.quantization": (None, "nf4", "int8"),
    "llm.attention": ("auto", "eager", "sdpa"),
    "prompt.example_order": ("target_first", "recent"),
    "exits.head": ("full", "answer"),
    "exits.init": ("random", "copy"),
    "exits.lr_depth": ("head", "layer"),
    "eval.rule": ("window", "confidence", "patience", "fixed", "none"),
    "eval.rule_reads": ("raw", "calibrated"),
    "eval.exit_setting": ("chosen", "config"),
    "exits.calibration": ("none", "platt", "isotonic", "auto"),
}
HEADER_FILES = ("interactions", "items", "users")
# Sample counts where null means "all" and 0 or less is a mistake.
POSITIVE_OR_NULL = ("eval.max_samples", "eval.val_max_samples", "eval.untuned_max_samples")


def check_values(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for a value outside its key's choices (``CHOICES``) or a malformed
    ``data.header``; the message names the key and the valid values."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{key} must be one of {shown}; got {value!r}")
    for key in POSITIVE_OR_NULL:
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) <= 0:
            raise ConfigError(f"{key} must be a positive count or null (all); got {value!r}")
    header = cfg.data.header
    if header is None or isinstance(header, bool):
        return
    if not isinstance(header, DictConfig):
        raise ConfigError(f"data.header must be null, true, false or a mapping of "
                          f"{', '.join(HEADER_FILES)} to true/false/null; got {header!r}")
    for name, value in header.items():
        if name not in HEADER_FILES:
            raise ConfigError(f"unknown key 'data.header.{name}'. Valid keys in data.header: "
                              f"{', '.join(HEADER_FILES)}")
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"wrong type for 'data.header.{name}' (expected true, false or "
                              f"null): {value!r}")


def _schema_at(path: list[str]) -> Any:
    """The dataclass reached by following ``path`` (field names) from ``Config``."""
    cls: Any = Config
    for name in path:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return None
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            return None
        cls = type(default)
    return cls


def _valid_keys(path: list[str]) -> list[str]:
    cls = _schema_at(path)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def _explain(err: Exception, source: str) -> ConfigError:
    """Turn an OmegaConf error into one message naming the key and what was expected."""
    key = getattr(err, "full_key", None) or ""
    parts = [p.split("[")[0] for p in key.split(".") if p]  # "thresholds[0]" -> "thresholds"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(parts[:-1])
        where = ".".join(parts[:-1]) or "the top level"
        return ConfigError(
            f"{source}: unknown key '{key}'. Valid keys in {where}: {', '.join(valid)}"
        )
    if isinstance(err, ValidationError):
        cls = _schema_at(parts[:-1])
        types = {f.name: f.type for f in dataclasses.fields(cls)} if cls is not None else {}
        expected = str(types.get(parts[-1] if parts else "", "the schema's type"))
        value = getattr(err, "msg", str(err)).split("\n")[0]
        return ConfigError(f"{source}: wrong type for '{key}' (expected {expected}): {value}")
    return ConfigError(f"{source}: {err}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                resolve_precision: bool = True) -> DictConfig:
    """Load ``path`` (YAML) over the schema defaults, then apply ``key=value`` overrides.

    ``trainer.precision: auto`` becomes this machine's precision
    (:func:`gcnee.precision.resolve_precision`), so the resolved config saved beside every
    output and the stages' fingerprints name what ran; ``resolve_precision=False`` keeps
    ``auto`` (``gcnee plan`` plans for a GPU, not for the machine it runs on).

    Returns a structured ``DictConfig`` (attribute access, type-checked on assignment). The run
    name defaults to the config file's stem. Values with fixed choices are checked too
    (``check_values``), so every config mistake is a ``ConfigError`` here, before heavy imports.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except (ConfigKeyError, ConfigAttributeError, ValidationError) as err:
            raise _explain(err, str(path)) from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (ConfigKeyError, ConfigAttributeError, ValidationError) as err:
            raise _explain(err, f"override '{item}'") from None
        except yaml.YAMLError:
            # Values are parsed as YAML: '>', '|', '[' etc. start YAML syntax unless quoted.
            key, value = item.split("=", 1)
            raise ConfigError(
                f"override '{item}': the value is not valid YAML; quote it, e.g. "
                f"{key}='{value}' (shell: \"{key}='{value}'\")"
            ) from None
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "default"
    check_values(cfg)
    if resolve_precision:
        from gcnee.precision import resolve_precision as resolve

        cfg.trainer.precision = resolve(cfg.trainer.precision, cfg.trainer.accelerator)[0]
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def section_fingerprint(cfg: DictConfig, keys: list[str]) -> str:
    """A stable hash of the named config sections/keys (dotted paths), for stage caching."""
    picked = {k: OmegaConf.to_container(OmegaConf.select(cfg, k), resolve=True)
              if isinstance(OmegaConf.select(cfg, k), DictConfig) else OmegaConf.select(cfg, k)
              for k in keys}
    blob = json.dumps(picked, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flat(cfg: DictConfig, keys: list[str]) -> dict[str, Any]:
    """``{dotted.key: value}`` for the named sections, to show what changed between runs."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = node

    for k in keys:
        node = OmegaConf.select(cfg, k)
        walk(k, OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig)
             else node)
    return out
