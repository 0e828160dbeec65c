"""generate(): parity with the reference (greedy and seeded sampling), each argument's effect, batches, streaming."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import japanese_reference, neox_reference

import neoxja
from neoxja.errors import InputError
from neoxja.generation import GenerationConfig, TextIteratorStreamer, stream_generate


@pytest.fixture(scope="module", params=["abeja", "rinna"])
def pair(request, tmp_path_factory):
    ref = japanese_reference() if request.param == "abeja" else neox_reference()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, neoxja.AutoModelForCausalLM.from_pretrained(path)


PROMPT = torch.tensor([[11, 42, 7, 99, 23, 5, 64]])


def test_greedy_equals_reference(pair):
    ref, ours = pair
    for kwargs in ({"max_new_tokens": 40}, {"max_length": 30}, {}):
        expected = ref.generate(PROMPT, do_sample=False, **kwargs)
        assert torch.equal(ours.generate(PROMPT, **kwargs), expected), kwargs
    assert ours.generate(PROMPT).shape[1] == PROMPT.shape[1] + 20  # the reference's default: 20 new tokens


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
    dict(typical_p=0.8, no_repeat_ngram_size=2, min_new_tokens=10),
    dict(temperature=1.3, top_k=0, num_return_sequences=3),
])
def test_seeded_sampling_equals_reference(pair, kwargs):
    ref, ours = pair
    torch.manual_seed(7)
    expected = ref.generate(PROMPT, do_sample=True, max_new_tokens=25, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(ours.generate(PROMPT, do_sample=True, max_new_tokens=25, **kwargs), expected)


def test_left_padded_batch_equals_each_prompt_alone(pair):
    ref, ours = pair
    short, long = torch.tensor([[9, 8, 7, 6]]), torch.tensor([[5, 17, 33, 12, 90, 61, 70, 4]])
    batch = torch.zeros(2, 8, dtype=torch.long)
    batch[0, 4:], batch[1] = short, long
    mask = torch.zeros_like(batch)
    mask[0, 4:], mask[1] = 1, 1
    out = ours.generate(batch, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(out[0, 4:], ours.generate(short, max_new_tokens=12)[0])
    assert torch.equal(out[1], ours.generate(long, max_new_tokens=12)[0])
    assert torch.equal(out, ref.generate(batch, attention_mask=mask, max_new_tokens=12, pad_token_id=0))


def test_argument_effects(pair):
    _, ours = pair
    greedy = ours.generate(PROMPT, max_new_tokens=15)
    first = int(greedy[0, PROMPT.shape[1]])
    # top_k=1 sampling is greedy; a vanishing temperature too
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=15, do_sample=True, top_k=1), greedy)
    assert torch.equal(ours.generate(PROMPT, max_new_tokens=15, do_sample=True, temperature=1e-4, top_k=0), greedy)
    # eos: generation stops at it, and an eos list works; finished rows are padded
    stopped = ours.generate(PROMPT, max_new_tokens=15, eos_token_id=first)
    assert stopped.shape[1] == PROMPT.shape[1] + 1
    stopped = ours.generate(PROMPT, max_new_tokens=15, eos_token_id=[126, first])
    assert stopped.shape[1] == PROMPT.shape[1] + 1
    # min_new_tokens blocks eos until enough tokens exist
    held = ours.generate(PROMPT, max_new_tokens=15, min_new_tokens=5, eos_token_id=first)
    assert held.shape[1] >= PROMPT.shape[1] + 5 and int(held[0, PROMPT.shape[1]]) != first
    # repetition penalty changes what greedy picks once tokens repeat; no_repeat_ngram forbids repeats
    penalised = ours.generate(PROMPT, max_new_tokens=30, repetition_penalty=5.0)
    assert not torch.equal(penalised, ours.generate(PROMPT, max_new_tokens=30))
    banned = ours.generate(PROMPT, max_new_tokens=30, no_repeat_ngram_size=1)[0].tolist()
    assert len(banned) == len(set(banned))
    # seeds make sampling reproducible
    a = ours.generate(PROMPT, do_sample=True, max_new_tokens=10, seed=3)
    b = ours.generate(PROMPT, do_sample=True, max_new_tokens=10, seed=3)
    assert torch.equal(a, b)
    # no prompt: start from bos
    assert ours.generate(max_new_tokens=3)[0, 0].item() == ours.config.bos_token_id


def test_stop_strings_and_streaming(tmp_path):
    tokenizer = neoxja.GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
    ref = japanese_reference(vocab_size=32000, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                             bos_token_id=31999, eos_token_id=31999)
    ref.save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokenizer("吾輩は猫である。", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=True, seed=1)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    stop = text[5:7]
    cut = model.generate(ids, max_new_tokens=40, do_sample=True, seed=1, stop_strings=stop, tokenizer=tokenizer)
    cut_text = tokenizer.decode(cut[0, ids.shape[1]:])
    assert stop in cut_text and text.startswith(cut_text.rstrip()) and len(cut_text) < len(text)
    with pytest.raises(InputError, match="tokenizer"):
        model.generate(ids, stop_strings="x")
    pieces = list(stream_generate(model, tokenizer, ids, max_new_tokens=40, do_sample=True, seed=1))
    assert "".join(pieces) == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)
    streamer = TextIteratorStreamer(tokenizer)
    model.generate(ids, max_new_tokens=10, streamer=streamer)
    assert "".join(streamer) == tokenizer.decode(model.generate(ids, max_new_tokens=10)[0])


def test_generation_config_file_gives_defaults(tmp_path):
    ref = japanese_reference()
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4, "eos_token_id": 2,
                                                                 "bos_token_id": 1}))
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.generation_config.max_new_tokens == 4
    assert model.generate(PROMPT).shape[1] == PROMPT.shape[1] + 4
    assert model.generate(PROMPT, max_new_tokens=6).shape[1] == PROMPT.shape[1] + 6
    model.save_pretrained(tmp_path / "again")
    assert GenerationConfig.from_pretrained(tmp_path / "again").max_new_tokens == 4


def test_bad_generation_input(pair):
    _, ours = pair
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_beams=4), "beam search"),
        (dict(num_return_sequences=2), "do_sample"),
        (dict(max_length=3), "max_length"),
        (dict(frobnicate=True), "unknown generation argument"),
    ]:
        with pytest.raises(InputError, match=match):
            ours.generate(PROMPT, **kwargs)
    with pytest.raises(InputError, match="empty"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="context window"):
        ours.generate(torch.ones(1, ours.config.max_position_embeddings, dtype=torch.long))
    with pytest.warns(UserWarning, match="context window"):
        out = ours.generate(torch.ones(1, ours.config.max_position_embeddings - 3, dtype=torch.long),
                            max_new_tokens=10)
    assert out.shape[1] == ours.config.max_position_embeddings
