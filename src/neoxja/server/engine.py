"""The continuous-batching engine: one worker thread owns the model and generates for every request at once.
It knows nothing of HTTP; the server (neoxja.server.app) submits token ids and receives text events.

Each turn of the worker's loop:
1. admit waiting sequences while fewer than `max_batch` run: each newcomer's prompt is prefilled alone, its first
   token picked, and its KV cache joined to the batch's, left-padded so every row ends at the same column
   (KVCache.stack);
2. one decode step for all running sequences together, with an attention mask that hides each row's padding and
   per-row position ids, so each row computes what it would alone;
3. per row, the request's own logits processing (neoxja.generation's processors plus OpenAI's frequency and
   presence penalties) and sampler (its own torch.Generator), the token turned into whole characters
   (StreamDecoder) and checked against the stop strings; new text goes to the request's sink;
4. finished and cancelled rows leave the batch (KVCache.select_batch), and columns that have become padding in
   every row are dropped (KVCache.crop_left).
A request arriving mid-generation waits at most one decode step, and finished ones free their row at once.
Greedy decoding gives what `model.generate` gives for the same prompt; sampling with a seed is reproducible.
Waiting sequences are bounded by `max_queue`: beyond it submit() raises QueueFull instead of queueing."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, InputError, NeoxjaError
from ..generation import GenerationConfig, generation_config_for, process_logits
from ..modeling import KVCache
from .metrics import ServerMetrics


class QueueFull(NeoxjaError):
    """The engine's queue holds as many waiting sequences as it may: retry later."""


class EngineStopped(NeoxjaError):
    """The engine is shutting down and takes no more requests."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Event:
    """New output of one sequence of a request. `index` is prompt_number * n + choice_number; `finish_reason`
    ("stop" or "length") marks its last event; `tokens` counts the tokens it has generated. An event with
    `error` set ends the whole request."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None


class Ticket:
    """A submitted request. Its events go to `sink`, called from the worker thread (so it must be quick and
    thread-safe); cancel() stops its generation at the next step, e.g. when the client has gone away."""

    def __init__(self, sink: Callable[[Event], None], count: int) -> None:
        self.sink = sink
        self.count = count
        self.remaining = count  # sequences not yet retired; the worker's to update
        self.cancelled = False
        self.failed = False
        self.incomplete = False  # some sequence left before finishing (the request was cancelled)
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


def frequency_presence_penalty(scores: Tensor, generated: list[int], frequency: float, presence: float) -> Tensor:
    """OpenAI's penalties: lower each token's logit by `frequency` times the number of times it was generated so
    far, and by `presence` once if it was generated at all (the prompt does not count)."""
    if not generated:
        return scores
    counts = torch.bincount(torch.tensor(generated, device=scores.device), minlength=scores.shape[-1])
    counts = counts.to(scores.dtype)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


class Sequence:
    """One sequence being generated: a prompt, the tokens picked so far, and the text handed out."""

    def __init__(self, ticket: Ticket, index: int, prompt: list[int], params: SamplingParams, tokenizer: Any,
                 device: torch.device) -> None:
        self.ticket, self.index, self.prompt, self.params = ticket, index, prompt, params
        self.generated: list[int] = []
        self.length = 0  # positions of this row held in the KV cache
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.text = ""  # the output so far (cut before a stop string once one appears)
        self.sent = 0  # characters of `text` handed out
        self.finish_reason: str | None = None
        self.config = GenerationConfig(do_sample=params.temperature > 0, temperature=params.temperature or 1.0,
                                       top_k=params.top_k, top_p=params.top_p,
                                       repetition_penalty=params.repetition_penalty)
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:  # each choice its own stream; choice 0 samples what generate(seed=seed) samples
            self.generator.manual_seed((params.seed + index) % 2**64)

    def next_token(self, logits: Tensor, eos_ids: list[int]) -> int:
        """This sequence's next token from its row of logits ([1, vocab], float32)."""
        params = self.params
        if params.ignore_eos and eos_ids:
            logits = logits.index_fill(1, torch.tensor(eos_ids, device=logits.device), -float("inf"))
        if params.frequency_penalty or params.presence_penalty:
            logits = frequency_presence_penalty(logits, self.generated, params.frequency_penalty,
                                                params.presence_penalty)
        # The token history is only read by the repetition penalty; building it every step would be waste.
        history = torch.tensor([self.prompt + self.generated] if params.repetition_penalty != 1.0 else [[0]],
                               device=logits.device)
        scores = process_logits(logits, history, torch.ones_like(history), self.config, [], 0, len(self.prompt))
        if self.config.do_sample:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        return int(scores.argmax(dim=-1))

    def accept(self, token: int, eos_ids: list[int]) -> Event | None:
        """Record `token`; return the event announcing new text (or the end), if there is one."""
        self.generated.append(token)
        params = self.params
        if token in eos_ids and not params.ignore_eos:
            self.finish_reason = "stop"
        elif len(self.generated) >= params.max_tokens:
            self.finish_reason = "length"
        self.text += self.decoder.add(token)
        if self.finish_reason:
            self.text += self.decoder.finish()
        # A stop string can only begin in the text not yet sent: a tail that could begin one is held back.
        hits = [i for s in params.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.text, self.finish_reason = self.text[:min(hits)], "stop"
        end = len(self.text) if self.finish_reason else len(self.text) - self._stop_prefix()
        new, self.sent = self.text[self.sent:end], max(end, self.sent)
        if new or self.finish_reason:
            return Event(self.index, new, self.finish_reason, len(self.generated))
        return None

    def _stop_prefix(self) -> int:
        """Length of the longest tail of the unsent text that more text could turn into a stop string."""
        tail = self.text[self.sent:]
        longest = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(tail)), longest, -1):
                if stop.startswith(tail[-k:]):
                    longest = k
                    break
        return longest


class Engine:
    """Serves generation requests for one model with continuous batching (see the module docstring).

    Use it as a context manager, or call start() and stop(). submit() may be called from any thread."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 64,
                 metrics: ServerMetrics | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: it must be a positive integer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.max_position_embeddings
        self.eos_ids = generation_config_for(model).eos_ids  # what generate() stops at
        self.device = model.device
        self.metrics = metrics or ServerMetrics()
        self.metrics.gauge("neoxja_queue_depth", "sequences waiting for a place in the batch",
                           lambda: len(self._waiting))
        self.metrics.gauge("neoxja_running_sequences", "sequences in the running batch", lambda: len(self._running))
        self.metrics.gauge("neoxja_queue_capacity", "most sequences that may wait (--max-queue)",
                           lambda: self.max_queue)
        self.metrics.gauge("neoxja_max_batch", "most sequences decoded together (--max-batch)",
                           lambda: self.max_batch)
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # the batch's rows, in cache order; the worker's alone
        self._cache: KVCache | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="neoxja-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the current step, then end every unfinished request with an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail([*self._waiting, *self._running], "the server is shutting down")
        self._waiting.clear()
        self._running, self._cache = [], None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- requests -----------------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, sink: Callable[[Event], None],
               n: int = 1) -> Ticket:
        """Queue `n` sequences for each prompt (token ids); their events go to `sink`. Raises InputError for a
        request that can never run, QueueFull when the queue has no room for it now, EngineStopped after stop()."""
        count = len(prompts) * n
        if count < 1:
            raise InputError("a request needs at least one prompt and n >= 1")
        if count > self.max_queue:
            raise InputError(f"the request asks for {count} sequences (prompts × n), more than this server queues "
                             f"at once ({self.max_queue}); send fewer prompts or a smaller n")
        if params.max_tokens < 1:
            raise InputError("max_tokens must be at least 1")
        for prompt in prompts:
            if not prompt:
                raise InputError("a prompt is empty: it needs at least one token")
            if len(prompt) + params.max_tokens > self.context:
                raise InputError(f"a {len(prompt)}-token prompt plus max_tokens={params.max_tokens} exceeds the "
                                 f"model's context window of {self.context} tokens")
        ticket = Ticket(sink, count)
        sequences = [Sequence(ticket, p * n + j, prompt, params, self.tokenizer, self.device)
                     for p, prompt in enumerate(prompts) for j in range(n)]
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) + count > self.max_queue:
                self.metrics.requests.inc(outcome="rejected")
                raise QueueFull(f"the queue is full ({len(self._waiting)} of {self.max_queue} places taken); "
                                "retry shortly")
            self._waiting.extend(sequences)
            self._lock.notify()
        return ticket

    # -- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        with torch.no_grad():
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._running:
                        self._lock.wait()
                    if self._stopping:
                        return
                    # Cancelled requests give their places in the queue back now, not when their turn comes.
                    dropped = [seq for seq in self._waiting if seq.ticket.cancelled]
                    if dropped:
                        self._waiting = deque(seq for seq in self._waiting if not seq.ticket.cancelled)
                    room = self.max_batch - len(self._running)
                    newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                for seq in dropped:
                    self._retire_one(seq)
                try:
                    self._admit(newcomers)
                    self._retire()
                    if self._running:
                        self._decode()
                        self._retire()
                except Exception as err:  # noqa: BLE001  a failed step fails its requests, not the server
                    self._fail([*newcomers, *self._running], f"generation failed: {type(err).__name__}: {err}")
                    self._running, self._cache = [], None

    def _admit(self, newcomers: list[Sequence]) -> None:
        """Prefill each newcomer alone, pick its first token, and join its cache to the batch's."""
        joined: list[tuple[Sequence, KVCache]] = []
        prefilled: tuple[list[int], Tensor, KVCache] | None = None
        for seq in newcomers:
            if seq.ticket.cancelled:
                self._retire_one(seq)
                continue
            # The n choices of one prompt are queued together and share its prefill.
            if prefilled is None or prefilled[0] is not seq.prompt:
                cache = KVCache(self.model.config.num_hidden_layers)
                ids = torch.tensor([seq.prompt], device=self.device)
                out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                prefilled = (seq.prompt, out.logits[:, -1].float(), cache)
                self.metrics.prompt_tokens.inc(len(seq.prompt))
            _, logits, cache = prefilled
            self.metrics.generation_tokens.inc()
            seq.length = len(seq.prompt)
            self._take(seq, seq.next_token(logits, self.eos_ids))
            if seq.finish_reason is None:
                joined.append((seq, cache))
            else:  # done in one token: no need to join the batch
                self._retire_one(seq)
        if joined:
            current = [self._cache] if self._cache is not None else []
            self._cache = KVCache.stack(current + [cache for _, cache in joined])
            self._running += [seq for seq, _ in joined]

    def _decode(self) -> None:
        """One step for every running sequence: feed each its last token, pick the next."""
        rows = self._running
        assert self._cache is not None
        width = self._cache.get_seq_length() + 1
        lengths = torch.tensor([seq.length for seq in rows], device=self.device)
        # Row i's real positions are its last lengths[i] cached columns plus the new one; the rest is padding.
        mask = (torch.arange(width, device=self.device)[None] >= (width - 1 - lengths)[:, None]).long()
        tokens = torch.tensor([[seq.generated[-1]] for seq in rows], device=self.device)
        out = self.model(tokens, attention_mask=mask, position_ids=lengths[:, None], past_key_values=self._cache,
                         use_cache=True)
        logits = out.logits[:, -1].float()
        picked = 0
        for i, seq in enumerate(rows):
            seq.length += 1
            if not seq.ticket.cancelled:  # leaves the batch in _retire
                self._take(seq, seq.next_token(logits[i:i + 1], self.eos_ids))
                picked += 1
        self.metrics.decode_steps.inc()
        self.metrics.generation_tokens.inc(picked)

    def _take(self, seq: Sequence, token: int) -> None:
        """Record the token picked for `seq` and send the request whatever text it completes."""
        ticket = seq.ticket
        if ticket.first_token_at is None:
            ticket.first_token_at = time.perf_counter()
            self.metrics.first_token.observe(ticket.first_token_at - ticket.arrived)
        event = seq.accept(token, self.eos_ids)
        if event is not None:
            self._send(ticket, event)

    def _send(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.sink(event)
        except Exception:  # noqa: BLE001  a consumer that cannot take events has gone: stop working for it
            ticket.cancel()

    def _retire(self) -> None:
        """Take finished and cancelled rows out of the batch; drop columns that are now padding in every row."""
        rows = self._running
        keep = [i for i, seq in enumerate(rows) if seq.finish_reason is None and not seq.ticket.cancelled]
        if len(keep) == len(rows):
            return
        for i in sorted(set(range(len(rows))) - set(keep)):
            self._retire_one(rows[i])
        if not keep:
            self._running, self._cache = [], None
            return
        assert self._cache is not None
        self._running = [rows[i] for i in keep]
        self._cache.select_batch(torch.tensor(keep, device=self.device))
        unused = self._cache.get_seq_length() - max(seq.length for seq in self._running)
        if unused:
            self._cache.crop_left(unused)

    def _retire_one(self, seq: Sequence) -> None:
        ticket = seq.ticket
        ticket.remaining -= 1
        # A client may cancel after its last event but before the retirement: that request still completed.
        ticket.incomplete |= seq.finish_reason is None
        if ticket.remaining == 0 and not ticket.failed:
            self.metrics.requests.inc(outcome="cancelled" if ticket.incomplete else "completed")
            self.metrics.latency.observe(time.perf_counter() - ticket.arrived)

    def _fail(self, sequences: list[Sequence], message: str) -> None:
        """End the requests of `sequences` with an error event (once per request)."""
        for ticket in {id(seq.ticket): seq.ticket for seq in sequences}.values():
            if ticket.failed:
                continue
            ticket.failed = True
            ticket.cancel()  # its sequences still waiting are dropped when their turn comes
            self.metrics.requests.inc(outcome="failed")
            self._send(ticket, Event(index=0, error=message))
