"""The OpenAI API as this server speaks it: request fields, their validation, and the response and chunk shapes of
/v1/completions and /v1/chat/completions.

Requests are checked field by field before any work is done; every problem is an APIError that the app renders
as OpenAI's error object, {"error": {"message", "type", "param", "code"}}, with the offending field in `param`.
Unknown fields are rejected (a misspelt parameter should not be silently ignored); OpenAI fields this server does
not implement (logprobs, tools, ...) are accepted only at their do-nothing values. Besides OpenAI's fields, the
requests take `top_k`, `repetition_penalty` (as transformers defines it) and `ignore_eos`, as vLLM does; the openai
client sends them through `extra_body`.

Responses follow the API: ids `cmpl-…` / `chatcmpl-…`, Unix `created` times, `usage` counts (prompt tokens once
per prompt, completion tokens summed over choices), finish_reason "stop" or "length", and streamed chunks of the
same id ending with `data: [DONE]`."""
from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..chat import NL

MAX_N = 128
MAX_STOP = 4  # OpenAI's limit on stop sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "repetition_penalty",
                 "frequency_penalty", "presence_penalty", "stream", "stream_options", "ignore_eos", "user"}
# OpenAI fields accepted only at a value that asks for nothing this server lacks.
INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0), "best_of": (None, 1),
    "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix", "logit_bias"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias",
                               "tools", "tool_choice", "functions", "function_call", "response_format",
                               "parallel_tool_calls", "store", "metadata", "service_tier"}


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class GenerationRequest:
    """A validated request. Sampling fields left as None were not given: the server's defaults apply."""

    chat: bool
    model: str | None = None
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict[str, str]] = field(default_factory=list)  # chat, roles normalised to system/user/assistant
    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"  # or max_completion_tokens, the chat name, when that was given
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity are not JSON and are refused)."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a valid JSON number")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type(body)}")
    return body


def parse_request(body: dict[str, Any], chat: bool) -> GenerationRequest:
    """Check every field of a completions (chat=False) or chat completions request."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown parameter {unknown[0]!r}; this endpoint takes "
                                  f"{', '.join(sorted(allowed - set(INERT_VALUES)))}")
    for name in sorted(set(body) & set(INERT_VALUES)):
        if not any(body[name] == v and type(body[name]) is type(v) for v in INERT_VALUES[name]):
            raise invalid(name, f"{name}={json.dumps(body[name], ensure_ascii=False)[:80]} is not supported by "
                                "this server; leave it out")
    request = GenerationRequest(chat=chat)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {_type(model)}")
    request.model = model
    if chat:
        request.messages = _messages(body)
        request.max_tokens = _integer(body, "max_tokens", 1)
        max_completion_tokens = _integer(body, "max_completion_tokens", 1)
        if max_completion_tokens is not None:
            request.max_tokens, request.max_tokens_field = max_completion_tokens, "max_completion_tokens"
    else:
        request.prompts = _prompts(body)
        request.max_tokens = _integer(body, "max_tokens", 1)
    request.temperature = _number(body, "temperature", 0.0, 2.0)
    request.top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    request.top_k = _integer(body, "top_k", -1)
    request.repetition_penalty = _number(body, "repetition_penalty", 0.0, math.inf, low_open=True)
    request.frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0) or 0.0
    request.presence_penalty = _number(body, "presence_penalty", -2.0, 2.0) or 0.0
    n = _integer(body, "n", 1, MAX_N)
    request.n = 1 if n is None else n
    request.stop = _stop(body)
    request.seed = _integer(body, "seed")
    request.stream = _boolean(body, "stream")
    request.ignore_eos = _boolean(body, "ignore_eos")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"user must be a string, got {_type(user)}")
    options = body.get("stream_options")
    if options is not None:
        if not request.stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", 'stream_options must be an object like {"include_usage": true}')
        request.include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    return request


def _type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _integer(body: Mapping[str, Any], name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(name, f"{name} must be an integer, got {_type(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise invalid(name, f"{name} must be {bounds}, got {value}")
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise invalid(name, f"{name} must be a number, got {_type(value)}")
    if value < low or value > high or (low_open and value == low):
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        bounds = lower if math.isinf(high) else f"{lower} and <= {high:g}"
        raise invalid(name, f"{name} must be {bounds}, got {value}")
    return float(value)


def _boolean(body: Mapping[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"{param or name} must be true or false, got {_type(value)}")
    return value


def _text(value: str, param: str) -> str:
    """`value`, unless it holds a lone surrogate (JSON can escape one; it is no character, and no tokenizer
    can encode it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise invalid(param, f"{param} contains {value[err.start]!a}, a lone surrogate, which is not a character; "
                             "send valid UTF-16 surrogate pairs") from None
    return value


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(body: Mapping[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "prompt is required: a string, an array of strings, an array of token ids, or an "
                                "array of such arrays")
    if isinstance(prompt, str):
        return [_text(prompt, "prompt")]
    if _token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [_text(p, "prompt") for p in prompt]
    if isinstance(prompt, list) and prompt and all(_token_list(p) for p in prompt):
        return list(prompt)
    raise invalid("prompt", f"prompt must be a string, an array of strings, a non-empty array of token ids, or an "
                            f"array of such arrays; got {_type(prompt)}"
                            f"{' (empty)' if prompt == [] else ''}")


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages is required: a non-empty array of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"{where} must be an object with role and content, got {_type(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{where}.role is {json.dumps(role, ensure_ascii=False)}; this server "
                                           f"takes {', '.join(ROLES)}")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or an array of text parts joined."""
    if isinstance(content, str):
        return _text(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return _text("".join(p["text"] for p in content), where)
        raise invalid(where, f"{where} may only hold text parts ({{\"type\": \"text\", \"text\": ...}}): this "
                             "model reads text only")
    raise invalid(where, f"{where} must be a string or an array of text parts, got {_type(content)}")


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise invalid("stop", f"stop must be a non-empty string or an array of up to {MAX_STOP} non-empty strings")
    return [_text(s, "stop") for s in stops]


# ---------------------------------------------------------------------------------------------------------------
class ReplyText:
    """A rinna instruction model's reply as it streams: `<NL>` turned into newlines and no whitespace at either
    end, the rules of neoxja.chat.parse_reply applied to growing text. Each add() returns the newly final part,
    so the pieces concatenate to parse_reply of the whole reply (the engine already cut it at the next user
    turn and dropped "</s>")."""

    def __init__(self) -> None:
        self.raw = ""
        self.shown = 0

    def add(self, piece: str, last: bool) -> str:
        self.raw += piece
        text = self.raw
        if not last:  # a tail such as "<N" may still become "<NL>"
            for k in range(min(len(NL) - 1, len(text)), 0, -1):
                if NL.startswith(text[-k:]):
                    text = text[:-k]
                    break
        text = text.replace(NL, "\n").strip()  # trailing whitespace is only held back until more text comes
        new, self.shown = text[self.shown:], max(self.shown, len(text))
        return new


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, ident: str, created: int, model: str, texts: list[str], reasons: list[str],
             tokens: dict[str, int]) -> dict[str, Any]:
    """The non-streamed answer."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": tokens}


def chunk(chat: bool, ident: str, created: int, model: str, index: int | None = None, text: str | None = None,
          finish_reason: str | None = None, role: bool = False, tokens: dict[str, int] | None = None) -> dict:
    """One streamed chunk: a piece of choice `index`'s text, its finish_reason, the assistant role that opens a
    chat choice, or (index None) the closing usage chunk, which has no choices."""
    choices = []
    if index is not None:
        if chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if tokens is not None:
        out["usage"] = tokens
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")
