"""Shared fixtures: tiny models built once per session, and the shared data directory."""

from pathlib import Path

import pytest
from helpers import addition_rows, write_splits

from mlx_lora.demo.tiny import make_tiny_model

# CI checks out ../shared beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The addition splits most runs train on: 36 training rows, 9 validation rows (modules
    that need others define their own `data`)."""
    rows = addition_rows(9, 5)
    return write_splits(tmp_path_factory.mktemp("data"), {"train": rows[:36], "valid": rows[36:]})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random llama (hidden 64, 2 layers, untied lm_head) with a trained 512-token tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random qwen2 (attention biases, tied embeddings) with a trained 512-token tokenizer."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", tie_word_embeddings=True, seed=1
    )


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """Karpathy's tinyllamas stories260K in HF layout (hidden 64, intermediate 172, tied)."""
    path = SHARED_DATA / "tinyllamas-stories260K" / "hf"
    assert (path / "model.safetensors").is_file(), f"{path} is missing: check out ../shared"
    return path
