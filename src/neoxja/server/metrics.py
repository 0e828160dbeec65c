"""The server's Prometheus metrics: counters, histograms and gauges kept in memory and written in Prometheus' text
exposition format (version 0.0.4) by hand, so serving needs no metrics library.

The engine's worker thread records and the HTTP handlers render, so every update and every render takes the
registry's lock. Gauges are read from a function at scrape time (the queue depth is the engine's, not a copy)."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

# Seconds; spans a tiny model's milliseconds to a 3.6B model's minute-long answers on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    """A monotonically increasing total, one per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, lock: threading.Lock) -> None:
        self.name, self.help, self._lock = name, help_text, lock
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self._lock:
            return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(key)} {_number(value)}" for key, value in sorted(self.values.items())]


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, lock: threading.Lock,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self._lock = name, help_text, lock
        self.bounds = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[i] += 1

    def samples(self) -> list[str]:
        lines = [f'{self.name}_bucket{{le="{_number(bound)}"}} {count}'
                 for bound, count in zip(self.bounds, self.counts)]
        return lines + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.counts[-1]}"]


class Gauge:
    """A value read from `read` whenever the metrics are rendered."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class ServerMetrics:
    """Everything /metrics reports. The engine records generation work, the HTTP layer records requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        lock = self._lock
        self.http_requests = Counter("neoxja_http_requests_total", "HTTP requests answered, by endpoint and status "
                                     "code", lock)
        self.requests = Counter("neoxja_requests_total", "generation requests by outcome: completed, cancelled "
                                "(the client went away), failed, rejected (queue full)", lock)
        self.prompt_tokens = Counter("neoxja_prompt_tokens_total", "prompt tokens prefilled", lock)
        self.generation_tokens = Counter("neoxja_generation_tokens_total", "tokens generated", lock)
        self.decode_steps = Counter("neoxja_decode_steps_total", "batched decode steps run (each sequence's first "
                                    "token comes from its prefill, the others from these steps)", lock)
        self.latency = Histogram("neoxja_request_duration_seconds", "time from a generation request's arrival to "
                                 "its last token", lock)
        self.first_token = Histogram("neoxja_time_to_first_token_seconds", "time from a generation request's "
                                     "arrival to its first token", lock)
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        families = [self.http_requests, self.requests, self.prompt_tokens, self.generation_tokens,
                    self.decode_steps, self.latency, self.first_token]
        lines: list[str] = []
        with self._lock:
            for family in families:
                lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
                lines += family.samples()
        for gauge in self.gauges:  # read outside the lock: a gauge may take the engine's own lock
            lines += [f"# HELP {gauge.name} {gauge.help}", f"# TYPE {gauge.name} gauge", *gauge.samples()]
        return "\n".join(lines) + "\n"
