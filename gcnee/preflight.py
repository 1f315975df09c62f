"""Checks a command makes before any stage runs, without importing torch or transformers.

``check_model`` resolves ``llm.model`` the way ``gcnee.llm.backbone.resolve_model`` will, but
only with the standard library (and ``huggingface_hub``'s cache lookup, which is light): the
default model name, an existing HF folder (with ``config.json``) or ``.gguf`` file, or a hub id
that is in the local cache or reachable on a machine with hub access. Anything else stops the
run at once with a ``ConfigError`` naming ``llm.model`` and the path it looked for, instead of a
hub traceback after the data and retriever stages (``tests/tiny-model`` looks like a hub id).

``stages_needing_model`` says which of the stages a command will run load ``llm.model``.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gcnee.config import ConfigError

# The names gcnee.llm.backbone.DEFAULT_MODELS fetches itself (tests/test_cli.py keeps them equal).
DEFAULT_MODEL_NAMES = ("smollm2-135m-instruct",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_TIMEOUT_S = 5.0


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover  (transformers depends on it)
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects is not cached either
        return False
    return isinstance(found, str)


def _hub_status(repo_id: str) -> tuple[bool, str]:
    """(usable?, why not) for a hub id, asking the hub's model API with a short timeout."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{repo_id}"
    request = urllib.request.Request(url, method="HEAD")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S):
            return True, ""
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # gated or private: exists; the loader reports the token
            return True, ""
        if err.code == 404:
            return False, f"the hub at {endpoint} has no model {repo_id!r}"
        return False, f"the hub at {endpoint} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return False, f"the hub at {endpoint} is not reachable from this machine ({reason})"


def check_model(llm_cfg: Any, checkpoints_dir: str | Path = "checkpoints") -> str:
    """What ``llm.model`` will load, in words; ``ConfigError`` naming the key if nothing.

    Never downloads: the default model is fetched later by its stage (``gcnee model fetch``),
    a hub id is only looked up (cache, then one HEAD request unless ``HF_HUB_OFFLINE``).
    """
    model = str(llm_cfg.model)
    if model in DEFAULT_MODEL_NAMES:
        folder = Path(checkpoints_dir) / "base" / model
        return (f"default model {model} ({'cached in' if folder.is_dir() else 'fetched into'} "
                f"{folder})")
    path = Path(model).expanduser()
    where = f"{path} (relative to {Path.cwd()})" if not path.is_absolute() else str(path)
    if model.endswith(".gguf"):
        if path.is_file():
            return f"GGUF file {path}"
        raise ConfigError(f"llm.model: GGUF file not found: {where}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return f"model folder {path}"
        raise ConfigError(f"llm.model: {path} has no config.json; expected a Hugging Face "
                          "model folder (config.json, weights, tokenizer) or a .gguf file")
    if path.exists():
        raise ConfigError(f"llm.model: {path} is a file but not a .gguf file; expected a "
                          "Hugging Face model folder or a .gguf file")
    looks_local = model.startswith(("/", "./", "../", "~", ".")) or not _HUB_ID.match(model)
    expected = (f"a Hugging Face model folder, a .gguf file, {', '.join(DEFAULT_MODEL_NAMES)}, "
                "or a hub id on a machine with hub access")
    if looks_local:
        raise ConfigError(f"llm.model: no such folder or file: {where} (expected {expected})")
    if _cached(model):
        return f"hub model {model} (in the local Hugging Face cache)"
    if _offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    else:
        ok, why = _hub_status(model)
        if ok:
            return f"hub model {model}"
    raise ConfigError(f"llm.model: {model!r} is not a folder or file here (no such path: "
                      f"{where}) and cannot be used as a hub id: {why}. Expected {expected}.")


def stages_needing_model(cfg: Any, stages: list[str]) -> list[str]:
    """The stages among ``stages`` (about to run) that load ``llm.model``."""
    out = []
    for name in stages:
        if name == "llm" or (name == "retriever" and cfg.retriever.kind == "llm") or (
                name == "report" and list(cfg.eval.ablations)):
            out.append(name)
    return out
