"""The serving engine without HTTP: KVCache joining and cropping, continuous batching against model.generate (greedy
and seeded sampling, requests joining and leaving mid-generation), stop strings, cancellation, the bounded queue,
a failing step, and the small pieces the server builds on (penalties, rinna reply text, metrics text)."""
from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch

import neoxja
from neoxja.chat import parse_reply
from neoxja.errors import InputError
from neoxja.modeling import GPTNeoXConfig, GPTNeoXForCausalLM, KVCache
from neoxja.pipelines import DEMO_MODEL_DIR
from neoxja.server.engine import Engine, QueueFull, SamplingParams, frequency_presence_penalty
from neoxja.server.metrics import ServerMetrics
from neoxja.server.protocol import ReplyText

PROMPTS = ["人とAIが協調するためには、", "吾輩は猫である。名前はまだ無い。", "東京", "明治の文学について書く。それは、"]


@pytest.fixture(scope="module")
def loaded():
    """The bundled demo model: trained, so its next token depends on the whole context (a random model's barely
    does), which is what comparisons with generate need; float32, so batching cannot flip a near tie."""
    model = neoxja.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    return model, neoxja.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference(model, tokenizer, prompt: str, **kwargs) -> str:
    """model.generate's continuation of `prompt`, decoded as the engine decodes. The demo model's generation
    config asks for repetition_penalty 1.1; SamplingParams' default is none."""
    kwargs.setdefault("repetition_penalty", 1.0)
    ids = encode(tokenizer, prompt)
    out = model.generate(torch.tensor([ids]), **kwargs)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def collect(events: queue.Queue, count: int = 1, timeout: float = 30) -> tuple[list[str], list[str], list]:
    """Texts and finish reasons of a request's `count` sequences, and every event, in order."""
    texts, reasons, seen = [""] * count, [""] * count, []
    while sum(map(bool, reasons)) < count:
        event = events.get(timeout=timeout)
        seen.append(event)
        assert event.error is None, event.error
        texts[event.index] += event.text
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    return texts, reasons, seen


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------------------------
def test_stacked_caches_give_each_row_its_own_logits():
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    prompts = [torch.randint(0, 64, (1, n)) for n in (5, 9, 3)]
    nexts = [torch.tensor([[7]]), torch.tensor([[11]]), torch.tensor([[13]])]
    with torch.no_grad():
        alone = []
        caches = []
        for prompt, nxt in zip(prompts, nexts):
            cache = KVCache(2)
            model(prompt, past_key_values=cache, use_cache=True)
            caches.append(cache)
            own = KVCache.stack([cache])  # a copy: the batch below must not see this step's update
            alone.append(model(nxt, past_key_values=own, use_cache=True).logits[0, -1])
        batch = KVCache.stack(caches)
        assert batch.get_seq_length() == 9 and batch[0][0].shape[0] == 3
        assert torch.equal(batch[1][0][0, :, :4], torch.zeros_like(batch[1][0][0, :, :4]))  # left padding
        lengths = torch.tensor([5, 9, 3])
        mask = (torch.arange(10)[None] >= (9 - lengths)[:, None]).long()
        logits = model(torch.cat(nexts), attention_mask=mask, position_ids=lengths[:, None], past_key_values=batch,
                       use_cache=True).logits[:, -1]
        for row, expected in enumerate(alone):
            torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)
        # The longest row leaves: 4 columns are now padding in every row and can go.
        batch.select_batch(torch.tensor([0, 2]))
        batch.crop_left(4)
        assert batch.get_seq_length() == 6
        lengths = torch.tensor([6, 4])
        mask = (torch.arange(7)[None] >= (6 - lengths)[:, None]).long()
        step = model(torch.tensor([[1], [2]]), attention_mask=mask, position_ids=lengths[:, None],
                     past_key_values=batch, use_cache=True).logits[:, -1]
        for row, (prompt, nxt) in enumerate([(prompts[0], nexts[0]), (prompts[2], nexts[2])]):
            ids = torch.cat([prompt, nxt, torch.tensor([[row + 1]])], dim=1)
            torch.testing.assert_close(step[row], model(ids).logits[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError):
        batch.crop_left(8)  # holds 7


def test_greedy_requests_joining_and_leaving_equal_generate(loaded):
    model, tokenizer = loaded
    lengths = [24, 9, 31, 16]  # rows finish at different steps, so the batch shrinks and is cropped mid-run
    expected = [reference(model, tokenizer, p, max_new_tokens=n, do_sample=False) for p, n in zip(PROMPTS, lengths)]
    with Engine(model, tokenizer, max_batch=3) as engine:
        streams = []
        for prompt, n in zip(PROMPTS, lengths):
            streams.append(queue.Queue())
            engine.submit([encode(tokenizer, prompt)], SamplingParams(max_tokens=n, temperature=0), streams[-1].put)
            time.sleep(0.01)  # later requests arrive while earlier ones decode
        for events, text, n in zip(streams, expected, lengths):
            [got], [reason], seen = collect(events)
            assert got == text
            assert seen[-1].tokens <= n and reason in ("stop", "length")
        wait_for(lambda: engine.running_count == 0)
    metrics = engine.metrics
    assert metrics.requests.get(outcome="completed") == 4
    # Batching happened: fewer decode steps than tokens decoded.
    assert metrics.decode_steps.get() < metrics.generation_tokens.get() - 4


def test_seeded_sampling_and_penalties_match_generate(loaded):
    model, tokenizer = loaded
    prompt = PROMPTS[0]
    ids = encode(tokenizer, prompt)
    sampled = SamplingParams(max_tokens=20, temperature=0.9, top_k=30, top_p=0.9, seed=1234)
    penalised = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3)
    with Engine(model, tokenizer, max_batch=4) as engine:
        runs = []
        for params, n in ((sampled, 3), (sampled, 3), (penalised, 1)):
            events: queue.Queue = queue.Queue()
            engine.submit([ids], params, events.put, n=n)
            runs.append(collect(events, n)[0])
    assert runs[0] == runs[1]  # reproducible, though the two requests ran in different batches
    assert len(set(runs[0])) > 1  # each choice samples its own stream
    assert runs[0][0] == reference(model, tokenizer, prompt, max_new_tokens=20, do_sample=True, temperature=0.9,
                                   top_k=30, top_p=0.9, seed=1234)
    assert runs[0][1] == reference(model, tokenizer, prompt, max_new_tokens=20, do_sample=True, temperature=0.9,
                                   top_k=30, top_p=0.9, seed=1235)
    assert runs[2][0] == reference(model, tokenizer, prompt, max_new_tokens=20, do_sample=False,
                                   repetition_penalty=1.3)


def test_stop_strings_cut_the_text_and_are_never_streamed(loaded):
    model, tokenizer = loaded
    ids = encode(tokenizer, PROMPTS[1])
    with Engine(model, tokenizer) as engine:
        events: queue.Queue = queue.Queue()
        engine.submit([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), events.put)
        [full], _, _ = collect(events)
        assert len(full) > 12
        stops = (full[8:11], full[5:7] + "\uffff")  # the second never occurs, though its start does
        events = queue.Queue()
        engine.submit([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stops), events.put)
        [text], [reason], seen = collect(events)
    assert text == full[:full.index(stops[0])] and reason == "stop"
    assert "".join(e.text for e in seen) == text


def test_cancelled_request_leaves_the_batch(loaded):
    model, tokenizer = loaded
    hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        with Engine(model, tokenizer) as engine:
            events: queue.Queue = queue.Queue()
            ticket = engine.submit([encode(tokenizer, PROMPTS[0])], SamplingParams(max_tokens=100, ignore_eos=True),
                                   events.put)
            events.get(timeout=30)
            ticket.cancel()
            wait_for(lambda: engine.metrics.requests.get(outcome="cancelled") == 1)
            assert engine.running_count == 0
            assert engine.metrics.generation_tokens.get() < 100
    finally:
        hook.remove()


def test_bounded_queue(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2)
    ids = encode(tokenizer, PROMPTS[2])
    params = SamplingParams(max_tokens=3)
    streams = [queue.Queue() for _ in range(2)]
    for events in streams:  # the engine is not started yet, so both wait
        engine.submit([ids], params, events.put)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([ids], params, lambda event: None)
    assert engine.metrics.requests.get(outcome="rejected") == 1
    with pytest.raises(InputError, match="more than this server queues"):
        engine.submit([ids], params, lambda event: None, n=3)
    with pytest.raises(InputError, match="context window"):
        engine.submit([ids], SamplingParams(max_tokens=engine.context), lambda event: None)
    with engine:
        for events in streams:
            assert collect(events)[1][0] in ("stop", "length")


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(loaded):
    model, tokenizer = loaded
    broken = threading.Event()

    def fail(*_):
        if broken.is_set():
            raise RuntimeError("simulated failure")

    hook = model.register_forward_pre_hook(fail)
    try:
        with Engine(model, tokenizer) as engine:
            events: queue.Queue = queue.Queue()
            broken.set()
            engine.submit([encode(tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5), events.put)
            event = events.get(timeout=30)
            assert event.error and "simulated failure" in event.error
            broken.clear()
            events = queue.Queue()
            engine.submit([encode(tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5), events.put)
            assert collect(events)[1][0] in ("stop", "length")
            assert engine.alive
        assert engine.metrics.requests.get(outcome="failed") == 1
    finally:
        hook.remove()


def test_stop_ends_pending_requests(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer)
    events: queue.Queue = queue.Queue()
    engine.submit([encode(tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5), events.put)
    engine.stop()
    assert "shutting down" in events.get(timeout=5).error


# ---------------------------------------------------------------------------------------------------------------
def test_frequency_and_presence_penalties():
    scores = torch.zeros(1, 5)
    out = frequency_presence_penalty(scores, [1, 1, 3], frequency=0.5, presence=0.25)
    assert out.tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0]]
    assert frequency_presence_penalty(scores, [], 1.0, 1.0) is scores


def test_reply_text_streams_what_parse_reply_returns():
    raw = "  こんにちは<NL>元気です。<NL><NL>  "
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(raw)), 4))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
        reply = ReplyText()
        shown = "".join(reply.add(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces))
        assert shown == parse_reply(raw) == "こんにちは\n元気です。"


def test_metrics_text_format():
    metrics = ServerMetrics()
    metrics.requests.inc(outcome="completed")
    metrics.requests.inc(2, outcome='odd "label"\n')
    metrics.latency.observe(0.02)
    metrics.latency.observe(1e9)
    metrics.gauge("neoxja_test_gauge", "a test gauge", lambda: 3)
    text = metrics.render()
    assert '# TYPE neoxja_requests_total counter\nneoxja_requests_total{outcome="completed"} 1\n' in text
    assert 'neoxja_requests_total{outcome="odd \\"label\\"\\n"} 2' in text
    assert 'neoxja_request_duration_seconds_bucket{le="0.01"} 0\n' in text
    assert 'neoxja_request_duration_seconds_bucket{le="0.025"} 1\n' in text
    assert 'neoxja_request_duration_seconds_bucket{le="+Inf"} 2\n' in text
    assert "neoxja_request_duration_seconds_count 2\n" in text
    assert "# TYPE neoxja_test_gauge gauge\nneoxja_test_gauge 3\n" in text
