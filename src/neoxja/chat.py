"""Chat prompts for rinna's instruction models (japanese-gpt-neox-3.6b-instruction-sft, -sft-v2, -ppo).

This module owns the conversation format those models were tuned on, as plain functions shared by the
tokenizer's `apply_chat_template`, the CLI chat and the HTTP server. None of the rinna repositories ships a
Jinja chat template; the format below is the one their model cards write by hand:

    ユーザー: 質問<NL>システム: 答え<NL>ユーザー: 次の質問<NL>システム: 

- each turn is "{speaker}: {text}", the speaker `ユーザー` (user) or `システム` (the model);
- the tokenizer cannot represent "\\n", so newlines inside a turn are written as the literal `<NL>`, and turns
  are joined with `<NL>` too;
- a prompt asking for a reply ends in "<NL>システム: " (with the trailing space);
- a reply is decoded, `<NL>` turned back into newlines, and the `</s>` the model ends it with dropped.

Messages are what `transformers` and the OpenAI API use: a list of {"role", "content"} mappings. Another
format (say, a model whose tokenizer carries a Jinja chat_template) would be a second renderer beside
`build_prompt`, reusing `validate_messages`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .errors import InputError

NL = "<NL>"
USER = "ユーザー"
SYSTEM = "システム"  # rinna's name for the model's own turns (the assistant), not for a system prompt
EOS = "</s>"
# rinna's models go on to write the user's next turn after their own; the reply ends where that begins.
NEXT_TURN = f"{NL}{USER}:"

# rinna's format has no system prompt. A "system" message becomes a user turn where it stands; in the usual
# case (it comes first) that puts the instructions in front of the conversation, which is how people prompt
# these models by hand. Dropping it silently would lose the caller's instructions.
SPEAKERS = {"system": USER, "user": USER, "assistant": SYSTEM}

_NEWLINE = re.compile(r"\r\n|\r|\n")


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise InputError unless `messages` is a non-empty list of {"role", "content"} with known roles."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InputError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in SPEAKERS:
            raise InputError(f"messages[{i}] has role {role!r}; use one of {', '.join(map(repr, SPEAKERS))}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InputError(
                f"messages[{i}] ({role}) content must be a string, got {type(content).__name__}; "
                "join multi-part content into one text first"
            )


def build_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The rinna prompt for `messages`; with add_generation_prompt it ends in "<NL>システム: " for the reply.

    Without add_generation_prompt nothing is appended, so a final assistant message is left open for the model
    to continue (this format has no end-of-turn marker to leave out)."""
    validate_messages(messages)
    turns = [f"{SPEAKERS[m['role']]}: {_NEWLINE.sub(NL, m['content'])}" for m in messages]
    if add_generation_prompt:
        turns.append(f"{SYSTEM}: ")
    return NL.join(turns)


def parse_reply(text: str, eos_token: str = EOS) -> str:
    """The model's reply as plain text: cut at `eos_token` or at a user turn the model went on to invent,
    `<NL>` turned back into newlines, surrounding whitespace stripped."""
    if not isinstance(text, str):
        raise InputError(f"parse_reply needs the decoded text (a str), got {type(text).__name__}")
    text = text.split(eos_token, 1)[0] if eos_token else text
    text = text.split(f"{NL}{USER}:", 1)[0]
    return text.replace(NL, "\n").strip()
