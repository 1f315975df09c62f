"""One tiny fitted run shared by the report and predict tests (fitted once per test session).

``fitted_run(tmp_path_factory)`` runs ``gcnee fit`` on ``configs/tiny.yaml`` with a tiny random
Llama (4 layers) and a small training budget, and returns its paths and config overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
_CACHE: dict[str, FittedRun] = {}


@dataclass
class FittedRun:
    root: Path  # the temporary folder
    overrides: list[str]  # run folders, the tiny model, the training budget

    @property
    def run(self) -> Path:
        return self.root / "ck" / "tiny"

    @property
    def logs(self) -> Path:
        return self.root / "logs" / "tiny"

    def cfg(self, *extra: str):
        from gcnee.config import load_config

        return load_config(TINY, [*self.overrides, *extra])


def fitted_run(tmp_path_factory) -> FittedRun:
    if "run" not in _CACHE:
        from gcnee.cli import main

        from tiny import make_tiny_llama, make_tiny_tokenizer

        root = tmp_path_factory.mktemp("fitted")
        tok = make_tiny_tokenizer()
        model_dir = root / "tiny-model"
        make_tiny_llama(len(tok), num_layers=4).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        overrides = [f"run.checkpoints_dir={root / 'ck'}", f"run.logs_dir={root / 'logs'}",
                     f"llm.model={model_dir}", "llm.max_train_samples=8"]
        assert main(["fit", "--config", TINY, *overrides]) == 0
        _CACHE["run"] = FittedRun(root, overrides)
    return _CACHE["run"]
