"""Shared fixtures: tiny models built once per session, and the shared data directory."""

from pathlib import Path

import pytest

from mlx_lora.demo.tiny import make_tiny_model

# CI checks out ../shared beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


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
