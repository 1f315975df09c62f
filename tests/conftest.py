import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py importable as `tiny`

from tiny import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama + tokenizer saved as a local HF folder (an ``llm.model`` value)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), num_layers=4)
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
