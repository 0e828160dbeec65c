"""neoxja.pipelines: token-for-token parity with transformers' text-generation pipeline (its defaults, seeded
sampling, batching with left padding, output shapes), devices, chats, the default model, and clear errors."""
from __future__ import annotations

import importlib

import pytest
import torch

import neoxja
from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)
from neoxja import pipeline as neoxja_pipeline
from neoxja.chat import build_prompt
from neoxja.errors import CheckpointError, ConfigError, InputError
from neoxja.pipelines import generation_kwargs

PROMPT = "人とAIが協調するためには、"
LONG_PROMPT = PROMPT * 20  # 200 tokens: more than the tiny checkpoints' 128-token context


@pytest.fixture(scope="module")
def pipes(abeja_checkpoint):  # noqa: F811
    import transformers

    return neoxja_pipeline("text-generation", model=str(abeja_checkpoint)), \
        transformers.pipeline("text-generation", model=str(abeja_checkpoint))


@pytest.mark.parametrize("inputs, kwargs", [
    (PROMPT, {"max_new_tokens": 12}),  # the pipeline's sampling defaults (temperature 0.7, top_k 50)
    (PROMPT + "\n", {"max_new_tokens": 6, "num_return_sequences": 2, "return_full_text": False}),
    ([PROMPT, "人", ""], {"max_new_tokens": 5, "top_p": 0.8, "repetition_penalty": 1.3}),  # "" starts from bos
    (["人とAIが", PROMPT], {"max_new_tokens": 4, "batch_size": 2, "do_sample": False}),  # left padding
    (["人とAIが", PROMPT], {"max_new_tokens": 3, "batch_size": 2, "return_tensors": True}),
    (PROMPT, {"max_length": 16, "do_sample": False}),  # max_length: no default max_new_tokens
])
def test_matches_transformers(pipes, inputs, kwargs):
    ours, reference = pipes
    torch.manual_seed(0)
    expected = reference(inputs, **kwargs)
    torch.manual_seed(0)
    assert ours(inputs, **kwargs) == expected


def test_defaults(pipes):
    ours, _ = pipes
    model, tokenizer = ours.model, ours.tokenizer
    assert tokenizer.padding_side == "left"
    assert generation_kwargs(model, tokenizer, {}) == {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7,
                                                       "pad_token_id": 31999}
    assert generation_kwargs(model, tokenizer, {"max_length": 50, "do_sample": False}) == {
        "max_length": 50, "do_sample": False, "pad_token_id": 31999}
    # What the model's generation config sets is not overridden by the pipeline's defaults.
    original = model.generation_config
    model.generation_config = original.updated(temperature=1.3, max_new_tokens=9)
    try:
        assert generation_kwargs(model, tokenizer, {}) == {"do_sample": True, "pad_token_id": 31999}
    finally:
        model.generation_config = original


def test_call_defaults_from_construction(abeja_checkpoint):  # noqa: F811
    pipe = neoxja.pipeline("text-generation", model=abeja_checkpoint, max_new_tokens=3, return_full_text=False,
                           do_sample=False)
    ids = pipe.tokenizer(PROMPT)["input_ids"]
    tokens = pipe(PROMPT, return_tensors=True)[0]["generated_token_ids"]  # the call's choice wins
    assert len(tokens) == len(ids) + 3
    assert not pipe(PROMPT)[0]["generated_text"].startswith(PROMPT)
    assert len(pipe(PROMPT, max_new_tokens=1, return_tensors=True)[0]["generated_token_ids"]) == len(ids) + 1


def test_model_instance_dtype_and_device(abeja_checkpoint):  # noqa: F811
    pipe = neoxja.pipeline("text-generation", model=str(abeja_checkpoint), torch_dtype=torch.bfloat16,
                           device="cpu")
    assert pipe.model.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    again = neoxja.pipeline(model=pipe.model)  # task inferred; the tokenizer comes from the model's checkpoint
    assert again.tokenizer.vocab_size == pipe.tokenizer.vocab_size
    assert again(PROMPT, max_new_tokens=2)[0]["generated_text"].startswith(PROMPT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback where there is no CUDA")
@pytest.mark.parametrize("device", [0, "cuda", "cuda:0"])
def test_cuda_device_falls_back_to_cpu(abeja_checkpoint, device):  # noqa: F811
    with pytest.warns(UserWarning, match="no CUDA GPU"):
        pipe = neoxja.pipeline("text-generation", model=abeja_checkpoint, device=device)
    assert pipe.device == torch.device("cpu")


def test_chat_input(rinna_model_checkpoint):  # noqa: F811
    pipe = neoxja.pipeline("text-generation", model=rinna_model_checkpoint, max_new_tokens=4)
    messages = [{"role": "user", "content": "日本の首都は？"}]
    [result] = pipe(messages)
    assert result["generated_text"][:-1] == messages and result["generated_text"][-1]["role"] == "assistant"
    prompt_ids = pipe.tokenizer(build_prompt(messages), add_special_tokens=False)["input_ids"]
    [tokens] = pipe(messages, return_tensors=True)
    assert tokens["generated_token_ids"][:len(prompt_ids)] == prompt_ids
    [[first], [second]] = pipe([messages, messages + [{"role": "assistant", "content": "東京"}]])
    assert second["generated_text"][-1]["content"].startswith("東京")  # a final assistant turn is continued


def test_pipeline_name_stays_the_function_after_importing_the_module(abeja_checkpoint):  # noqa: F811
    module = importlib.import_module("neoxja.pipelines")

    assert neoxja.pipeline is module.pipeline is neoxja_pipeline
    assert neoxja.pipeline("text-generation", model=abeja_checkpoint).task == "text-generation"


def test_default_model():
    [result] = neoxja.pipeline("text-generation")("こんにちは", max_new_tokens=3)
    assert result["generated_text"].startswith("こんにちは")


def test_default_model_missing(monkeypatch, tmp_path):
    module = importlib.import_module("neoxja.pipelines")
    monkeypatch.setattr(module, "DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no default model installed.*--model/model="):
        module.default_model_path()


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p(PROMPT, max_new_tokens=0), InputError, "max_new_tokens=0"),
    (lambda p: p(PROMPT, temperature=0.0), InputError, "temperature"),
    (lambda p: p(PROMPT, temperature=-1.0, do_sample=True), InputError, "temperature"),
    (lambda p: p(LONG_PROMPT, max_new_tokens=2), InputError, "context window"),
    (lambda p: p(PROMPT, max_new_tokenz=2), InputError, "unknown generation argument.*max_new_tokenz"),
    (lambda p: p(42), InputError, "prompt string"),
    (lambda p: p([]), InputError, "prompt string"),
    (lambda p: p(PROMPT, return_full_text=True, return_tensors=True), InputError, "mutually exclusive"),
    (lambda p: p(PROMPT, batch_size=0), InputError, "batch_size"),
])
def test_bad_calls(pipes, call, error, message):
    with pytest.raises(error, match=message):
        call(pipes[0])


def test_greedy_with_zero_temperature_is_fine(pipes):
    assert pipes[0](PROMPT, temperature=0.0, do_sample=False, max_new_tokens=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "summarization"}, "unknown task 'summarization'"),
    ({"task": None, "model": None}, "needs a task"),
    ({"device": "tpu9"}, "unknown device 'tpu9'"),
    ({"device": "cpu", "device_map": "cpu"}, "either device or device_map"),
    ({"dtype": "float16", "torch_dtype": "float16"}, "either dtype or torch_dtype"),
    ({"dtype": "int3"}, "dtype 'int3'"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
])
def test_bad_construction(abeja_checkpoint, kwargs, message):  # noqa: F811
    with pytest.raises((ConfigError, InputError), match=message):
        neoxja.pipeline(**{"task": "text-generation", "model": abeja_checkpoint, **kwargs})


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        neoxja.pipeline("text-generation", model=str(tmp_path / "nothing-here"))
