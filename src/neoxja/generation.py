"""Text generation: `model.generate(...)` with the reference's arguments and semantics (greedy and sampling; no
beam search), `GenerationConfig` (generation_config.json), and streamers that hand out whole characters.

One step of the loop: the model scores the next token for every unfinished row (the prompt once, then one token per
step through the KV cache), the logits processors run in the reference's order (repetition penalty, n-gram ban,
minimum lengths, then when sampling: temperature, top-k, top-p, typical-p), a token is picked, and rows that emit an
end-of-sequence id or a stop string finish and are padded from then on. Left-padded batches take their positions
from the attention mask, so each row gives what it gives alone."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import queue
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from .config import NeoXConfig
from .files import write_atomic
from .errors import CheckpointError, InputError

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    """Decoding settings. Defaults are the reference's global defaults; a checkpoint's generation_config.json and
    then the call's keyword arguments override them."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    num_beams: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    return_dict_in_generate: bool = False
    output_scores: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_model_config(cls, config: NeoXConfig) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        known = cls.field_names()
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "transformers_version"}
        return cls(**values, extra=extra)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GenerationConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_args: Any) -> "GenerationConfig":
        from .hub import resolve_file

        return cls.from_file(resolve_file(name_or_path, GENERATION_CONFIG_NAME, **hub_args))

    def to_dict(self) -> dict[str, Any]:
        defaults = GenerationConfig()
        out = {k: getattr(self, k) for k in sorted(self.field_names()) if getattr(self, k) != getattr(defaults, k)}
        out.update(self.extra)
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        return write_atomic(Path(directory) / GENERATION_CONFIG_NAME, text)

    def updated(self, **kwargs: Any) -> "GenerationConfig":
        """A copy with `kwargs` applied; unknown names are an error that lists them."""
        unknown = set(kwargs) - self.field_names()
        if unknown:
            raise InputError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        new = copy.deepcopy(self)
        for key, value in kwargs.items():
            setattr(new, key, value)
        return new

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def validate(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(f"{name}={getattr(self, name)!r} is invalid: it must be {expected}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0):
            raise bad("max_new_tokens", "a positive integer")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            raise bad("max_length", "a positive integer")
        if self.do_sample and not self.temperature > 0:
            raise bad("temperature", "> 0 when sampling (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 < self.typical_p <= 1:
            raise bad("typical_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables it)")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise bad("num_return_sequences", "a positive integer")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise InputError("num_return_sequences > 1 needs do_sample=True (greedy decoding would return the "
                             "same sequence each time)")
        if self.num_beams != 1:
            raise InputError("beam search (num_beams > 1) is not supported by neoxja; use greedy decoding or "
                             "sampling")
        if self.no_repeat_ngram_size < 0 or (self.min_new_tokens or 0) < 0 or self.min_length < 0:
            raise InputError("no_repeat_ngram_size, min_new_tokens and min_length must be >= 0")


def generation_config_for(model: Any) -> GenerationConfig:
    config = getattr(model, "generation_config", None)
    return config if config is not None else GenerationConfig.from_model_config(model.config)


# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: Any, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
             generation_config: GenerationConfig | None = None, streamer: Any = None, tokenizer: Any = None,
             generator: torch.Generator | None = None, seed: int | None = None, **kwargs: Any) -> Any:
    """Generate continuations; returns [batch * num_return_sequences, prompt + new] token ids (prompt included),
    or a dict with `sequences` (and `scores`) when return_dict_in_generate=True."""
    inputs = kwargs.pop("inputs", None)
    if input_ids is None:
        input_ids = inputs
    for alias in ("pad_token_id", "bos_token_id", "eos_token_id"):  # explicit None means "not given" here
        if alias in kwargs and kwargs[alias] is None:
            kwargs.pop(alias)
    config = (generation_config or generation_config_for(model)).updated(**kwargs)
    config.validate()
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    device = model.device
    eos_ids = config.eos_ids
    if config.pad_token_id is None and eos_ids:
        config.pad_token_id = eos_ids[0]
    input_ids = _prompt_ids(input_ids, config, device)
    attention_mask = _prompt_mask(input_ids, attention_mask, config, eos_ids)
    if config.stop_strings and tokenizer is None:
        raise InputError("stop_strings need the tokenizer: pass tokenizer=... to generate")
    if streamer is not None and input_ids.shape[0] != 1:
        raise InputError("streaming works with one prompt at a time (batch size 1)")

    if config.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    batch, prompt_len = input_ids.shape
    max_length = _max_length(config, prompt_len, model.config.max_position_embeddings)
    min_length = max(config.min_length, prompt_len + (config.min_new_tokens or 0))
    stop = StopStrings(config.stop_strings, tokenizer, prompt_len) if config.stop_strings else None

    if streamer is not None:
        streamer.put(input_ids[0].cpu())
    sequences = input_ids
    mask = attention_mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    from .modeling import KVCache

    # keep_plans: the layers' native decode plans are checked once per call (changes a streamer or a logits
    # processor makes to the model's weights or hooks apply from the next call)
    cache = KVCache(model.config.num_hidden_layers, capacity=max_length, keep_plans=True) if config.use_cache else None
    step_ids, step_positions = sequences, positions
    eos_tensor = torch.tensor(eos_ids, device=device)
    all_scores: list[Tensor] = []
    while sequences.shape[1] < max_length:
        if cache is None:  # recompute everything each step (use_cache=False)
            step_ids, step_positions = sequences, positions
        out = model(step_ids, attention_mask=mask, position_ids=step_positions, past_key_values=cache,
                    use_cache=cache is not None, logits_to_keep=1)
        scores = out.logits[:, -1].float()
        scores = process_logits(scores, sequences, mask, config, eos_ids, min_length, prompt_len)
        if config.output_scores:
            all_scores.append(scores)
        if config.do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if config.pad_token_id is not None:
            next_tokens = torch.where(unfinished, next_tokens, config.pad_token_id)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos_ids:
            unfinished &= ~torch.isin(next_tokens, eos_tensor)
        if stop is not None:
            unfinished &= ~stop.hit(sequences)
        if not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        step_ids, step_positions = next_tokens[:, None], positions[:, -1:]
    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return {"sequences": sequences, "scores": tuple(all_scores) if config.output_scores else None}
    return sequences


def _prompt_ids(input_ids: Any, config: GenerationConfig, device: torch.device) -> Tensor:
    if input_ids is None:
        if config.bos_token_id is None:
            raise InputError("no prompt given and the model has no bos_token_id to start from")
        return torch.tensor([[config.bos_token_id]], device=device)
    if not isinstance(input_ids, Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, length], got {list(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise InputError("the prompt is empty: give at least one token (or no input_ids to start from bos)")
    return input_ids.to(device)


def _prompt_mask(input_ids: Tensor, attention_mask: Tensor | None, config: GenerationConfig,
                 eos_ids: list[int]) -> Tensor:
    """The given mask, or the reference's inference: pad tokens are padding only when pad differs from eos."""
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {list(attention_mask.shape)} does not match input_ids "
                             f"{list(input_ids.shape)}")
        if not bool(attention_mask.any(dim=1).all()):
            raise InputError("a prompt in the batch is all padding (its attention_mask row is all 0)")
        return attention_mask.long()
    pad = config.pad_token_id
    if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def _max_length(config: GenerationConfig, prompt_len: int, context: int) -> int:
    if prompt_len >= context:
        raise InputError(f"the prompt has {prompt_len} tokens, which fills the model's context window of "
                         f"{context} tokens: shorten it")
    if config.max_new_tokens is not None:
        wanted = prompt_len + config.max_new_tokens
    elif config.max_length is not None:
        if config.max_length <= prompt_len:
            raise InputError(f"max_length={config.max_length} leaves no room after the {prompt_len}-token prompt; "
                             f"use max_new_tokens to set the number of new tokens")
        wanted = config.max_length
    else:
        wanted = prompt_len + 20
    if wanted > context:
        warnings.warn(f"generation stops at the context window ({context} tokens), before the requested "
                      f"{wanted - prompt_len} new tokens", stacklevel=3)
    return min(wanted, context)


# ---------------------------------------------------------------------------------------------------------------
def process_logits(scores: Tensor, sequences: Tensor, mask: Tensor, config: GenerationConfig, eos_ids: list[int],
                   min_length: int, prompt_len: int) -> Tensor:
    """Apply the logits processors in the reference's order; `scores` is [batch, vocab] float32."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, sequences, mask, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, config.no_repeat_ngram_size)
    if eos_ids and sequences.shape[1] < min_length:
        scores[:, eos_ids] = -float("inf")
    if not config.do_sample:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k > 0:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    if config.typical_p < 1.0:
        scores = typical_filter(scores, config.typical_p)
    return scores


def repetition_penalty(scores: Tensor, sequences: Tensor, mask: Tensor, penalty: float) -> Tensor:
    """Make every token already in a row (padding excluded) less likely: divide positive, multiply negative."""
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, sequences, mask.bool())
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def ban_repeated_ngrams(scores: Tensor, sequences: Tensor, n: int) -> Tensor:
    """Forbid any token that would complete an n-gram already present in the row."""
    length = sequences.shape[1]
    if length + 1 < n:
        return scores
    rows = sequences.tolist()
    for b, row in enumerate(rows):
        prefix = tuple(row[length - n + 1:]) if n > 1 else ()
        banned = {row[i + n - 1] for i in range(length - n + 1) if tuple(row[i:i + n - 1]) == prefix}
        if banned:
            scores[b, list(banned)] = -float("inf")
    return scores


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Keep the most likely tokens whose probability mass reaches top_p (at least one)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def typical_filter(scores: Tensor, mass: float) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nansum(-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), -float("inf"))


class StopStrings:
    """Finishes a row once its generated text contains one of the stop strings."""

    def __init__(self, stop: str | list[str], tokenizer: Any, prompt_len: int) -> None:
        self.strings = [stop] if isinstance(stop, str) else list(stop)
        if not self.strings or not all(isinstance(s, str) and s for s in self.strings):
            raise InputError("stop_strings must be a non-empty string or a list of them")
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def hit(self, sequences: Tensor) -> Tensor:
        texts = self.tokenizer.batch_decode(sequences[:, self.prompt_len:].tolist())
        return torch.tensor([any(s in text for s in self.strings) for text in texts], device=sequences.device)


# ---------------------------------------------------------------------------------------------------------------
class TextStreamer:
    """Prints text to stdout as tokens arrive, whole characters only."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, skip_special_tokens: bool = False,
                 **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens or decode_kwargs.get("skip_special_tokens", False)
        self.decoder = None
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if not self.prompt_seen:
            self.prompt_seen = True
            self.decoder = self.tokenizer.stream_decoder(skip_special_tokens=self.skip_special_tokens)
            if self.skip_prompt:
                return
        self.on_text(self.decoder.add(ids))

    def end(self) -> None:
        if self.decoder is not None:
            self.on_text(self.decoder.finish(), stream_end=True)
        self.decoder, self.prompt_seen = None, False

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="" if not stream_end else "\n", flush=True, file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Yields the text pieces from another thread: run generate in a thread and iterate over this object."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.queue.get(timeout=self.timeout)
            if item is None:
                return
            yield item


def stream_generate(model: Any, tokenizer: Any, input_ids: Tensor, **kwargs: Any) -> Iterator[str]:
    """Generate in a background thread and yield the text pieces as they come (prompt excluded)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True,
                                    skip_special_tokens=kwargs.pop("skip_special_tokens", True))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            model.generate(input_ids, streamer=streamer, tokenizer=tokenizer, **kwargs)
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.queue.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
