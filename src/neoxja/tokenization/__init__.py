"""Tokenizers, and AutoTokenizer: which tokenizer class a checkpoint needs.

Tokenizer classes are named by lazy import strings, so importing this package never loads (or requires)
a tokenizer module the checkpoint does not use."""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import hub
from ..errors import CheckpointError
from .abeja import GPTNeoXJapaneseTokenizer
from .base import BatchEncoding, Tokenizer, bundled_dir, read_json

_ABEJA = "neoxja.tokenization.abeja:GPTNeoXJapaneseTokenizer"
_SPM = "neoxja.tokenization.spm:SentencePieceTokenizer"

# tokenizer_config.json "tokenizer_class" -> our class.
TOKENIZER_CLASSES = {
    "GPTNeoXJapaneseTokenizer": _ABEJA,
    "SentencePieceTokenizer": _SPM,
    "T5Tokenizer": _SPM,
    "T5TokenizerFast": _SPM,
}

# Names re-exported lazily, because their modules may be absent in a partial checkout.
_LAZY = {"SentencePieceTokenizer": _SPM, "T5Tokenizer": _SPM}


def _load_class(target: str) -> type[Tokenizer]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _load_class(_LAZY[name])
    globals()[name] = value
    return value


class AutoTokenizer:
    """Picks the tokenizer class of a checkpoint: tokenizer_config.json's tokenizer_class, else config.json's
    model_type, else which vocabulary files exist."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        use_fast: bool | None = None,
        *,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Tokenizer:
        """use_fast is accepted for compatibility and ignored: there is one (correct) tokenizer per model."""
        where = dict(revision=revision, local_files_only=local_files_only, token=token, cache_dir=cache_dir)
        source = bundled_dir(name_or_path) or name_or_path

        def find(filename: str) -> Path | None:
            return hub.resolve_file(source, filename, required=False, **where)

        return _load_class(_pick_class(source, find)).from_pretrained(name_or_path, **where, **overrides)


def _pick_class(source: str | os.PathLike, find: Callable[[str], Path | None]) -> str:
    name = read_json(find("tokenizer_config.json")).get("tokenizer_class")
    if name is not None:
        if name not in TOKENIZER_CLASSES:
            raise CheckpointError(
                f"{source}: tokenizer_class {name!r} is not supported; neoxja knows {sorted(TOKENIZER_CLASSES)}"
            )
        return TOKENIZER_CLASSES[name]
    model_type = read_json(find("config.json")).get("model_type")
    if model_type == "gpt_neox_japanese":
        return _ABEJA
    if model_type == "gpt_neox" and find("spiece.model"):
        return _SPM
    if find("vocab.txt") and find("emoji.json"):
        return _ABEJA
    if find("spiece.model"):
        return _SPM
    raise CheckpointError(
        f"{source}: cannot tell which tokenizer it needs (no tokenizer_class in tokenizer_config.json, no known "
        "model_type in config.json, and neither vocab.txt + emoji.json nor spiece.model)"
    )


__all__ = [
    "AutoTokenizer", "BatchEncoding", "GPTNeoXJapaneseTokenizer", "SentencePieceTokenizer", "T5Tokenizer", "Tokenizer",
]  # fmt: skip
