"""Weight-only quantization: the bitsandbytes number formats (bit-exact), the quantized linear layers against their
dequantized float computation (native kernels and PyTorch fallback), checkpoints round trips, and the config.

Golden values come from the rules of reference-spec §7 and from bitsandbytes 0.50.2 (CPU backend), recorded here
so that the tests need no bitsandbytes; where bitsandbytes is installed, test_against_bitsandbytes compares live."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from neoxja import kernels
from neoxja.errors import CheckpointError, ConfigError, InputError
from neoxja.quantization import (
    FP4_PIVOTS, BitsAndBytesConfig, Int8Linear, Linear4bit, code_book, default_skip_modules, double_dequantize,
    double_quantize, dequantize_4bit, dynamic_map, prepare_quantized_model, quantize_4bit, quantize_int8,
    quantize_loaded_model, quantize_model, quantized_state_keys,
)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def golden_weight() -> torch.Tensor:
    """[64, 256] fp32 from integer arithmetic (exact on every platform): 256 blocks of 64, one nested block,
    an outlier per block and some smaller blocks."""
    i = torch.arange(64 * 256, dtype=torch.int64)
    v = ((i * 2654435761) % 2001 - 1000).to(torch.float32) / 997.0
    return (v * torch.where(i % 64 == 5, 8.0, 1.0) * torch.where(i % 4096 < 64, 0.25, 1.0)).view(64, 256)


@pytest.fixture(params=[True, False], ids=["native", "fallback"])
def native(request, monkeypatch) -> bool:
    """Runs a test with the C kernels and with the PyTorch fallback."""
    if request.param and not kernels.HAVE_NATIVE:
        pytest.fail("neoxja._kernels is not built: see test_native_kernels_are_built")
    monkeypatch.setattr(kernels, "HAVE_NATIVE", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# Code books


def test_code_books():
    nf4 = code_book("nf4")
    assert sha256(nf4) == "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
    thresholds = (nf4[:-1] + nf4[1:]) / 2
    assert thresholds.tolist() == [  # reference-spec §7.2, as float32
        -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
        -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
        0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
        0.5016634464263916, 0.6427869200706482, 0.8614784479141235]
    fp4 = code_book("fp4")  # bitsandbytes' FP4 in bit-pattern order, divided by 12
    assert torch.equal(fp4[:8], torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12)
    assert torch.equal(fp4[8:], -fp4[:8]) and str(fp4[8].item()) == "-0.0"
    dyn = dynamic_map()
    assert sha256(dyn) == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    assert dyn.numel() == 256 and dyn[127] == 0 and (dyn == 0).sum() == 1 and dyn.max() == 1.0
    assert dyn.min().item() == pytest.approx(-0.99296875, rel=1e-7)
    assert dyn[128].item() == pytest.approx(5.500000384017767e-07, rel=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# 4-bit quantization, bit-exact


def test_nf4_known_vector_follows_spec_rules(native: bool):
    """One block with absmax 1: code points map to themselves, a value on a threshold to the lower index, the next
    float above it to the higher one, other values to the nearest code point; element 2k goes to the high nibble."""
    code = code_book("nf4")
    thresholds = (code[:-1] + code[1:]) / 2
    above = torch.nextafter(thresholds, torch.full_like(thresholds, 2.0))
    others = torch.tensor([0.0, -0.0, 0.5, -0.5, 0.07, -0.07, 0.9, -0.9, 0.2, -0.2, 0.6, -0.6, 0.3, -0.3, 0.45, -0.45,
                           0.16, -0.16])
    x = torch.cat([code, thresholds, above, others])
    assert x.numel() == 64
    nearest = (others[:, None] - code[None, :]).abs().argmin(dim=1).tolist()
    expected = list(range(16)) + list(range(15)) + list(range(1, 16)) + nearest
    packed, absmax = quantize_4bit(x, "nf4")
    assert absmax.tolist() == [1.0]
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert packed.view(-1).tolist() == [(expected[2 * k] << 4) | expected[2 * k + 1] for k in range(32)]
    assert torch.equal(dequantize_4bit(packed, absmax, (64,), "nf4"), code[torch.tensor(expected)])


def test_fp4_known_vector_follows_cuda_rule():
    """FP4: sign bit from x < 0, magnitudes by bitsandbytes' CUDA pivots, a value on a pivot to the lower magnitude."""
    code = code_book("fp4")
    pivots = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
    magnitude_patterns = [0, 1, 6, 7, 4, 5, 2, 3]  # ascending magnitudes
    x, expected = [1.0], [3]  # absmax 1
    for rank, p in enumerate(pivots):
        x += [p, -p, float(torch.nextafter(torch.tensor(p), torch.tensor(2.0)))]
        expected += [magnitude_patterns[rank], magnitude_patterns[rank] + 8, magnitude_patterns[rank + 1]]
    x += [0.0, -0.0, -1e-6, 1e-6, -1.0]
    expected += [0, 0, 8, 0, 11]
    packed, absmax = quantize_4bit(torch.tensor(x), "fp4")
    indices = torch.stack((packed.view(-1) >> 4, packed.view(-1) & 15), 1).view(-1)[: len(x)]
    assert indices.tolist() == expected
    assert packed.view(-1)[-1].item() & 15 == 0  # odd count: padded with the code of 0.0
    assert torch.equal(dequantize_4bit(packed, absmax, (len(x),), "fp4"), code[torch.tensor(expected)])


def test_nf4_double_quant_golden_from_bitsandbytes(native: bool):
    """Recorded from bitsandbytes 0.50.2: quantize_4bit(golden_weight(), blocksize=64, quant_type="nf4",
    compress_statistics=True) and dequantize_4bit of it."""
    w = golden_weight()
    packed, absmax = quantize_4bit(w, "nf4")
    assert sha256(packed) == "533a5e5a95a571b0b183e24c3f061ff0698705c4bf207f41f03e2682a66d40d6"
    assert sha256(absmax) == "d56240fcf08eb26364bf17995cfbf398b242c5e4dd5f6d04a99597afe0265ec9"
    codes, nested_absmax, offset = double_quantize(absmax)
    assert sha256(codes) == "4d9c8611063e02c699463dcd78c438a57dce6333bdfa97e52be2f3675ad95bbf"
    assert nested_absmax.tolist() == [3.9874038696289062] and offset == 4.028644561767578
    w_hat = dequantize_4bit(packed, double_dequantize(codes, nested_absmax, offset), w.shape, "nf4")
    assert sha256(w_hat) == "9eb7ce0813823d22e315837d4bdbd63abb7c41996207b58d1b0db1dab4b51f11"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_4bit_quantization_is_bit_exact(dtype, monkeypatch):
    if not kernels.HAVE_NATIVE:
        pytest.fail("neoxja._kernels is not built: see test_native_kernels_are_built")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 640, generator=gen) * torch.rand(256, 1, generator=gen) * 3
    code = code_book("nf4")
    w[3, :64], w[5, 5], w[7] = 0, 1e-30, -w[7]
    w[9, :15], w[9, 15] = (code[:-1] + code[1:]) / 2, 1.0  # exactly on the NF4 thresholds
    w[10, :7], w[10, 7] = torch.tensor(FP4_PIVOTS), -1.0  # exactly on the FP4 pivots
    w = w.to(dtype)
    for quant_type in ("nf4", "fp4"):
        ours = quantize_4bit(w, quant_type)
        monkeypatch.setattr(kernels, "HAVE_NATIVE", False)
        reference = quantize_4bit(w, quant_type)
        monkeypatch.setattr(kernels, "HAVE_NATIVE", True)
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


def test_double_quant_rounds_to_nearest_map_entry():
    gen = torch.Generator().manual_seed(0)
    absmax = torch.rand(3 * 256 + 17, generator=gen) * torch.rand(1, generator=gen) * 4  # with a partial block
    codes, nested_absmax, offset = double_quantize(absmax)
    assert nested_absmax.shape == (4,) and codes.dtype == torch.uint8
    v = absmax - torch.tensor(offset)
    s = (v.view(-1)[: 3 * 256].view(3, 256) * (1 / nested_absmax[:3, None])).view(-1)
    dist = (dynamic_map()[None, :] - s[:, None]).abs()
    chosen = dist.gather(1, codes[: 3 * 256].long()[:, None])[:, 0]
    assert torch.equal(chosen, dist.min(dim=1).values)
    error = (double_dequantize(codes, nested_absmax, offset) - absmax).abs()
    assert error.max() <= nested_absmax.max() * 0.02


def test_int8_golden_from_bitsandbytes():
    """bitsandbytes' int8_vectorwise_quant of the fp16 golden weight; our rule on its fp32 value gives the same."""
    q, scb = quantize_int8(golden_weight().half())
    assert sha256(q) == "42103d23cc826b4a14e2b4e9095bf31de5c5beec7e67fac04d9ad3bbe0f25b3a"
    assert sha256(scb) == "c466f91cc5be06e1a1d4b1d5088fa2cc2f07dcfc8477752ce978f06128d1c196"
    q0, scb0 = quantize_int8(torch.zeros(2, 64))  # an all-zero row must not give NaN
    assert q0.abs().sum() == 0 and scb0.tolist() == [0.0, 0.0]


def test_4bit_runtime_layout_of_many_rows_unpacks_to_its_indices():
    """pack_4bit works through large matrices a block of rows at a time (the head: 32000 rows): every row, on both
    sides of the block boundaries, unpacks to its own code indices, and dequantizes to code[index] * absmax."""
    n, k = 700, 8192 - 64  # 512-row blocks; rows padded to the layout's 128 elements
    indices = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    packed = kernels.pack_4bit(indices)
    assert packed.shape == (n, 8192 // 2) and torch.equal(kernels.unpack_4bit(packed, k), indices)
    absmax = torch.rand(n * k // 64, generator=torch.Generator().manual_seed(5)) + 0.5
    code = code_book("nf4")
    expected = (code[indices.long()].view(n, k // 64, 64) * absmax.view(n, k // 64, 1)).view(n, k)
    assert torch.equal(kernels.dequantize_4bit(packed, kernels.pad_absmax(absmax, n, k), code, k), expected)


def test_int8_rows_quantized_in_blocks_match_the_whole_matrix_rule():
    """quantize_int8 works through large matrices a block of rows at a time (the head: 32000 rows): the same numbers
    as the rule applied to the whole matrix at once, across block boundaries and with an all-zero row."""
    w = torch.randn(300, 16384, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)  # 256-row blocks
    w[257] = 0
    q, scb = quantize_int8(w)
    full = w.float()
    expected_scb = full.abs().amax(dim=1)
    expected = torch.where(expected_scb[:, None] > 0, torch.round(full * (127.0 / expected_scb)[:, None]), 0)
    assert torch.equal(scb, expected_scb) and torch.equal(q, expected.to(torch.int8))
    assert q.dtype == torch.int8 and q[257].abs().sum() == 0 and q.abs().amax(dim=1)[:257].eq(127).all()


def test_against_bitsandbytes():
    """Live comparison with bitsandbytes (a test oracle, in the test extra; not a runtime dependency)."""
    import bitsandbytes.functional as bnb_functional
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 320, generator=gen).half()
    packed, absmax = quantize_4bit(w, "nf4")
    ref_packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_packed)
    codes, nested_absmax, offset = double_quantize(absmax)
    assert torch.equal(nested_absmax, state.state2.absmax) and offset == state.offset.item()
    # bitsandbytes' CPU kernel rounds some tiny values differently (reference-spec §7.4): allow a few codes.
    assert (codes != state.absmax).float().mean() < 0.02
    absmax_theirs = double_dequantize(state.absmax, nested_absmax, offset)
    ours = dequantize_4bit(packed, absmax_theirs, w.shape, "nf4", torch.float16)
    assert torch.equal(ours, bnb_functional.dequantize_4bit(ref_packed, state))
    # FP4: bitsandbytes' CPU path differs from the CUDA rule only in the sign of zero and exactly on pivots.
    fp4_packed, fp4_absmax = quantize_4bit(w, "fp4")
    ref_fp4, fp4_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
    ours_fp4 = dequantize_4bit(fp4_packed, fp4_absmax, w.shape, "fp4", torch.float16)
    same = ours_fp4 == bnb_functional.dequantize_4bit(ref_fp4, fp4_state)
    assert same.float().mean() > 0.999
    q, scb = quantize_int8(w)
    ref_q, ref_scb, _ = bnb_functional.int8_vectorwise_quant(w)
    assert torch.equal(q, ref_q) and torch.equal(scb, ref_scb)


# ---------------------------------------------------------------------------------------------------------------
# Linear layers: quantized computation == dequantized float computation


def _linear(n: int, k: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight[:, 3] *= 6  # an outlier column, as LLMs have
        if bias:
            layer.bias.normal_()
    return layer


LAYERS = {
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "nf4": lambda lin: Linear4bit.from_linear(lin, "nf4"),
    "nf4-double": lambda lin: Linear4bit.from_linear(lin, "nf4", compress_statistics=True),
    "fp4": lambda lin: Linear4bit.from_linear(lin, "fp4"),
}


def _check_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: summation order only (rtol 1e-5 of the output scale); bf16: one rounding of the fp32 result."""
    scale = ref.abs().max().item()
    if y.dtype == torch.float32:
        assert (y.double() - ref).abs().max().item() <= 1e-5 * scale
    else:
        assert (y.double() - ref).abs().max().item() <= 2**-8 * scale


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_quantized_linear_matches_dequantized(kind: str, native: bool):
    # K % 128 == 64 pads the 4-bit rows; 1856 (15 lines of 128) has groups of 8, 4, 2 and 1 lines (kernels docstring)
    for n, k, bias in [(40, 256, True), (33, 192, False), (24, 320, True), (20, 1856, True)]:
        lin = _linear(n, k, bias)
        layer = LAYERS[kind](lin)
        w = layer.dequantize()
        assert w.dtype == torch.float32 and w.shape == (n, k)
        assert (w - lin.weight).abs().max() <= lin.weight.abs().max() * (0.01 if kind == "int8" else 0.2)
        b = None if lin.bias is None else lin.bias.detach().double()
        for rows in (1, 3, 8, 9):  # 9 > MAX_GEMV_ROWS: the prefill path
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k).to(dtype)
                y = layer(x)
                assert y.dtype == dtype and y.shape == (rows, n)
                if dtype == torch.bfloat16 and rows > kernels.MAX_GEMV_ROWS:  # prefill: bf16 weights and bias
                    _check_close(y, F.linear(x.double(), w.bfloat16().double(), b if b is None else
                                             b.bfloat16().double()))
                elif dtype == torch.bfloat16 and native and kernels.BF16_CODE_4BIT and kind != "int8":
                    rounded = kernels.dequantize_4bit(layer.qweight, layer.absmax, layer.code.bfloat16().float(), k)
                    _check_close(y, F.linear(x.double(), rounded.double(), b))  # the code book rounded to bf16
                else:
                    _check_close(y, F.linear(x.double(), w.double(), b))
        x3 = torch.randn(2, 3, k)  # leading batch dimensions
        assert torch.allclose(layer(x3), layer(x3.view(6, k)).view(2, 3, n), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_absmax_in_the_narrowest_exact_dtype(dtype: torch.dtype, tmp_path: Path):
    """Weights quantized from bf16 (fp16) have absmax values that bf16 (fp16) holds exactly: the layer keeps them in
    16 bits (half the absmax bytes each token reads) and computes exactly what it computes from fp32 absmax, on every
    kernel path (batch 1, batched, prefill, dequantize) and group size (1856: groups of 8, 4, 2 and 1 lines); fp32
    weights keep fp32 absmax. Checkpoints hold them as fp32, bitsandbytes' layout, and load back the same."""
    for n, k in [(40, 320), (20, 1856)]:
        lin = _linear(n, k, seed=k).to(dtype)
        layer = Linear4bit.from_linear(lin, "nf4")
        assert layer.absmax.dtype == dtype
        wide = Linear4bit.from_linear(lin, "nf4")
        wide.absmax = layer.absmax.float()
        assert torch.equal(layer.dequantize(), wide.dequantize())
        for rows in (1, 3, 8, 9):
            for x_dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k).to(x_dtype)
                assert torch.equal(layer(x), wide(x)), (n, k, rows, x_dtype)
        state = layer.state_dict()
        assert state["weight.absmax"].dtype == torch.float32
        assert torch.equal(state["weight.absmax"], wide.state_dict()["weight.absmax"])
        fresh = Linear4bit(k, n, quant_type="nf4", dtype=dtype).to_empty(device="cpu")
        fresh.load_state_dict(state)
        assert fresh.absmax.dtype == dtype and torch.equal(fresh.absmax, layer.absmax)
    assert kernels.narrow_absmax(torch.tensor([1.0, 1 + 2**-10])).dtype == torch.float16  # not bf16
    assert kernels.narrow_absmax(torch.tensor([1.0, 2**-40])).dtype == torch.bfloat16  # below fp16's range
    assert kernels.narrow_absmax(torch.tensor([1.0, 1 + 2**-20])).dtype == torch.float32


def test_int8_activation_rows_of_every_kind(native: bool):
    """Activation rows of every kind through an int8 layer, each judged on its own scale: a row whose absmax is an
    outlier a thousand times its other values, a zero row, K % 64 == 32 and long rows stay at fp32 accuracy, and a
    row holding inf or NaN gives no finite output without touching the other rows of its batch."""
    for n, k in [(40, 96), (24, 2592)]:
        layer = Int8Linear.from_linear(_linear(n, k, bias=True, seed=k))
        w, b = layer.dequantize().double(), layer.bias.detach().double()
        for rows in (1, 4, 8):
            x = torch.randn(rows, k) * 1e-3
            x[0, 5] = 3.0  # an activation outlier: every other value is ~1000x smaller
            if rows > 1:
                x[1] = 0.0
            ref = F.linear(x.double(), w, b)
            y = layer(x)
            for row in range(rows):  # row by row: each has its own scale
                scale = (x[row].double().abs() @ w.abs().T + b.abs()).max()
                assert (y[row].double() - ref[row]).abs().max() <= 1e-5 * scale
            if rows > 2:
                x[2, 7], x[3 % rows, 9] = float("inf"), float("nan")
                y = layer(x)
                assert not y[2:4].isfinite().any()
                assert torch.allclose(y[:2], layer(x[:2]), rtol=1e-5, atol=1e-6) and y[4:].isfinite().all()


def test_gradients_flow_to_the_activations():
    layer = Linear4bit.from_linear(_linear(16, 128), "nf4")
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward: this takes the PyTorch path
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-6)


def test_kernels_refuse_bad_tensors():
    layer = Linear4bit.from_linear(_linear(16, 128), "nf4")
    with pytest.raises(InputError, match="last dimension"):
        layer(torch.randn(2, 64))
    with pytest.raises(InputError, match="absmax must be a contiguous torch.float32"):
        kernels.linear_4bit(torch.randn(1, 128), layer.qweight, layer.absmax.double(), layer.code, 128)
    with pytest.raises(InputError, match="not contiguous"):
        kernels.linear_int8(torch.randn(1, 64), torch.zeros(64, 8, dtype=torch.int8).t(), torch.ones(8))
    with pytest.raises(InputError, match="bfloat16"):
        kernels.linear_bf16(torch.randn(1, 64), torch.randn(8, 64))


def test_native_and_fallback_agree(monkeypatch):
    if not kernels.HAVE_NATIVE:
        pytest.fail("neoxja._kernels is not built: see test_native_kernels_are_built")
    lin = _linear(64, 512)
    for kind, make in LAYERS.items():
        layer = make(lin)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 512).to(dtype)
            native = layer(x)
            monkeypatch.setattr(kernels, "HAVE_NATIVE", False)
            fallback = layer(x)
            monkeypatch.setattr(kernels, "HAVE_NATIVE", True)
            if dtype == torch.bfloat16 and kind != "int8" and kernels.BF16_CODE_4BIT:  # rounded code book
                assert (native.double() - fallback.double()).abs().max() <= 2**-7 * fallback.abs().max().item()
            else:
                _check_close(native, fallback.double())


def test_batch1_gemv_over_row_counts_and_threads(native: bool):
    """Batch-1 decoding cuts each thread's rows into runs read side by side (see STREAMS in _kernels.c): every row
    count, including fewer rows than a tile and counts that leave single rows over, must give every output."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 7, 9, 17, 63, 130):
            lin = _linear(n, 256, bias=True, seed=n)
            w, b = lin.weight.detach().bfloat16(), lin.bias.detach()
            layers = {kind: make(lin) for kind, make in LAYERS.items()}
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                x = torch.randn(1, 256)
                _check_close(kernels.linear_bf16(x.bfloat16(), w, b.bfloat16()),
                             F.linear(x.bfloat16().double(), w.double(), b.bfloat16().double()))
                for kind, layer in layers.items():
                    _check_close(layer(x), F.linear(x.double(), layer.dequantize().double(), b.double()))
    finally:
        torch.set_num_threads(threads)


def test_batch1_gemv_is_the_same_on_any_thread_count():
    """At batch 1 threads done with their own rows take the rest of others' (see "splitting a GEMV's rows" in
    _kernels.c): which thread computes a row must not change it, and no row may be missed or summed twice. More
    threads than cores make the hand-overs frequent."""
    if not kernels.HAVE_NATIVE:
        pytest.fail("neoxja._kernels is not built: see test_native_kernels_are_built")
    threads = torch.get_num_threads()
    try:
        lin = _linear(1003, 2560, bias=True, seed=5)
        w, b = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
        layers = {kind: make(lin) for kind, make in LAYERS.items()}
        x = torch.randn(1, 2560)
        outputs: dict[int, list[torch.Tensor]] = {}
        for count in (1, 2, 5, 7):
            torch.set_num_threads(count)
            outputs[count] = [kernels.linear_bf16(x.bfloat16(), w, b)] + [layer(x) for layer in layers.values()]
        for count in (2, 5, 7):
            for single, many in zip(outputs[1], outputs[count]):
                assert torch.equal(single, many), f"{count} threads"
        _check_close(outputs[1][0], F.linear(x.bfloat16().double(), w.double(), b.double()))
    finally:
        torch.set_num_threads(threads)


def test_linear_bf16(native: bool):
    lin = _linear(96, 320)
    w, b = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    for rows in (1, 4, 12):
        x = torch.randn(rows, 320)
        _check_close(kernels.linear_bf16(x.bfloat16(), w, b), F.linear(x.bfloat16().double(), w.double(), b.double()))
        _check_close(kernels.linear_bf16(x, w, b), F.linear(x.double(), w.double(), b.double()))
        logits = kernels.linear_bf16(x.bfloat16(), w, out_dtype=torch.float32)
        assert logits.dtype == torch.float32
        if rows > kernels.MAX_GEMV_ROWS:  # prefill in bf16: logits rounded to bf16, as the reference's are
            logits = logits.bfloat16()
        _check_close(logits, F.linear(x.bfloat16().double(), w.double()))


def test_native_kernels_are_built():
    """On a CPU with AVX-512 the install must have built neoxja._kernels (setup.py builds it optionally)."""
    flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text())) if Path("/proc/cpuinfo").exists() else set()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert kernels.HAVE_NATIVE, "neoxja._kernels failed to build or load: run `pip install -e .` and read its log"
    else:
        assert not kernels.HAVE_NATIVE or flags == set()


# ---------------------------------------------------------------------------------------------------------------
# Modules in a model, checkpoints


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(50, 128)
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(128, 192), "down": nn.Linear(192, 128, bias=False)})
                                    for _ in range(2))
        self.odd = nn.Linear(100, 128)  # in_features not a multiple of 64: stays float under 4-bit
        self.embed_out = nn.Linear(128, 50, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.embed_out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_in(ids)
        for layer in self.layers:
            h = h + layer["down"](torch.relu(layer["up"](h)))
        return self.embed_out(h + self.odd(h[..., :100]))


CONFIGS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype="bfloat16"),
    "fp4": BitsAndBytesConfig(load_in_4bit=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpoint_round_trip(name: str, tmp_path: Path):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyModel()
    quantize_model(model, config, default_skip_modules(model))
    assert isinstance(model.embed_out, nn.Linear)  # the head stays in float
    quantized = (Int8Linear if config.load_in_8bit else Linear4bit)
    assert isinstance(model.odd, quantized)  # in_features 100: 4-bit blocks straddle rows, as in bitsandbytes
    assert all(isinstance(layer[key], quantized) for layer in model.layers for key in ("up", "down"))

    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")

    fresh = TinyModel().to("meta")
    prepare_quantized_model(fresh, config.to_dict(), None, torch.float32)
    expected = fresh.state_dict(keep_vars=True)
    assert set(expected) == set(loaded)
    for key in quantized_state_keys(fresh):  # the layout a checkpoint must have, before loading
        assert expected[key].dtype == loaded[key].dtype, key
        if "quant_state" not in key:
            assert expected[key].shape == loaded[key].shape, key
    fresh.load_state_dict(loaded, strict=True, assign=True)
    ids = torch.tensor([[1, 5, 7, 49]])
    assert torch.equal(fresh(ids), model(ids))
    assert {k: torch.equal(v, fresh.state_dict()[k]) for k, v in state.items()} == {k: True for k in state}


def test_4bit_checkpoint_layout_is_bitsandbytes():
    layer = Linear4bit.from_linear(_linear(96, 320, bias=True), "nf4", compress_statistics=True)
    state = layer.state_dict()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if "quant_state" not in k}
    assert layout == {
        "weight": (torch.uint8, (96 * 320 // 2, 1)),
        "weight.absmax": (torch.uint8, (96 * 320 // 64,)),
        "weight.quant_map": (torch.float32, (16,)),
        "weight.nested_absmax": (torch.float32, (2,)),
        "weight.nested_quant_map": (torch.float32, (256,)),
        "bias": (torch.float32, (96,)),
    }
    info = json.loads(bytes(state["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(info) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert info["quant_type"] == "nf4" and info["blocksize"] == 64 and info["shape"] == [96, 320]
    assert info["dtype"] == "float32" and info["nested_blocksize"] == 256
    packed, _ = quantize_4bit(_linear(96, 320).weight, "nf4")
    assert torch.equal(state["weight"], packed)  # the runtime layout converts back to bitsandbytes' exactly
    int8_state = Int8Linear.from_linear(_linear(8, 64)).state_dict()
    assert {k: v.dtype for k, v in int8_state.items()} == {"weight": torch.int8, "SCB": torch.float32,
                                                          "bias": torch.float32}


@pytest.mark.parametrize("in_features", [100, 224])  # not multiples of 64: the flat layout (the demo model's 224)
def test_4bit_layer_with_blocks_straddling_rows(in_features: int):
    linear = _linear(24, in_features, bias=True)
    layer = Linear4bit.from_linear(linear, "nf4", compress_statistics=True)
    assert not layer.row_blocks
    packed, absmax = quantize_4bit(linear.weight, "nf4")
    assert torch.equal(layer.state_dict()["weight"], packed)
    expected = dequantize_4bit(packed, double_dequantize(*double_quantize(absmax)), (24, in_features), "nf4")
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(3, in_features).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), (x.float() @ expected.T + linear.bias).bfloat16().float(), rtol=1e-2, atol=1e-2)
    fresh = Linear4bit(in_features, 24, True, "nf4", compress_statistics=True)
    fresh.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(fresh(x), y)


def test_bad_checkpoints_raise():
    state = Linear4bit.from_linear(_linear(16, 128), "nf4").state_dict()
    fresh = Linear4bit(128, 16, True, "nf4")
    with pytest.raises(CheckpointError, match="lacks"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "weight.absmax"}, assign=True)
    with pytest.raises(CheckpointError, match="does not match"):
        Linear4bit(128, 16, True, "fp4").load_state_dict(
            {**{k: v for k, v in state.items() if "quant_state" not in k},
             "weight.quant_state.bitsandbytes__fp4": state["weight.quant_state.bitsandbytes__nf4"]}, assign=True)
    with pytest.raises(CheckpointError, match="expected torch.float32"):
        fresh.load_state_dict({**state, "weight.absmax": state["weight.absmax"].half()}, assign=True)


def test_quantize_loaded_model_records_config_and_refuses_casts():
    class WithConfig(TinyModel):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"extra": {}})()

    model = WithConfig()
    quantize_loaded_model(model, {"load_in_8bit": True, "llm_int8_skip_modules": ["layers.1"]})
    assert model.config.extra["quantization_config"]["quant_method"] == "bitsandbytes"
    assert isinstance(model.layers[0]["up"], Int8Linear) and isinstance(model.layers[1]["up"], nn.Linear)
    model.to("cpu")  # moving is fine
    with pytest.raises(InputError, match="cannot be cast"):
        model.to(torch.bfloat16)


def test_prepare_refuses_conflicting_configs():
    with pytest.raises(ConfigError, match="already quantized"):
        prepare_quantized_model(TinyModel(), CONFIGS["int8"].to_dict(), CONFIGS["fp4"], torch.float32)
    with pytest.raises(ConfigError, match="asks for nothing"):
        quantize_model(TinyModel(), BitsAndBytesConfig())


# ---------------------------------------------------------------------------------------------------------------
# BitsAndBytesConfig


def test_config_matches_transformers():
    import transformers
    for kwargs in [dict(load_in_8bit=True), dict(load_in_4bit=True),
                   dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["embed_out"])]:
        theirs = transformers.BitsAndBytesConfig(**kwargs).to_dict()
        assert BitsAndBytesConfig(**kwargs).to_dict() == theirs
        assert BitsAndBytesConfig.from_dict(theirs) == BitsAndBytesConfig(**kwargs)
        assert BitsAndBytesConfig.from_dict(json.loads(BitsAndBytesConfig(**kwargs).to_json_string())) == \
            BitsAndBytesConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(load_in_8bit=True, load_in_4bit=True), "load_in_8bit"),
    (dict(load_in_4bit=1), "load_in_4bit"),
    (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(bnb_4bit_compute_dtype="float31"), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_quant_storage="bfloat16"), "bnb_4bit_quant_storage"),
    (dict(llm_int8_skip_modules="embed_out"), "llm_int8_skip_modules"),
    (dict(llm_int8_threshold="6"), "llm_int8_threshold"),
    (dict(llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        BitsAndBytesConfig(**kwargs)


def test_config_from_dict():
    with pytest.raises(ConfigError, match="quant_method"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq"})
    with pytest.warns(UserWarning, match="unknown keys"):
        assert BitsAndBytesConfig.from_dict({"load_in_8bit": True, "new_field": 1}).load_in_8bit
