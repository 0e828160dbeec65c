"""Tiny checkpoints with the real tokenizers, for the pipeline, CLI and documentation-example tests.

conftest's checkpoints have a 128-token vocabulary; these have the vocabulary their tokenizer needs, so that text
goes in and text comes out: `abeja_checkpoint` (ABEJA's GPT-NeoX-Japanese layout, 32000 ids, the bundled ABEJA
tokenizer saved beside the weights) and `rinna_model_checkpoint` (rinna's GPT-NeoX layout, with the SentencePiece
files of rinna_fixtures). Weights are random and written by the reference; import the fixtures into the test
module that uses them, and treat the directories as read-only."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import japanese_reference, neox_reference

# Small enough that a 64-token generation takes milliseconds, with a context that tests can overflow.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def write_abeja_checkpoint(directory: Path) -> Path:
    from neoxja import AutoTokenizer

    japanese_reference(vocab_size=32000, bos_token_id=31999, eos_token_id=31999, tie_word_embeddings=True,
                       **TINY).save_pretrained(directory)
    AutoTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b").save_pretrained(directory)
    return directory


def write_rinna_model_checkpoint(directory: Path) -> Path:
    """rinna's layout: GPT-NeoX config (bos 2, eos 3) and the SentencePiece tokenizer files; TINY-sized, unlike
    rinna_fixtures.write_rinna_checkpoint (width 64), so that the pipeline and CLI tests generate in milliseconds."""
    from rinna_fixtures import BOS, EOS, VOCAB_SIZE, write_rinna_tokenizer_files

    neox_reference(vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, intermediate_size=64,
                   **TINY).save_pretrained(directory)
    return write_rinna_tokenizer_files(directory)


@pytest.fixture(scope="session")
def abeja_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_abeja_checkpoint(tmp_path_factory.mktemp("abeja-tiny"))


@pytest.fixture(scope="session")
def rinna_model_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rinna_model_checkpoint(tmp_path_factory.mktemp("rinna-tiny"))
