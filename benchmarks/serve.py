"""Load test of `neoxja serve` on loopback: the same fixed set of requests sent one at a time, then by 8 and by 32
concurrent clients, against one server (continuous batching, --max-batch = the largest concurrency).

    python benchmarks/serve.py                                   # the bundled demo model
    python benchmarks/serve.py --model DIR --requests 64 --max-tokens 64 --concurrency 8 32

Every request streams a completion of exactly --max-tokens tokens (ignore_eos; greedy by default, --temperature
samples with a seed per request) and asks for its usage, so each mode does the same work. A request counts as
failed unless it gets 200, a finish_reason of "length", that many completion tokens and the closing
`data: [DONE]`; the run exits with status 1 if any failed or the server rejected any (its /metrics tells).
Per mode: requests/s, output tokens/s, p50/p99 latency and time to first token (TTFT), and the mean decode batch
(from /metrics); then each concurrent mode's output tokens/s over the sequential one's."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "吾輩は猫である。名前はまだ無い。", "人とAIが協調するためには、", "親譲りの無鉄砲で小供の時から損ばかりしている。",
    "私はその人を常に先生と呼んでいた。", "ある日の暮方の事である。", "山路を登りながら、こう考えた。",
    "東京の夏は", "その夜、彼は長い手紙を書いた。",
]


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float
    tokens: int


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    top = max(args.concurrency)
    command = [sys.executable, "-m", "neoxja.cli", "serve", "--port", "0", "--log-level", "warning", "--quiet",
               "--max-batch", str(top), "--max-queue", str(max(64, 2 * top))]
    if args.model:
        command += ["--model", args.model]
    if args.dtype:
        command += ["--dtype", args.dtype]
    with open(log, "w", encoding="utf-8") as stderr:  # the server prints its URL there (it picks the port)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while True:
        found = re.search(r"at (http://\S+)/v1", log.read_text(encoding="utf-8"))
        try:
            if found and httpx.get(f"{found.group(1)}/health").status_code == 200:
                return process, found.group(1)
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"the server did not start:\n{log.read_text(encoding='utf-8')}")
        time.sleep(0.1)


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    ttft, tokens, reason, done = None, 0, None, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                return Result(False, time.perf_counter() - start, 0.0, 0)
            async for line in answer.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    break
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["text"] and ttft is None:
                        ttft = time.perf_counter() - start
                    reason = choice["finish_reason"] or reason
    except httpx.HTTPError:
        done = False
    latency = time.perf_counter() - start
    ok = done and reason == "length" and tokens == body["max_tokens"]
    return Result(ok, latency, ttft if ttft is not None else latency, tokens)


async def run_mode(url: str, bodies: list[dict], concurrency: int) -> tuple[list[Result], float]:
    """Send `bodies` with `concurrency` clients, each taking the next request when its last one is done."""
    pending = iter(bodies)
    results: list[Result] = []
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            for body in pending:
                results.append(await one(client, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def decode_batch(before: str, after: str) -> float:
    """Mean sequences per decode step between two /metrics texts (each sequence's first token comes from its
    prefill, the others from batched decode steps)."""
    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    decoded = delta("neoxja_generation_tokens_total") - delta('neoxja_requests_total{outcome="completed"}')
    return decoded / max(1.0, delta("neoxja_decode_steps_total"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the bundled demo model)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--requests", type=int, default=64, help="requests per mode (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="concurrent clients per "
                                                                                     "mode (default 8 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily; above, "
                                                                       "requests sample with seeds 0, 1, ...")
    parser.add_argument("--top-p", type=float, help="top_p of every request (default: the model's)")
    args = parser.parse_args()
    sampling = {"temperature": args.temperature} | ({"top_p": args.top_p} if args.top_p is not None else {})
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, **sampling, "seed": i,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for i in range(args.requests)]
    log = Path(tempfile.mkdtemp()) / "serve.log"
    process, url = start_server(args, log)
    try:
        asyncio.run(run_mode(url, bodies[:2], 1))  # warm-up
        print(f"{args.requests} requests × {args.max_tokens} tokens per mode, {sampling}; server: {url} "
              f"({args.model or 'demo model'}), {os.cpu_count()} CPUs\n")
        print("| mode | req/s | out tok/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | decode batch "
              "| failed |")
        print("|---|---|---|---|---|---|---|---|---|")
        speeds, failures = {}, 0
        for concurrency in [1, *args.concurrency]:
            before = httpx.get(f"{url}/metrics").text
            results, wall = asyncio.run(run_mode(url, bodies, concurrency))
            batch = decode_batch(before, httpx.get(f"{url}/metrics").text)
            failed = sum(not r.ok for r in results) + args.requests - len(results)
            failures += failed
            latencies, ttfts = [r.latency for r in results], [r.ttft for r in results]
            speeds[concurrency] = sum(r.tokens for r in results) / wall
            mode = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
            print(f"| {mode} | {len(results) / wall:.2f} | {speeds[concurrency]:.1f} | "
                  f"{statistics.median(latencies):.3f} | {percentile(latencies, 99):.3f} | "
                  f"{statistics.median(ttfts):.3f} | {percentile(ttfts, 99):.3f} | {batch:.1f} | {failed} |",
                  flush=True)
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=60)
    rejected = metric(metrics, 'neoxja_requests_total{outcome="rejected"}')
    print()
    for concurrency in args.concurrency:
        print(f"speed-up, {concurrency} concurrent clients over sequential: {speeds[concurrency] / speeds[1]:.1f}x "
              f"output tokens/s")
    print(f"requests rejected by the server: {rejected:g}")
    if failures or rejected:
        sys.exit(f"{failures} requests failed, {rejected:g} rejected")


if __name__ == "__main__":
    main()
