"""The CPU decode path (issue 6): the decode-attention kernel and the bf16 linear layers against PyTorch, bf16
decoding against the reference, and the quality promises on the trained demo model (bf16 greedy equals float32
greedy; int8 and nf4 barely move its perplexity)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import japanese_reference, neox_reference

import neoxja
from neoxja import kernels
from neoxja.errors import InputError
from neoxja.evaluation import perplexity
from neoxja.modeling import Linear, apply_rotary
from neoxja.pipelines import DEMO_MODEL_DIR
from rinna_fixtures import shared_data_dir



def _require_native() -> None:
    if not kernels.HAVE_NATIVE:
        pytest.fail("neoxja._kernels is not built: see test_quantization.py::test_native_kernels_are_built")


def _decode_case(batch: int, heads: int, position: int, dim: int, rot: int, dtype: torch.dtype):
    """The new token's qkv projection [B, 1, H*3*D], its cos/sin [B, 1, 1, R], and cache buffers holding `position`
    earlier keys/values, larger than that (strided along time, as the KV cache hands them out)."""
    gen = torch.Generator().manual_seed(position * dim + rot)
    qkv = torch.randn(batch, 1, heads * 3 * dim, generator=gen).to(dtype)
    angles = torch.rand(batch, 1, 1, rot // 2, generator=gen) * 6
    cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    keys, values = (torch.randn(batch, heads, position + 11, dim, generator=gen).to(dtype) for _ in range(2))
    return qkv, cos, sin, keys, values


def _separate_ops(qkv, cos, sin, keys, values, position, heads, scale, mask, rotate_dtype):
    """Rotary, cache write and attention as separate PyTorch ops, rotating in `rotate_dtype`."""
    batch, dim = qkv.shape[0], qkv.shape[2] // (3 * heads)
    q, k, v = qkv.view(batch, 1, heads, 3 * dim).transpose(1, 2).float().split(dim, dim=-1)
    q, k = (apply_rotary(t.to(rotate_dtype), cos.to(rotate_dtype), sin.to(rotate_dtype)).to(qkv.dtype).float()
            for t in (q, k))
    keys, values = keys.clone(), values.clone()
    keys[:, :, position:position + 1], values[:, :, position:position + 1] = k.to(keys.dtype), v.to(keys.dtype)
    k_all, v_all = keys[:, :, :position + 1].float(), values[:, :, :position + 1].float()
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=None if mask is None else mask.float(),
                                         scale=scale)
    return out.transpose(1, 2).reshape(batch, 1, heads * dim), keys, values


@pytest.mark.parametrize("dim, rot", [(80, 80), (88, 88), (16, 8), (8, 8)])  # ABEJA, rinna, partial rotary, short
@pytest.mark.parametrize("position", [0, 36])
def test_decode_attention_equals_the_separate_ops(dim: int, rot: int, position: int):
    _require_native()
    qkv, cos, sin, keys, values = _decode_case(3, 4, position, dim, rot, torch.float32)
    mask = torch.zeros(3, 1, 1, position + 1)
    mask[1, ..., : position // 2] = torch.finfo(torch.float32).min  # left padding of row 1
    for m in (None, mask):
        k_buf, v_buf = keys.clone(), values.clone()
        with torch.no_grad():
            got = kernels.decode_attention(qkv, cos, sin, k_buf, v_buf, position, 4, 0.25, m)
        expected, k_exp, v_exp = _separate_ops(qkv, cos, sin, keys, values, position, 4, 0.25, m, torch.float32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k_buf, k_exp, rtol=1e-6, atol=1e-6)  # the new key, rotated, and nothing else
        assert torch.equal(v_buf, v_exp)


def test_decode_attention_bf16_rounds_once():
    _require_native()
    qkv, cos, sin, keys, values = _decode_case(2, 32, 69, 80, 80, torch.bfloat16)
    mask = torch.zeros(2, 1, 1, 70, dtype=torch.bfloat16)
    mask[0, ..., :9] = torch.finfo(torch.bfloat16).min
    with torch.no_grad():
        got = kernels.decode_attention(qkv, cos, sin, keys.clone(), values.clone(), 69, 32, 80 ** -0.5, mask)
    # rotation in fp32 rounded to bf16 once, then attention in fp32: the result within one bf16 rounding
    exact, _, _ = _separate_ops(qkv, cos, sin, keys, values, 69, 32, 80 ** -0.5, mask, torch.float32)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, exact.bfloat16(), rtol=0, atol=0.01)


def test_decode_attention_only_without_gradients():
    qkv = torch.zeros(1, 1, 2 * 3 * 16)
    with torch.no_grad():
        assert kernels.fused_decode_ready(qkv, 2) == kernels.HAVE_NATIVE
    assert not kernels.fused_decode_ready(qkv, 2)  # autograd needs the PyTorch ops
    with torch.no_grad():
        assert not kernels.fused_decode_ready(torch.zeros(1, 2, 96), 2)  # prefill: more than one token


def test_decode_attention_refuses_caches_it_cannot_write():
    """Keys and values share one set of strides in the kernel, so they must share shape and dtype too: values with
    fewer sequences (same strides) would be written out of bounds, values in fp32 read as bf16."""
    _require_native()
    qkv = torch.randn(2, 1, 2 * 3 * 16).bfloat16()
    cos = sin = torch.ones(2, 1, 1, 16, dtype=torch.bfloat16)
    keys = torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        for values in (keys[:1].clone(), keys.float()):
            with pytest.raises(InputError, match="do not suit"):
                kernels.decode_attention(qkv, cos, sin, keys, values, 0, 2, 0.25)


def test_bf16_linear_runs_the_kernel_at_inference_and_autograd_in_training():
    torch.manual_seed(0)
    layer = Linear(256, 96, bias=True).to(torch.bfloat16)
    for rows in (1, 3, 20):  # decode (the GEMV kernel) and prefill (PyTorch's matmul)
        x = torch.randn(rows, 256).bfloat16()
        with torch.no_grad():
            got = layer(x)
        exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(got.float(), exact, rtol=1e-2, atol=1e-2)
    x = torch.randn(2, 256).bfloat16()
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape


def test_bf16_cached_decoding_matches_the_reference(tmp_path: Path):
    reference = japanese_reference(num_attention_heads=2, hidden_size=160)  # head_dim 80, as the 2.7B model
    reference.save_pretrained(tmp_path)
    reference = reference.to(torch.bfloat16)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits[:, -1]]
        for i in range(6, 12):  # one token at a time through the cache and the decode kernels
            out = model(ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    got = torch.stack(steps[:-1], dim=1).float()
    torch.testing.assert_close(got, expected[:, 5:11], rtol=0, atol=0.05 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# Quality on the trained demo model
PROMPTS = ["吾輩は猫である。", "人とAIが協調するためには、", "親譲りの無鉄砲で小供の時から損ばかりしている。",
           "私はその人を常に先生と呼んでいた。", "その日は朝から雨が降っていた。"]


def test_bf16_greedy_equals_float32_greedy_for_20_tokens():
    tokenizer = neoxja.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    models = [neoxja.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)]
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        fp32, bf16 = (m.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False) for m in models)
        assert torch.equal(fp32, bf16), (prompt, tokenizer.decode(fp32[0]), tokenizer.decode(bf16[0]))


@pytest.mark.slow
def test_quantization_barely_changes_demo_model_perplexity(tmp_path: Path):
    text = (shared_data_dir() / "corpus" / "test.txt").read_text(encoding="utf-8")[:12000]
    sample = tmp_path / "sample.txt"
    sample.write_text(text, encoding="utf-8")
    tokenizer = neoxja.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)

    def ppl(quantization_config: neoxja.BitsAndBytesConfig | None) -> float:
        model = neoxja.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32,
                                                            quantization_config=quantization_config)
        total, _ = perplexity(model, tokenizer, [str(sample)], n_ctx=256, stride=255)
        return total.token

    base = ppl(None)
    int8 = ppl(neoxja.BitsAndBytesConfig(load_in_8bit=True))
    nf4 = ppl(neoxja.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    nf4_head = ppl(neoxja.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[]))
    assert 20 < base < 1000  # a trained model: far below the unigram baseline (~970), far above 1
    assert abs(int8 / base - 1) < 0.01, (base, int8)
    assert abs(nf4 / base - 1) < 0.05, (base, nf4)
    assert nf4_head != nf4 and abs(nf4_head / base - 1) < 0.05, (base, nf4_head)  # the head in nf4 as well


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_equals_the_separate_ops(tmp_path: Path, monkeypatch, dtype: torch.dtype):
    """The model's decode step with kernels.decode_attention against its PyTorch path (rotary, KVCache.update,
    SDPA): partial rotary, a left-padded batch, a cache buffer larger than its contents."""
    _require_native()
    japanese_reference(rotary_pct=0.5, hidden_size=96, num_attention_heads=4).save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    monkeypatch.setattr(kernels, "decode_ready", lambda *args: False)  # the whole-layer kernel: tested below

    def decode(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(kernels, "fused_decode_ready", lambda qkv, heads: fused)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], use_cache=True)
            logits = []
            for i in range(5, 9):
                out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=positions[:, i:i + 1],
                            past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1].float())
        return torch.stack(logits, dim=1)

    fused, separate = decode(True), decode(False)
    tolerance = 1e-5 if dtype == torch.float32 else 0.03 * float(separate.abs().max())
    torch.testing.assert_close(fused, separate, rtol=0, atol=tolerance)


def _decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of decoding ids[:, prompt:] one token at a time after a prefill of ids[:, :prompt] (left padding)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt],
                    use_cache=True)
        logits = []
        for i in range(prompt, ids.shape[1]):
            out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=positions[:, i:i + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


QUANTIZATION = {
    "bf16": None,
    "int8": neoxja.BitsAndBytesConfig(load_in_8bit=True),
    "nf4": neoxja.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("fmt", sorted(QUANTIZATION))
@pytest.mark.parametrize("arch", ["abeja", "rinna"])
def test_decode_layers_equal_the_module_path(tmp_path: Path, monkeypatch, arch: str, fmt: str):
    """kernels.decode_layers (all layers of a decode step in one native call) against the same model's modules one
    by one: ABEJA's sequential residual with the last layer's separate dense bias, rinna's parallel residual with
    partial rotary and biases everywhere; a left-padded batch of 3; bf16, int8 and nf4 weights."""
    _require_native()
    if arch == "abeja":
        reference = japanese_reference(hidden_size=256, num_attention_heads=4, rotary_pct=0.5)
    else:
        reference = neox_reference(hidden_size=256, num_attention_heads=4, intermediate_size=1024, rotary_pct=0.25)
    reference.save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                        quantization_config=QUANTIZATION[fmt])
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    runs = _native_runs(monkeypatch)
    fused = _decode_logits(model, ids, mask, 5)
    assert runs == [model.config.num_hidden_layers] * 5  # every decode step: all layers in one call
    monkeypatch.setattr(kernels, "decode_ready", lambda *args: False)
    modules = _decode_logits(model, ids, mask, 5)
    # the layer norms and GELU round their own fp32 arithmetic: a few bf16 values may differ by one rounding
    torch.testing.assert_close(fused, modules, rtol=0, atol=0.02 * float(modules.abs().max()))
    assert torch.equal(fused.argmax(-1), modules.argmax(-1))


def _native_runs(monkeypatch) -> list[int]:
    """Records the number of layers of each native decode_layers call (its cache pointers: two per layer)."""
    runs: list[int] = []
    native = kernels._native.decode_layers

    def counted(*args):
        runs.append(len(args[6]) // 16)
        return native(*args)

    monkeypatch.setattr(kernels._native, "decode_layers", counted)
    return runs


def test_decode_layers_leave_unsuitable_layers_to_the_modules(monkeypatch):
    """Layers the kernel cannot read (4-bit weights in the flat layout, as the demo model's width 224 gets) decode
    through the modules, with the same result as without the kernel."""
    _require_native()
    model = neoxja.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.bfloat16,
                                                        quantization_config=QUANTIZATION["nf4"])
    assert model.gpt_neox_japanese.layers[0].mlp.dense_h_to_4h.gemv_spec() is None
    runs = _native_runs(monkeypatch)
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not runs


@pytest.mark.parametrize("hooked", ["mlp", "layer"])
def test_decode_layers_step_aside_for_hooks(tmp_path: Path, monkeypatch, hooked: str):
    """A forward hook on a layer or inside it (say, to record the MLP's output) must fire on every decode step, so
    that layer runs its modules; the layers before and after it still run natively."""
    _require_native()
    japanese_reference(hidden_size=64, num_hidden_layers=4).save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    seen = []
    layer = model.gpt_neox_japanese.layers[1]
    (layer.mlp if hooked == "mlp" else layer).register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    runs = _native_runs(monkeypatch)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert seen == [5, 1, 1, 1]  # the prompt, then one call per decoded token
    assert runs == [1, 2] * 3  # layer 0, then layers 2 and 3, at each decode step


def test_decode_layers_keep_each_hidden_state(tmp_path: Path, monkeypatch):
    """With output_hidden_states a decode step runs each layer in its own native call, so every layer's output is
    kept: the same states as the modules give."""
    _require_native()
    japanese_reference(hidden_size=64).save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))

    def states() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = model(ids[:, :5], use_cache=True)
            return model(ids[:, 5:], past_key_values=out.past_key_values, use_cache=True,
                         output_hidden_states=True).hidden_states

    runs = _native_runs(monkeypatch)
    native = states()
    assert runs == [1, 1, 1]
    monkeypatch.setattr(kernels, "decode_ready", lambda *args: False)
    modules = states()
    assert len(native) == len(modules) == 4
    for got, want in zip(native, modules):
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * float(want.abs().max()))


def test_decode_plans_follow_the_weights(tmp_path: Path, monkeypatch):
    """A layer's decode plan points at its weights: replacing a weight, a whole linear layer, or a dtype round trip
    must change what the native step computes exactly as it changes the modules' result."""
    _require_native()
    japanese_reference(hidden_size=64).save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        native = _decode_logits(model, ids, mask, 4)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "decode_ready", lambda *args: False)
            return native, _decode_logits(model, ids, mask, 4)

    runs = _native_runs(monkeypatch)
    before, _ = both()
    layers = model.gpt_neox_japanese.layers
    attention = layers[0].attention
    attention.dense.weight = torch.nn.Parameter(attention.dense.weight.detach() * 3, requires_grad=False)
    layers[1].mlp.dense_4h_to_h.weight.data = layers[1].mlp.dense_4h_to_h.weight.data.flip(0).contiguous()
    replacement = neoxja.modeling.Linear(64, 192, bias=False).to(torch.bfloat16)
    torch.nn.init.normal_(replacement.weight, std=0.2)
    attention.query_key_value = replacement
    model.float().to(torch.bfloat16)
    native, modules = both()
    assert runs == [3] * 8  # both times, 4 decode steps of all three layers in one call
    assert not torch.allclose(native, before)
    torch.testing.assert_close(native, modules, rtol=0, atol=0.02 * float(modules.abs().max()))


def test_generate_checks_decode_plans_once_per_call(tmp_path: Path, monkeypatch):
    """generate() makes the layers' decode plans at its first decode step and reuses them unchecked
    (KVCache.keep_plans): a streamer that swaps a weight in the middle of a call changes nothing in that call (the
    kept plans hold the old storage alive, so nothing reads freed memory) and the next call decodes with the new
    weight, exactly as a model given that weight from the start."""
    _require_native()
    japanese_reference(hidden_size=64).save_pretrained(tmp_path)
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    made = []
    make = neoxja.modeling.Layer.decode_plan
    monkeypatch.setattr(neoxja.modeling.Layer, "decode_plan", lambda layer: made.append(layer) or make(layer))
    runs = _native_runs(monkeypatch)
    before = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    layers = model.config.num_hidden_layers
    assert runs == [layers] * 7 and len(made) == layers  # 7 native steps, plans checked at the first only

    new_weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)

    class Swap:  # put(): the prompt, then each new token; the 3rd call comes after the first native step
        calls = 0

        def put(self, tokens: torch.Tensor) -> None:
            Swap.calls += 1
            if Swap.calls == 3:
                model.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h.weight.data = new_weight.clone()

        def end(self) -> None:
            pass

    during = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=Swap())
    assert Swap.calls == 9 and torch.equal(during, before)
    after = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    fresh = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fresh.gpt_neox_japanese.layers[0].mlp.dense_4h_to_h.weight.data = new_weight.clone()
    assert torch.equal(after, fresh.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False))
    assert not torch.equal(after, before)


def test_decode_layers_refuse_tensors_they_cannot_read():
    _require_native()
    layer = Linear(64, 192, bias=False).bfloat16()
    spec = layer.gemv_spec()
    square = Linear(64, 64, bias=False).bfloat16().gemv_spec()
    wide = Linear(64, 256, bias=False).bfloat16().gemv_spec()
    narrow = Linear(256, 64, bias=False).bfloat16().gemv_spec()
    norm = (torch.ones(64, dtype=torch.bfloat16), None, 1e-5)
    plan = kernels.layer_plan([spec, square, wide, narrow], (norm, norm), None, True, 4, 0.25)
    assert isinstance(plan, bytes)
    # layers the kernel cannot read get no plan (they run their modules)
    assert kernels.layer_plan([spec, square, wide, None], (norm, norm), None, True, 4, 0.25) is None
    assert kernels.layer_plan([spec, square, wide, narrow], (norm, (norm[0].float(), None, 1e-5)), None, True, 4,
                              0.25) is None  # norm parameters in two dtypes
    assert kernels.layer_plan([spec, square, wide, narrow], (norm, (norm[0][:32], None, 1e-5)), None, True, 4,
                              0.25) is None  # a norm of the wrong width
    assert kernels.layer_plan([spec] * 4, (norm, norm), None, True, 4, 0.25) is None  # qkv's shape where dense's is
    x = torch.randn(1, 1, 64).bfloat16()
    keys = torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16)
    cos = sin = torch.ones(1, 1, 1, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(InputError, match="do not suit"):  # fp32 activations
            kernels.decode_layers(x.float(), [plan], [(keys, keys)], 0, cos, sin, 4)
        with pytest.raises(InputError, match="do not suit"):  # a cache with no room at position 8
            kernels.decode_layers(x, [plan], [(keys, keys)], 8, cos, sin, 4)
        with pytest.raises(InputError, match="do not suit"):  # values in another dtype than the keys
            kernels.decode_layers(x, [plan], [(keys, keys.float())], 0, cos, sin, 4)
        with pytest.raises(InputError, match="do not suit"):  # two plans, one cache
            kernels.decode_layers(x, [plan, plan], [(keys, keys)], 0, cos, sin, 4)
        with pytest.raises(ValueError, match="another width"):  # a plan made for 64 wide, 4 heads, asked with 8
            kernels.decode_layers(x, [plan], [(keys.view(1, 8, 8, 8), keys.view(1, 8, 8, 8))], 0, cos[..., :8],
                                  sin[..., :8], 8)
