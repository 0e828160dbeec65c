"""Parity of the model with the reference: logits, loss, hidden states, attentions, padding, cache, RoPE types."""
from __future__ import annotations

import pytest
import torch
from conftest import japanese_reference, neox_reference

import neoxja
from neoxja.errors import InputError

ATOL = 1e-4


def load_same(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    return neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)


def families():
    return [
        ("abeja", lambda **kw: japanese_reference(**kw)),
        ("abeja-partial-rotary", lambda **kw: japanese_reference(rotary_pct=0.5, **kw)),
        ("rinna-sequential", lambda **kw: neox_reference(**kw)),
        ("rinna-parallel", lambda **kw: neox_reference(use_parallel_residual=True, **kw)),
        ("neox-partial-rotary", lambda **kw: neox_reference(rotary_pct=0.25, **kw)),
    ]


@pytest.mark.parametrize("name,make", families(), ids=[f[0] for f in families()])
def test_forward_matches_reference(name, make, tmp_path):
    ref = make()
    ours = load_same(ref, tmp_path)
    assert type(ours).__name__ == type(ref).__name__
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        a = ref(ids, labels=labels, output_hidden_states=True, output_attentions=True)
        b = ours(ids, labels=labels, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(a.logits, b.logits, atol=ATOL, rtol=0)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    assert len(a.hidden_states) == len(b.hidden_states) == ref.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.allclose(x, y, atol=ATOL, rtol=0)
    assert len(b.attentions) == ref.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=1e-5, rtol=0)
    # the fast attention path (no attention maps requested) gives the same numbers
    with torch.no_grad():
        fast = ours(ids).logits
    assert torch.allclose(fast, b.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,make", families()[::2], ids=[f[0] for f in families()[::2]])
def test_left_padded_batch_matches_on_real_positions(name, make, tmp_path):
    ref = make()
    ours = load_same(ref, tmp_path)
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=positions).logits
        b = ours(ids, attention_mask=mask, position_ids=positions).logits
        # and equal to each row run alone without padding
        alone = ours(ids[0:1, 4:]).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=ATOL, rtol=0)
    assert torch.allclose(b[0, 4:], alone[0], atol=ATOL, rtol=0)
    # without position_ids both ignore the padding in positions (the reference's forward does too)
    with torch.no_grad():
        a2 = ref(ids, attention_mask=mask).logits
        b2 = ours(ids, attention_mask=mask).logits
    assert torch.allclose(a2[real], b2[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,make", families()[::2], ids=[f[0] for f in families()[::2]])
def test_cached_decoding_equals_full_forward(name, make, tmp_path):
    ours = load_same(make(), tmp_path)
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        chunk = ours(ids[:, 6:9], past_key_values=cache)  # a multi-token step through the cache
        steps.append(chunk.logits)
        for t in range(9, 15):
            step = ours(ids[:, t:t + 1], past_key_values=cache)
            steps.append(step.logits)
    assert cache.get_seq_length() == 15
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_cached_decoding_with_left_padding(tmp_path):
    ref = japanese_reference()
    ours = load_same(ref, tmp_path)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7])
        last = ours(ids[:, 7:], attention_mask=mask, position_ids=positions[:, 7:],
                    past_key_values=out.past_key_values).logits
    assert torch.allclose(last, full[:, 7:], atol=ATOL, rtol=0)


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(8)],
                 "long_factor": [2.0 + i / 5 for i in range(8)], "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("family", ["abeja", "rinna"])
@pytest.mark.parametrize("kind", list(ROPE_CASES))
def test_rope_scaling_types_match_reference(kind, family, tmp_path):
    rope = dict(ROPE_CASES[kind], rope_theta=10000.0)
    if family == "abeja":
        ref = japanese_reference(max_position_embeddings=32, rope_parameters=rope)
    else:
        ref = neox_reference(max_position_embeddings=32, rope_parameters=rope)
    ours = load_same(ref, tmp_path)
    assert ours.config.rope_parameters["rope_type"] == kind
    gen = torch.Generator().manual_seed(5)
    for length in (12, 40):  # within, then beyond the (original) context: exercises dynamic/longrope switching
        ids = torch.randint(0, 128, (1, length), generator=gen)
        with torch.no_grad():
            a, b = ref(ids).logits, ours(ids).logits
        assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{kind} length {length}"


def test_outputs_tuple_and_index_access(japanese_checkpoint):
    model = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(japanese_checkpoint)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model(ids)
        as_tuple = model(ids, return_dict=False)
        no_cache = model(ids, use_cache=False, return_dict=False)
    assert out[0] is out.logits and out["logits"] is out.logits
    assert out.loss is None and "loss" not in out
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], out.logits)
    assert len(no_cache) == 1
    base = neoxja.GPTNeoXJapaneseModel.from_pretrained(japanese_checkpoint)
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
    assert hidden.shape == (1, 3, 64)


def test_dropout_only_in_training(japanese_checkpoint):
    model = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        torch.manual_seed(0)
        first = model(ids).logits
        second = model(ids).logits
    assert not torch.equal(first, second)  # attention_dropout 0.1 is active


def test_head_mask(japanese_checkpoint):
    model = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, head_mask=torch.ones(4)).logits
        masked = model(ids, head_mask=torch.tensor([1.0, 0.0, 1.0, 1.0])).logits
    assert torch.allclose(plain, ones, atol=ATOL)
    assert not torch.allclose(plain, masked, atol=1e-3)
    with pytest.raises(InputError, match="head_mask"):
        model(ids, head_mask=torch.ones(2, 4))


def test_inputs_embeds_equal_input_ids(japanese_checkpoint):
    model = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(a, b)


def test_bad_inputs_give_clear_errors(japanese_checkpoint):
    model = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    with pytest.raises(InputError, match="token id 128 is outside the vocabulary"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(InputError, match="context window"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(InputError, match="exactly one of"):
        model()
    with pytest.raises(InputError, match="attention_mask must have shape"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(InputError, match="unexpected argument"):
        model(torch.tensor([[1]]), bogus=1)
    with pytest.raises(InputError, match="labels must have shape"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]]))


def test_random_init_matches_reference_statistics():
    config = neoxja.GPTNeoXJapaneseConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    model = neoxja.GPTNeoXJapaneseForCausalLM(config)
    assert model.heads_tied
    last = model.gpt_neox_japanese.layers[-1].attention
    assert last.dense_bias is not None and torch.count_nonzero(last.dense_bias) == 0
    assert model.gpt_neox_japanese.layers[0].attention.dense_bias is None
    assert model.gpt_neox_japanese.layers[0].attention.query_key_value.bias is None
    assert abs(model.embed_out.weight.std().item() - 0.02) < 0.003
    neox = neoxja.GPTNeoXForCausalLM(neoxja.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    assert not neox.heads_tied
    assert neox.gpt_neox.layers[0].mlp.dense_h_to_4h.bias is not None
