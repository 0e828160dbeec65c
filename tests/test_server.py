"""`neoxja serve` over real HTTP: the official `openai` client and raw httpx against servers on free loopback ports.

Three servers: the real command (`neoxja serve` in a subprocess) with the tiny rinna checkpoint, an API key and a
small body limit (chat, auth, bad input, limits); an in-process uvicorn with the bundled demo model (completions against
model.generate, streaming, stop, n, seeds, concurrency); and one with the tiny ABEJA checkpoint slowed down by a
forward hook, with one batch place and one queue place (client disconnects, a full queue)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

import neoxja
from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)
from neoxja.chat import parse_reply
from neoxja.cli import main
from neoxja.commands import NEXT_TURN
from neoxja.pipelines import DEMO_MODEL_DIR, chat_input_ids
from neoxja.server.app import create_app
from neoxja.server.engine import Engine

KEY = "test-key"
RINNA = "rinna-tiny"
ABEJA = "abeja-tiny"
DEMO = "demo"
BODY_LIMIT = 20_000
MESSAGES = [{"role": "system", "content": "丁寧に答えてください。"},
            {"role": "user", "content": "日本の首都は\nどこですか？"}]
PROMPTS = ["人とAIが協調するためには、", "吾輩は猫である。名前はまだ無い。"]


# ---------------------------------------------------------------------------------------------------------------
# Servers
@pytest.fixture(scope="module")
def rinna_url(rinna_model_checkpoint, tmp_path_factory):  # noqa: F811
    """`neoxja serve` itself, in a subprocess; its URL comes from the line it prints (it picks a free port)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "neoxja.cli", "serve", "--model", str(rinna_model_checkpoint), "--port", "0",
               "--api-key", KEY, "--served-model-name", RINNA, "--max-batch", "4",
               "--max-body-bytes", str(BODY_LIMIT), "--log-level", "warning", "--quiet"]
    with open(log, "w+", encoding="utf-8") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 90
            while not (found := re.search(r"at (http://\S+)/v1", log.read_text(encoding="utf-8"))):
                assert process.poll() is None, log.read_text(encoding="utf-8")
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
            url = found.group(1)
            _wait_healthy(url)
            yield url
        finally:
            process.terminate()
            code = process.wait(timeout=30)
    # uvicorn shuts down cleanly, then ends the process with the signal it got, as an unhandled SIGTERM would.
    assert code == -signal.SIGTERM and "Traceback" not in log.read_text(encoding="utf-8")


@contextlib.contextmanager
def serve_in_thread(app):
    """Run `app` on uvicorn in a thread, on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        _wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def demo():
    """(url, model, tokenizer, engine): an in-process server for the bundled demo model (ABEJA's architecture and
    tokenizer), in float32. It is trained, so its text depends on the prompt, which comparisons need."""
    model = neoxja.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    tokenizer = neoxja.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    with Engine(model, tokenizer, max_batch=8) as engine, serve_in_thread(create_app(engine, DEMO)) as url:
        yield url, model, tokenizer, engine


@pytest.fixture(scope="module")
def slow(abeja_checkpoint):  # noqa: F811
    """(url, engine, broken): one running sequence and one waiting at most, 20 ms per forward pass, and every
    forward pass fails while the `broken` event is set."""
    model = neoxja.AutoModelForCausalLM.from_pretrained(abeja_checkpoint)
    tokenizer = neoxja.AutoTokenizer.from_pretrained(abeja_checkpoint)
    broken = threading.Event()

    def forward_hook(*_):
        time.sleep(0.02)
        if broken.is_set():
            raise RuntimeError("simulated failure")

    model.register_forward_pre_hook(forward_hook)
    with Engine(model, tokenizer, max_batch=1, max_queue=1) as engine, \
            serve_in_thread(create_app(engine, ABEJA)) as url:
        yield url, engine, broken


def client(url: str, key: str | None = KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0, **kwargs)


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def generate_text(model, decoder, ids: list[int], **kwargs) -> str:
    """model.generate's continuation of `ids`, decoded with `decoder` (a tokenizer) as the server decodes."""
    out = model.generate(torch.tensor([ids]), **kwargs)
    return decoder.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# The rinna server: the CLI, chat, auth, bad input
def test_health_models_and_metrics(rinna_url):
    assert httpx.get(f"{rinna_url}/health").json() == {"status": "ok"}  # no key needed
    models = client(rinna_url).models.list()
    assert [m.id for m in models.data] == [RINNA] and models.data[0].owned_by == "neoxja"
    assert client(rinna_url).models.retrieve(RINNA).id == RINNA
    with pytest.raises(openai.NotFoundError):
        client(rinna_url).models.retrieve("gpt-4")
    metrics = httpx.get(f"{rinna_url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("neoxja_queue_depth", "neoxja_running_sequences", "neoxja_requests_total",
                 "neoxja_generation_tokens_total", "neoxja_request_duration_seconds",
                 "neoxja_time_to_first_token_seconds", "neoxja_http_requests_total"):
        assert f"# TYPE {name} " in metrics.text
    assert 'neoxja_http_requests_total{code="200",endpoint="/v1/models"}' in metrics.text


def test_api_key(rinna_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        answer = httpx.post(f"{rinna_url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(rinna_url, key="wrong").models.list()
    assert httpx.get(f"{rinna_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.fixture(scope="module")
def rinna_local(rinna_model_checkpoint):  # noqa: F811
    return (neoxja.AutoModelForCausalLM.from_pretrained(rinna_model_checkpoint),
            neoxja.AutoTokenizer.from_pretrained(rinna_model_checkpoint))


def test_chat_uses_rinna_format(rinna_url, rinna_local):
    model, tokenizer = rinna_local
    ids = chat_input_ids(tokenizer, MESSAGES)
    raw = generate_text(model, tokenizer, ids, max_new_tokens=40, do_sample=False, stop_strings=[NEXT_TURN],
                        tokenizer=tokenizer)
    answer = client(rinna_url).chat.completions.create(model=RINNA, messages=MESSAGES, max_tokens=40,
                                                       temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == RINNA
    assert abs(answer.created - time.time()) < 60
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == parse_reply(raw)
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.total_tokens == len(ids) + answer.usage.completion_tokens


def test_chat_stream_concatenates_to_the_answer(rinna_url):
    chat = client(rinna_url).chat.completions
    kwargs = dict(model=RINNA, messages=MESSAGES, max_tokens=40, temperature=0)
    whole = chat.create(**kwargs)
    chunks = list(chat.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_stop_sequences_use_the_reply_text(rinna_url):
    chat = client(rinna_url).chat.completions
    # The tiny random model repeats one token unless penalised.
    kwargs = dict(model=RINNA, messages=MESSAGES, max_tokens=60, temperature=0,
                  extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    full = chat.create(**kwargs).choices[0].message.content
    assert len(set(full)) > 6, full
    stop = full[3:5]
    cut = chat.create(**kwargs, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)].strip() and cut.finish_reason == "stop"


BAD_COMPLETIONS = [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"n": 0}, "n"), ({"n": "2"}, "n"), ({"n": 1000}, "n"), ({"n": 100}, "n"),  # 100 fits MAX_N, not the queue
    ({"stop": 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": "x"}, "seed"), ({"seed": 1.5}, "seed"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": "x"}, "presence_penalty"), ({"ignore_eos": 1}, "ignore_eos"), ({"user": 5}, "user"),
    ({"logprobs": 5}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"suffix": "x"}, "suffix"), ({"foo": 1}, "foo"),
    ({"model": 5}, "model"), ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [True]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": "a\ud800"}, "prompt"),
    ({"prompt": ["x", "\udfff"]}, "prompt"), ({"stop": ["\ud800"]}, "stop"),
    ({"prompt": "あ" * 300}, "prompt"),  # longer than the 128-token context window
    ({"prompt": "あ" * 60, "max_tokens": 120}, "max_tokens"),  # fits alone, not with its completion
]
BAD_CHATS = [
    ({"messages": None}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"prompt": "x"}, "prompt"),
    ({"max_completion_tokens": 500}, "max_completion_tokens"),
]


@pytest.mark.parametrize("chat, fields, param", [(False, f, p) for f, p in BAD_COMPLETIONS] +
                         [(True, f, p) for f, p in BAD_CHATS])
def test_bad_input_is_a_400_naming_the_field(rinna_url, chat, fields, param):
    body = ({"model": RINNA, "messages": MESSAGES} if chat else {"model": RINNA, "prompt": "こんにちは"}) | fields
    body = {k: v for k, v in body.items() if v is not None}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    # json.dumps escapes lone surrogates as \\udXXX, as a client in another language might send them.
    answer = httpx.post(f"{rinna_url}{path}", content=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_bodies_unknown_model_and_the_body_limit(rinna_url):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{rinna_url}/v1/completions"
    for body in (b"{", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}', b"\xff\xfe", b""):
        answer = httpx.post(url, content=body, headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", body
    answer = httpx.post(url, json={"model": "gpt-4", "prompt": "x"}, headers=headers)
    assert answer.status_code == 404
    assert answer.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                        "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        client(rinna_url).completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(rinna_url).completions.create(model=RINNA, prompt="x", max_tokens=-5)
    big = json.dumps({"prompt": "あ" * BODY_LIMIT}).encode()
    answer = httpx.post(url, content=big, headers=headers)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    answer = httpx.post(url, content=chunks(), headers=headers)
    assert answer.status_code == 413
    answer = httpx.get(f"{rinna_url}/v1/nothing", headers=headers)
    assert answer.status_code == 404 and "error" in answer.json()
    assert httpx.get(url, headers=headers).status_code == 405


# ---------------------------------------------------------------------------------------------------------------
# The demo server: completions
def test_completions_equal_generate(demo):
    url, model, tokenizer, _ = demo
    answer = client(url).completions.create(model=DEMO, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == DEMO
    assert [c.index for c in answer.choices] == [0, 1]
    for prompt, choice in zip(PROMPTS, answer.choices):
        assert choice.text == generate_text(model, tokenizer, encode(tokenizer, prompt), max_new_tokens=24,
                                            do_sample=False)
        assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == sum(len(encode(tokenizer, p)) for p in PROMPTS)
    # Token ids work as prompts too, and give the same text.
    ids = client(url).completions.create(model=DEMO, prompt=encode(tokenizer, PROMPTS[0]), max_tokens=24,
                                         temperature=0)
    assert ids.choices[0].text == answer.choices[0].text


def test_streamed_pieces_concatenate_to_the_text(demo):
    url = demo[0]
    completions = client(url).completions
    kwargs = dict(model=DEMO, prompt=PROMPTS[1], max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    whole = completions.create(**kwargs)
    chunks = list(completions.create(**kwargs, stream=True))
    assert len(chunks) > 3 and {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens == 30
    # Raw SSE: "data: {...}" events, the last "data: [DONE]".
    raw = {"model": DEMO, "prompt": PROMPTS[1], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=raw) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_sequences(demo):
    url = demo[0]
    completions = client(url).completions
    kwargs = dict(model=DEMO, prompt=PROMPTS[1], max_tokens=40, temperature=0)
    full = completions.create(**kwargs).choices[0].text
    assert len(full) > 20, full
    stops = [full[12:14], full[8:10]]  # the earlier one wins, whatever the order
    cut = min(full.index(stop) for stop in stops)
    assert cut > 0
    whole = completions.create(**kwargs, stop=stops).choices[0]
    assert whole.text == full[:cut] and whole.finish_reason == "stop"
    streamed = list(completions.create(**kwargs, stop=stops, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    single = completions.create(**kwargs, stop=full[12:14]).choices[0]
    assert single.text == full[:full.index(full[12:14])]


def test_n_choices_and_seeds(demo):
    url, model, tokenizer, _ = demo
    completions = client(url).completions
    kwargs = dict(model=DEMO, prompt=PROMPTS, max_tokens=12, n=3, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    first, second = completions.create(**kwargs), completions.create(**kwargs)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices[:3]}) > 1  # but each choice samples differently
    ids = encode(tokenizer, PROMPTS[0])
    assert first.choices[0].text == generate_text(model, tokenizer, ids, max_new_tokens=12, do_sample=True,
                                                  temperature=1.0, top_k=0, seed=7)
    assert first.usage.prompt_tokens == sum(len(encode(tokenizer, p)) for p in PROMPTS)  # once per prompt
    assert first.usage.completion_tokens == 6 * 12
    streamed = list(completions.create(**kwargs, stream=True))
    texts = [""] * 6
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in first.choices]


def test_chat_needs_a_chat_format(demo):
    answer = httpx.post(f"{demo[0]}/v1/chat/completions", json={"messages": MESSAGES})
    assert answer.status_code == 400 and "no chat format" in answer.json()["error"]["message"]


def test_concurrent_clients_share_the_batch(demo):
    url, _, _, engine = demo
    prompts = [f"{p}{i}" for i in range(4) for p in PROMPTS]  # 8 different prompts
    completions = client(url).completions
    alone = [completions.create(model=DEMO, prompt=p, max_tokens=20, temperature=0).choices[0].text
             for p in prompts]
    steps = engine.metrics.decode_steps.get()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: completions.create(model=DEMO, prompt=p, max_tokens=20,
                                                              temperature=0).choices[0].text, prompts))
    assert together == alone
    # Eight requests of up to 20 tokens, alone, would take up to 8 × 19 decode steps.
    assert engine.metrics.decode_steps.get() - steps < 8 * 19 / 2


# ---------------------------------------------------------------------------------------------------------------
# The slow server: disconnects and a full queue
LONG = {"model": ABEJA, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}


def test_disconnect_mid_stream_cancels_the_generation(slow):
    url, engine, _ = slow
    cancelled = engine.metrics.requests.get(outcome="cancelled")
    tokens = engine.metrics.generation_tokens.get()
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG) as answer:
        next(answer.iter_lines())  # the first piece of text: generation is under way
    wait_for(lambda: engine.metrics.requests.get(outcome="cancelled") == cancelled + 1)
    assert engine.running_count == 0 and engine.waiting_count == 0
    assert engine.metrics.generation_tokens.get() - tokens < 50  # it stopped long before 100 tokens
    assert 'neoxja_requests_total{outcome="cancelled"}' in httpx.get(f"{url}/metrics").text


def test_disconnect_while_waiting_for_a_whole_answer(slow):
    url, engine, _ = slow
    cancelled = engine.metrics.requests.get(outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=LONG | {"stream": False}, timeout=0.3)
    wait_for(lambda: engine.metrics.requests.get(outcome="cancelled") == cancelled + 1)
    assert engine.running_count == 0


def test_full_queue_is_a_429_with_retry_after(slow):
    url, engine, _ = slow
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/completions", json=LONG) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)  # this request holds the one batch place
            with http.stream("POST", f"{url}/v1/completions", json=LONG) as waiting:  # and this one the queue's
                wait_for(lambda: engine.waiting_count == 1)
                answer = httpx.post(f"{url}/v1/completions", json=LONG | {"stream": False})
                assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
                assert answer.json()["error"]["code"] == "queue_full"
                with pytest.raises(openai.RateLimitError):
                    client(url, key=None).completions.create(model=ABEJA, prompt="x", max_tokens=2)
                assert waiting.status_code == 200 and engine.running_count == 1
    wait_for(lambda: engine.running_count == 0 and engine.waiting_count == 0)
    # Room again: the next request is served.
    answer = client(url, key=None).completions.create(model=ABEJA, prompt="x", max_tokens=2)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert engine.metrics.requests.get(outcome="rejected") == 2


def test_a_failed_generation_is_a_500_or_an_error_event(slow):
    url, engine, broken = slow
    broken.set()
    try:
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3})
        error = answer.json()["error"]
        assert answer.status_code == 500 and error["type"] == "server_error" and "simulated failure" in error["message"]
        with pytest.raises(openai.APIError, match="simulated failure"):
            list(client(url, key=None).completions.create(model=ABEJA, prompt="x", max_tokens=3, stream=True))
    finally:
        broken.clear()
    assert client(url, key=None).completions.create(model=ABEJA, prompt="x", max_tokens=2).choices
    assert httpx.get(f"{url}/health").status_code == 200 and engine.running_count == 0


# ---------------------------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "neoxja serve: error: --port must be between 0 and 65535, got 70000\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neoxja serve: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@pytest.mark.parametrize("kind, layer", [("int8", "Int8Linear"), ("nf4", "Linear4bit"), ("nf4+head", "Linear4bit")])
def test_serve_command_loads_quantized_models(monkeypatch, abeja_checkpoint, kind, layer):  # noqa: F811
    """The command's wiring, in-process: uvicorn's run is replaced by one request through the app."""
    seen = {}

    def run(server, sockets):
        app = server.config.app
        with TestClient(app) as http:
            seen["answer"] = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3},
                                       headers={"Authorization": f"Bearer {KEY}"})
        seen["layer"] = type(app.state.engine.model.model.layers[0].mlp.dense_h_to_4h).__name__
        seen["head"] = type(app.state.engine.model.embed_out).__name__
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("NEOXJA_API_KEY", KEY)
    assert main(["serve", "--model", str(abeja_checkpoint), "--quantize", kind, "--port", "0", "-q"]) == 0
    assert seen["answer"].status_code == 200, seen["answer"].text
    assert seen["answer"].json()["usage"]["completion_tokens"] <= 3
    assert seen["layer"] == layer
    assert seen["head"] == (layer if kind.endswith("+head") else "Linear")  # bitsandbytes' default: a float head


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--dtype", "--quantize", "--max-batch", "--max-queue", "--api-key",
                 "--served-model-name", "--max-body-bytes", "127.0.0.1", "/v1/chat/completions"):
        assert flag in text
