"""Shared fixtures: small random checkpoints written by the reference (transformers) in the Hugging Face layout."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*Enum subclass.*")

import transformers  # noqa: E402  (the oracle; always installed with the test extra)

transformers.logging.set_verbosity_error()


def randomize_small_params(model: torch.nn.Module, seed: int = 0) -> None:
    """Give biases and norms non-trivial values so that tests see every parameter (init sets them to 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def japanese_reference(**overrides) -> "transformers.GPTNeoXJapaneseForCausalLM":
    settings = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**settings)).eval()
    randomize_small_params(model)
    return model


def neox_reference(**overrides) -> "transformers.GPTNeoXForCausalLM":
    settings = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=160, max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
                    rotary_pct=1.0, use_parallel_residual=False)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**settings)).eval()
    randomize_small_params(model)
    return model


@pytest.fixture(scope="session")
def japanese_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("abeja-small")
    japanese_reference().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rinna-small")
    neox_reference().save_pretrained(path)
    return path
