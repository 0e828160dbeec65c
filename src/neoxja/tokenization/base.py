"""The tokenizer base class: everything a tokenizer does that does not depend on its sub-word algorithm.

A subclass supplies the vocabulary and the sub-word step (`_tokenize` / `_encode_plain`, id <-> token, decoding);
this class supplies the `transformers`-compatible surface on top: special-token splitting, `__call__` with
batching, truncation, padding and tensors, `decode`, the streaming decoder, and loading/saving checkpoint
directories (tokenizer_config.json, special_tokens_map.json, vocabulary files)."""
from __future__ import annotations

import inspect
import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import hub
from ..errors import CheckpointError, InputError
from ..files import write_atomic

# transformers' VERY_LARGE_INTEGER: "no limit" for model_max_length.
VERY_LARGE_INTEGER = int(1e30)

# Hub ids whose tokenizer files ship inside the package (src/neoxja/data/<dir>), so they load with no network.
BUNDLED = {"abeja/gpt-neox-japanese-2.7b": "abeja"}

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# Keys of tokenizer_config.json that are bookkeeping written by transformers, never constructor arguments.
_NOT_INIT_ARGS = {"tokenizer_class", "name_or_path", "special_tokens_map_file", "auto_map", "added_tokens_decoder"}


def bundled_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The packaged directory for a bundled hub id, or None (local directories always win)."""
    name = str(name_or_path)
    if name not in BUNDLED or hub.is_local(name):
        return None
    return Path(__file__).resolve().parent.parent / "data" / BUNDLED[name]


def read_json(path: Path | None) -> dict:
    """A JSON object from a checkpoint file; {} for an absent optional file."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """A special token as written by transformers: a plain string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"special token must be a string, found {value!r}")
    return value


def _to_id_list(ids: Any) -> list[int]:
    """One sequence of token ids from a list, tuple, 1-d numpy array or tensor, or a single id."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    elif not isinstance(ids, list):
        ids = list(ids)
    if set(map(type, ids)) <= {int}:  # the common case, checked at C speed
        return ids
    try:
        return [operator.index(i) for i in ids]  # numpy integer scalars and the like
    except TypeError:
        bad = next(i for i in ids if not isinstance(i, int) and not hasattr(i, "__index__"))
        if isinstance(bad, (list, tuple)):
            raise InputError("expected one sequence of ids, got a nested sequence (use batch_decode for a batch)")
        raise InputError(f"token ids must be integers, found {bad!r}") from None


class BatchEncoding(dict):
    """The result of `tokenizer(...)`: a dict of model inputs that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor to `device` (in place, like transformers); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


class StreamDecoder:
    """Incremental decoding for streaming: feed ids as they come, get text as soon as it is final.

    The text released so far is always a prefix of `decode(all ids)`, and `finish()` releases the rest, so the
    pieces concatenate to exactly that decode. Two kinds of tail are held back because later ids can still
    change them: U+FFFD (an incomplete UTF-8 sequence that later bytes may complete) and whitespace (decode may
    strip it if nothing follows). Each step re-decodes the whole sequence, which keeps this exact for any
    subclass decode whose earlier text does not depend on later ids; decode is a table lookup and a join, so
    that stays cheap at generation lengths. (clean_up_tokenization_spaces=True, off by default, breaks that
    premise: "I '" may become "I's" once "s" arrives.)"""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.released = 0  # characters of decode(ids) already returned

    def _text(self) -> str:
        return self.tokenizer._decode_valid(self.ids, self.skip_special_tokens, None)

    def add(self, ids: int | Iterable[int]) -> str:
        """Append one id or several; return the newly final text (possibly empty)."""
        self.ids.extend(self.tokenizer._checked_ids(ids))
        text = self._text()
        end = len(text)
        while end > self.released and (text[end - 1] == "\ufffd" or text[end - 1].isspace()):
            end -= 1
        new = text[self.released : end]
        self.released = max(end, self.released)
        return new

    def finish(self) -> str:
        """The held-back tail; the decoder can be reused afterwards for a fresh sequence."""
        rest = self._text()[self.released :]
        self.ids.clear()
        self.released = 0
        return rest


class _SpecialToken:
    """A special-token attribute (bos_token, ...): assigning one rebuilds the text splitter on next use."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj._special_tokens.get(self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if self.name == "additional_special_tokens":
            value = tuple(_token_content(t) for t in value or ())
        else:
            value = _token_content(value)
        obj._special_tokens[self.name] = value
        obj._splitter = None


class _SpecialTokenId:
    """bos_token_id, ...: the id of the matching special token (None when unset); assigning an id sets the token."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.token_name = name.removesuffix("_id")

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        token = getattr(obj, self.token_name)
        return None if token is None else obj._convert_token_to_id(token)

    def __set__(self, obj: Any, index: int | None) -> None:
        token = None if index is None else obj.convert_ids_to_tokens(index)
        if token is not None and obj._convert_token_to_id(token) != index:
            raise InputError(f"id {index} has no token text that encodes back to it; set {self.token_name} instead")
        setattr(obj, self.token_name, token)


class Tokenizer:
    """Base class of neoxja's tokenizers; the `transformers` PreTrainedTokenizer surface."""

    bos_token = _SpecialToken()
    eos_token = _SpecialToken()
    unk_token = _SpecialToken()
    pad_token = _SpecialToken()
    additional_special_tokens = _SpecialToken()  # a tuple; assign a new sequence to change it
    bos_token_id = _SpecialTokenId()
    eos_token_id = _SpecialTokenId()
    unk_token_id = _SpecialTokenId()
    pad_token_id = _SpecialTokenId()

    vocab_files: dict[str, str] = {}  # constructor argument -> file name in a checkpoint directory
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    truncation_side = "right"

    def __init__(
        self,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] | None = None,
        model_max_length: int | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._special_tokens: dict[str, Any] = {}
        self._splitter: re.Pattern | None = None  # special-token matcher, built on first use
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.additional_special_tokens = additional_special_tokens
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        if padding_side is not None:
            self.padding_side = _check_side("padding_side", padding_side)
        if truncation_side is not None:
            self.truncation_side = _check_side("truncation_side", truncation_side)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

    # ----------------------------------------------------------------------------------------------------
    # Hooks for subclasses

    def _tokenize(self, text: str) -> list[str]:
        """Sub-word tokens of plain text (no special tokens inside)."""
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of plain text; subclasses override this with a fast path."""
        return [self._convert_token_to_id(t) for t in self._tokenize(text)]

    def _convert_token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def _convert_id_to_token(self, index: int) -> str:
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens))

    def build_inputs_with_special_tokens(self, ids_a: list[int], ids_b: list[int] | None = None) -> list[int]:
        return ids_a if ids_b is None else ids_a + ids_b

    def get_vocab(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def id_count(self) -> int:
        """Valid ids are 0 .. id_count-1 (may exceed vocab_size when spellings share or repeat ids)."""
        return self.vocab_size

    def save_vocabulary(self, directory: str | os.PathLike) -> tuple[str, ...]:
        raise NotImplementedError

    def init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beyond the base ones that save_pretrained must record (e.g. do_clean_text)."""
        return {}

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------------------------------------------------
    # Special tokens

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, name) for name in SPECIAL_TOKEN_NAMES]
        return list(dict.fromkeys(t for t in named + list(self.additional_special_tokens) if t))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._convert_token_to_id(t) for t in self.all_special_tokens]

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is_special) pieces of text, special-token strings matched whole, leftmost then longest."""
        if self._splitter is None:
            # Longest first, so that when one special token is a prefix of another the longer one is matched;
            # with no special tokens, a pattern that never matches.
            specials = sorted(self.all_special_tokens, key=len, reverse=True)
            self._splitter = re.compile("(" + "|".join(map(re.escape, specials)) + ")" if specials else r"(\Zx)")
        parts = self._splitter.split(text)
        if len(parts) == 1:
            return [(text, False)] if text else []
        # re.split with one capturing group alternates plain text (even indices) and matches (odd indices).
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    # ----------------------------------------------------------------------------------------------------
    # Encoding

    def tokenize(self, text: str) -> list[str]:
        _check_text(text)
        out: list[str] = []
        for piece, special in self._split_special(text):
            if special:
                out.append(piece)
            else:
                out.extend(self._tokenize(piece))
        return out

    def _encode_text(self, text: str) -> list[int]:
        _check_text(text)
        out: list[int] = []
        for piece, special in self._split_special(text):
            if special:
                out.append(self._convert_token_to_id(piece))
            else:
                out.extend(self._encode_plain(piece))
        return out

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int) and not isinstance(ids, bool):
            return self._convert_id_to_token(self._checked_ids(ids)[0])
        ids = self._checked_ids(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return [self._convert_id_to_token(i) for i in ids]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_token_type_ids: bool | None = None,
    ) -> BatchEncoding:
        """Encode one text (or pair) or a batch: {"input_ids", "attention_mask"}, optionally padded and as tensors.

        There are no token type ids; return_token_type_ids is accepted for compatibility and must not be True."""
        if return_token_type_ids:
            raise InputError("this tokenizer has no token type ids (return_token_type_ids=True is not supported)")
        batched = not isinstance(text, str)
        if batched:
            if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
                raise InputError("text must be a string or a list of strings")
            if text_pair is None:
                pairs: Sequence[str | None] = [None] * len(text)
            elif isinstance(text_pair, str) or len(text_pair) != len(text):
                raise InputError("a batch of texts needs a list of text_pair of the same length")
            else:
                pairs = text_pair
            texts: Sequence[str] = text
        else:
            if text_pair is not None and not isinstance(text_pair, str):
                raise InputError("text_pair for a single text must be a string")
            texts, pairs = [text], [text_pair]
        padding = _padding_strategy(padding)
        truncation = _truncation_strategy(truncation, max_length, padding)
        rows = [self._encode_row(a, b, add_special_tokens, truncation, max_length) for a, b in zip(texts, pairs)]
        masks = None if return_attention_mask is False else [[1] * len(r) for r in rows]
        return self._finish(rows, masks, batched, padding, max_length, pad_to_multiple_of, padding_side, return_tensors)

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        padding: bool | str = False,
    ) -> Any:
        """Ids of one text (or pair): a list, or a [1, n] tensor/array with return_tensors."""
        if padding not in (False, None, "do_not_pad"):
            return self(text, text_pair, add_special_tokens, padding, truncation, max_length, return_tensors,
                        return_attention_mask=False)["input_ids"]  # fmt: skip
        truncation = _truncation_strategy(truncation, max_length, None)
        ids = self._encode_row(text, text_pair, add_special_tokens, truncation, max_length)
        return ids if return_tensors is None else _as_tensors({"input_ids": ids}, return_tensors, False)["input_ids"]

    def _encode_row(
        self, a: str, b: str | None, add_special_tokens: bool, truncation: str | None, max_length: int | None
    ) -> list[int]:
        ids_a = self._encode_text(a)
        ids_b = None if b is None else self._encode_text(b)
        if truncation:
            reserve = self.num_special_tokens_to_add(b is not None) if add_special_tokens else 0
            limit = (self.model_max_length if max_length is None else max_length) - reserve
            ids_a, ids_b = self._truncate(ids_a, ids_b, limit, truncation)
        if add_special_tokens:
            return self.build_inputs_with_special_tokens(ids_a, ids_b)
        return ids_a if ids_b is None else ids_a + ids_b

    def _truncate(
        self, ids_a: list[int], ids_b: list[int] | None, limit: int, strategy: str
    ) -> tuple[list[int], list[int] | None]:
        if limit < 0:
            raise InputError("max_length is smaller than the number of special tokens this tokenizer adds")
        excess = len(ids_a) + len(ids_b or ()) - limit
        if excess <= 0:
            return ids_a, ids_b
        if ids_b is None or strategy == "only_first":
            cut_a, cut_b = excess, 0
        elif strategy == "only_second":
            cut_a, cut_b = 0, excess
        else:  # longest_first: shorten the longer one until they are equal, then both alternately
            gap = min(abs(len(ids_a) - len(ids_b)), excess)
            rest = excess - gap
            if len(ids_a) > len(ids_b):
                cut_a, cut_b = gap + rest // 2, rest - rest // 2
            else:
                cut_a, cut_b = rest // 2, gap + rest - rest // 2
        if cut_a > len(ids_a) or (ids_b is not None and cut_b > len(ids_b)):
            raise InputError(
                f"cannot truncate with strategy {strategy!r} to max_length: the sequence to cut is too short"
            )
        return self._cut(ids_a, cut_a), None if ids_b is None else self._cut(ids_b, cut_b)

    def _cut(self, ids: list[int], n: int) -> list[int]:
        if n == 0:
            return ids
        return ids[n:] if self.truncation_side == "left" else ids[:-n]

    def pad(
        self,
        encoded_inputs: dict | list[dict],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """Pad encodings (one, a dict of rows, or a list of dicts) with pad_token_id; masks get 0 there."""
        if isinstance(encoded_inputs, (list, tuple)):
            keys = encoded_inputs[0].keys() if encoded_inputs else ()
            encoded_inputs = {k: [row[k] for row in encoded_inputs] for k in keys}
        input_ids = encoded_inputs.get("input_ids")
        if input_ids is None:
            raise InputError("pad needs 'input_ids'")
        masks = encoded_inputs.get("attention_mask")
        if hasattr(input_ids, "tolist"):
            input_ids = input_ids.tolist()
            masks = masks.tolist() if hasattr(masks, "tolist") else masks
        batched = not (input_ids and isinstance(input_ids[0], int))
        if not batched:
            input_ids, masks = [input_ids], None if masks is None else [masks]
        rows = [_to_id_list(r) for r in input_ids]
        if return_attention_mask is False:
            masks = None
        elif masks is None:
            masks = [[1] * len(r) for r in rows]
        else:
            masks = [_to_id_list(m) for m in masks]
        padding = _padding_strategy(padding)
        return self._finish(rows, masks, batched, padding, max_length, pad_to_multiple_of, padding_side, return_tensors)

    def _finish(
        self,
        rows: list[list[int]],
        masks: list[list[int]] | None,
        batched: bool,
        padding: str | None,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        return_tensors: str | None,
    ) -> BatchEncoding:
        """Pad rows (and masks) in place, and package them as a BatchEncoding of lists or tensors."""
        target = None
        if padding == "longest":
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
            if target >= VERY_LARGE_INTEGER:
                raise InputError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        left = _check_side("padding_side", padding_side or self.padding_side) == "left"
        if target is not None and any(len(r) < target for r in rows):
            pad_id = self.pad_token_id
            if pad_id is None:
                raise InputError("padding needs a pad_token, and this tokenizer has none (set tokenizer.pad_token)")
            for i, row in enumerate(rows):
                n = target - len(row)
                if n > 0:
                    rows[i] = [pad_id] * n + row if left else row + [pad_id] * n
                    if masks is not None:
                        masks[i] = [0] * n + masks[i] if left else masks[i] + [0] * n
        out = BatchEncoding(input_ids=rows if batched else rows[0])
        if masks is not None:
            out["attention_mask"] = masks if batched else masks[0]
        return _as_tensors(out, return_tensors, batched)

    # ----------------------------------------------------------------------------------------------------
    # Decoding

    def _checked_ids(self, ids: Any) -> list[int]:
        ids = _to_id_list(ids)
        limit = self.id_count
        if ids and not (0 <= min(ids) and max(ids) < limit):
            bad = next(i for i in ids if not 0 <= i < limit)
            raise InputError(f"token id {bad} is out of range: ids must be in [0, {limit})")
        return ids

    def decode(
        self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Text of one id sequence (list, tuple, 1-d tensor or array, or a single id)."""
        return self._decode_valid(self._checked_ids(ids), skip_special_tokens, clean_up_tokenization_spaces)

    def _decode_valid(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._decode(ids, skip_special_tokens)
        if clean_up is None:
            clean_up = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up else text

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder: .add(ids) -> new final text, .finish() -> the rest (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens)

    # ----------------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Tokenizer:
        """Load from a checkpoint directory or hub id; keyword overrides win over the saved configuration."""
        source = bundled_dir(name_or_path) or name_or_path

        def resolve(filename: str, required: bool) -> Path | None:
            return hub.resolve_file(
                source,
                filename,
                revision=revision,
                local_files_only=local_files_only,
                token=token,
                cache_dir=cache_dir,
                required=required,
            )

        config = read_json(resolve("tokenizer_config.json", False))
        special_map = read_json(resolve("special_tokens_map.json", False))
        accepted = cls._init_parameters()
        kwargs = {k: v for k, v in config.items() if k in accepted and k not in _NOT_INIT_ARGS}
        kwargs.update((k, v) for k, v in special_map.items() if k in accepted)
        for name in SPECIAL_TOKEN_NAMES:
            if name in kwargs:
                kwargs[name] = _token_content(kwargs[name])
        if "additional_special_tokens" in kwargs:
            kwargs["additional_special_tokens"] = [_token_content(t) for t in kwargs["additional_special_tokens"]]
        for arg, filename in cls.vocab_files.items():
            if arg not in overrides:
                kwargs[arg] = str(resolve(filename, True))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def _init_parameters(cls) -> set[str]:
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                names.update(inspect.signature(klass.__init__).parameters)
        return names - {"self", "args", "kwargs"}

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer_config.json, special_tokens_map.json and the vocabulary files; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": type(self).__name__,
            **self.special_tokens_map,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.init_kwargs(),
        }
        written = [
            str(write_atomic(os.path.join(directory, "tokenizer_config.json"), _dump(config))),
            str(write_atomic(os.path.join(directory, "special_tokens_map.json"), _dump(self.special_tokens_map))),
        ]
        return tuple(written) + tuple(self.save_vocabulary(directory))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={self.special_tokens_map})"


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise InputError(f"text must be a string, found {type(text).__name__}")


def _check_side(what: str, side: str) -> str:
    if side not in ("left", "right"):
        raise InputError(f"{what} must be 'left' or 'right', not {side!r}")
    return side


def _padding_strategy(padding: bool | str) -> str | None:
    """None (no padding), "longest" or "max_length"."""
    if padding is True or padding == "longest":
        return "longest"
    if padding is False or padding is None or padding == "do_not_pad":
        return None
    if padding == "max_length":
        return "max_length"
    raise InputError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', not {padding!r}")


def _truncation_strategy(truncation: bool | str | None, max_length: int | None, padding: str | None) -> str | None:
    """None (no truncation) or "longest_first" / "only_first" / "only_second".

    Like transformers, max_length alone (no padding, truncation unspecified) means truncate longest_first."""
    if truncation is None:
        return "longest_first" if max_length is not None and padding is None else None
    if truncation is True:
        return "longest_first"
    if truncation is False or truncation == "do_not_truncate":
        return None
    if truncation in ("longest_first", "only_first", "only_second"):
        return truncation
    raise InputError(
        "truncation must be True, False, 'longest_first', 'only_first', 'only_second' or 'do_not_truncate', "
        f"not {truncation!r}"
    )


def _as_tensors(enc: dict, return_tensors: str | None, batched: bool) -> BatchEncoding:
    """Convert lists to tensors: "pt" (torch) or "np"; a single sequence becomes a batch of one."""
    if return_tensors is None:
        return enc
    if return_tensors not in ("pt", "np"):
        raise InputError(f"return_tensors must be 'pt', 'np' or None, not {return_tensors!r}")
    out = BatchEncoding()
    for key, value in enc.items():
        rows = value if batched else [value]
        if len({len(r) for r in rows}) > 1:
            raise InputError(
                "sequences have different lengths, so they cannot form one tensor: pass padding=True "
                "(or padding='max_length' with max_length)"
            )
        if return_tensors == "pt":
            import torch

            out[key] = torch.tensor(rows, dtype=torch.long)
        else:
            import numpy as np

            out[key] = np.array(rows, dtype=np.int64)
    return out


_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: drop the space before English punctuation and contractions."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text
