"""SentencePieceTokenizer: rinna's japanese-gpt-neox-3.6b tokenizers (spiece.model, tokenizer_config.json naming
T5Tokenizer), id-exact with the `sentencepiece` library.

Everything about splitting text follows the .model file itself, because sentencepiece applies the options the
model was trained with: for rinna's 3.6b family that is byte fallback (no <unk> for unseen characters), no
dummy prefix (no leading "▁") and whitespace kept as written. `transformers` gets this wrong on both paths:
the fast tokenizer collapses spaces and loses byte fallback, and the slow one of transformers 5.x does too.
So the oracle for these ids is sentencepiece's own encode, plus "</s>" when special tokens are added, as
rinna's T5Tokenizer (transformers 4.x, use_fast=False) did.

Decoding renders special tokens as their strings ("…猫である   </s>" as on the model card) unless skipped, and
hands each run of ordinary pieces to sentencepiece, which joins byte-fallback pieces into UTF-8 characters.

`apply_chat_template` builds rinna's instruction prompt (neoxja.chat); the models carry no Jinja template.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import sentencepiece

from ..chat import build_prompt
from ..errors import CheckpointError, InputError
from ..files import write_atomic
from .base import BatchEncoding, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model as a `transformers`-style tokenizer (AutoTokenizer picks it for T5Tokenizer)."""

    vocab_files = {"vocab_file": "spiece.model"}

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_ids: int = 0,
        sp_model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Special tokens default to the pieces the .model file reserves for them (rinna: <s>, </s>, <unk>, [PAD]).

        sp_model_kwargs go to sentencepiece.SentencePieceProcessor (e.g. enable_sampling), as in transformers."""
        if extra_ids:
            # T5's <extra_id_N> sentinels would be ids past the model's pieces; rinna's files set extra_ids 0.
            raise CheckpointError(
                f"extra_ids={extra_ids}: T5 sentinel tokens are not supported; this tokenizer is for SentencePiece "
                "GPT checkpoints such as rinna's (tokenizer_config.json extra_ids 0)"
            )
        self.vocab_file = os.fspath(vocab_file)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file, **self.sp_model_kwargs)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot load SentencePiece model {self.vocab_file}: {err}") from None
        super().__init__(
            bos_token=bos_token if bos_token is not None else self._reserved_piece(self.sp.bos_id()),
            eos_token=eos_token if eos_token is not None else self._reserved_piece(self.sp.eos_id()),
            unk_token=unk_token if unk_token is not None else self._reserved_piece(self.sp.unk_id()),
            pad_token=pad_token if pad_token is not None else self._reserved_piece(self.sp.pad_id()),
            **kwargs,
        )
        # A special token missing from the model would silently encode as <unk>; say so at load time instead.
        missing = [t for t in self.all_special_tokens if self.sp.id_to_piece(self.sp.piece_to_id(t)) != t]
        if missing:
            raise CheckpointError(f"special token(s) {missing} are not pieces of {self.vocab_file}")

    def _reserved_piece(self, index: int) -> str | None:
        return self.sp.id_to_piece(index) if index >= 0 else None

    # ----------------------------------------------------------------------------------------------------
    # Base-class hooks

    def _tokenize(self, text: str) -> list[str]:
        return self.sp.encode(_utf8_text(text), out_type=str)

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(_utf8_text(text))

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def build_inputs_with_special_tokens(self, ids_a: list[int], ids_b: list[int] | None = None) -> list[int]:
        """Each sequence gets "</s>" appended, unless it already ends with it (as T5Tokenizer 4.x did)."""
        ids = self._with_eos(ids_a)
        return ids if ids_b is None else ids + self._with_eos(ids_b)

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.eos_token_id
        if eos is None or (ids and ids[-1] == eos):
            return list(ids)
        return ids + [eos]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return _join_runs(tokens, set(self.all_special_tokens), self.sp.decode_pieces, str)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        special = set(self.all_special_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in special]
        return _join_runs(ids, special, self.sp.decode_ids, self.sp.id_to_piece)

    def init_kwargs(self) -> dict[str, Any]:
        return {"sp_model_kwargs": self.sp_model_kwargs} if self.sp_model_kwargs else {}

    def save_vocabulary(self, directory: str | os.PathLike) -> tuple[str, ...]:
        path = os.path.join(directory, self.vocab_files["vocab_file"])
        return (str(write_atomic(path, self.sp.serialized_model_proto())),)

    # ----------------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """rinna's instruction prompt for a conversation (or a batch of them), as text or encoded.

        Like transformers 5.x: tokenize=False gives the prompt string; tokenize=True encodes it without "</s>"
        and returns a BatchEncoding (input_ids, attention_mask), or only the input_ids with return_dict=False.
        Unlike transformers, add_generation_prompt defaults to True: rinna's models need the prompt to end in
        "<NL>システム: " to answer, and no other use of this format is common."""
        sequence = (list, tuple)
        batched = isinstance(conversation, sequence) and bool(conversation) and isinstance(conversation[0], sequence)
        conversations = conversation if batched else [conversation]
        prompts = [build_prompt(messages, add_generation_prompt) for messages in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        encoded = self(
            prompts if batched else prompts[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        return encoded if return_dict else encoded["input_ids"]


def _join_runs(
    items: Iterable[Hashable], special: set, decode: Callable[[list], str], render: Callable[[Any], str]
) -> str:
    """Decode runs of ordinary ids or pieces with sentencepiece and put each special one's string between them."""
    out: list[str] = []
    run: list = []
    for item in items:
        if item in special:
            out += [decode(run), render(item)]
            run = []
        else:
            run.append(item)
    out.append(decode(run))
    return "".join(out)


def _utf8_text(text: str) -> str:
    """`text`, unless it holds a lone surrogate (SentencePiece would fail on it with a bare RuntimeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"text has a lone surrogate U+{ord(text[err.start]):04X} at position {err.start}: not a "
                         f"character, it has no UTF-8 encoding") from None
    return text
