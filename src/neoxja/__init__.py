"""neoxja: the Japanese GPT-NeoX models (ABEJA GPT-NeoX-Japanese, rinna japanese-gpt-neox) on CPU.

The public names mirror the `transformers` ones so that existing snippets run unchanged. They are imported
lazily: `import neoxja` stays cheap, and a name's module loads on first use."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPTNeoXJapaneseConfig": "config",
    "GPTNeoXConfig": "config",
    "AutoConfig": "config",
    "GPTNeoXJapaneseModel": "modeling",
    "GPTNeoXJapaneseForCausalLM": "modeling",
    "GPTNeoXModel": "modeling",
    "GPTNeoXForCausalLM": "modeling",
    "AutoModel": "modeling",
    "AutoModelForCausalLM": "modeling",
    "GPTNeoXJapaneseTokenizer": "tokenization",
    "SentencePieceTokenizer": "tokenization",
    "T5Tokenizer": "tokenization",
    "AutoTokenizer": "tokenization",
    "BatchEncoding": "tokenization",
    "BitsAndBytesConfig": "quantization",
    "GenerationConfig": "generation",
    "TextStreamer": "generation",
    "TextIteratorStreamer": "generation",
    "pipeline": "pipelines",
    "AttentionMaskVisualizer": "visualization",
    "NeoxjaError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neoxja' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
