"""Linear layers for the CPU decode path, on bf16, int8 and 4-bit weights.

This module owns the choice of kernel for `y = x @ W.T + bias`, and the native decode step of whole layers
(`decode_layers`: per layer norms, the four GEMVs, attention with rotary and the cache write, GELU and residuals;
all layers in one call, which neoxja.modeling.NeoXModel takes whenever it decodes one token per sequence from bf16
activations):

- small batches (at most MAX_GEMV_ROWS rows of activations, i.e. decoding) go to `neoxja._kernels`, the C/AVX-512
  GEMV that streams the weights once and decodes them in registers;
- larger batches (prefill) dequantize the weights once to the activations' dtype and use PyTorch's matmul;
- without the native module (no compiler at install, or a CPU without AVX-512), and for tensors on a GPU, the same
  functions run on PyTorch.

Numerics, every path: weights decode exactly to fp32, products and sums are fp32 and the result is rounded once to the
output dtype, so all paths equal `F.linear(x.float(), W_fp32, bias)` up to fp32 summation order (relative error of
order 1e-6 of the row's |x|·|w| sum; tests use rtol 1e-5). The prefill path with bf16 activations is the
exception: it multiplies by the weights rounded to bf16, as bitsandbytes' `Linear4bit` does.
Measured against torch's own kernels: benchmarks/matmul.py.

4-bit runtime layout (made by `pack_4bit` from code indices; the bitsandbytes layout is kept only on disk):
rows are padded to Kp = K rounded up to 128 and cut into 64-byte lines of 128 weights, the lines into groups of 8
(1024 weights, 16 absmax blocks) while 8 are left, then 4, 2 and 1. Line l of a group of L lines holds steps
s = 4l + t: nibble t (0..3, from the least significant) of 16-bit lane w = 2j + e holds element
64 b + 8L q + 8l + 2t + e of the group, where b = j mod 2L is its block and q = j div 2L. So 32-bit lane j of a
step only ever holds weights of block b, and the kernel scales each lane's sum once per group (see _kernels.c).
`absmax` is [N, Kp/64] in block order (padding blocks have absmax 0), in bf16 or fp16 where that dtype holds every
value exactly (`narrow_absmax`), else fp32: weights quantized from bf16 (fp16) have bf16 (fp16) absmax values, the
largest magnitude of each block, so the 16-bit copy is lossless and the stream of absmax bytes, an eighth of the
4-bit weights' bytes in fp32, halves.

bf16 weights with bf16 activations on AVX512-BF16 use vdpbf16ps: the products are exact in fp32 and sums fp32, so
the numbers are those above (denormal inputs count as zero); batched decoding, which is compute-bound, gains most.

One exception to "weights decode exactly to fp32": where the CPU has AVX512-BF16 and the activations are bf16, the
4-bit GEMV multiplies with the code book rounded to bf16 (vdpbf16ps: twice the weights per instruction), so each
weight carries a relative error of at most 2^-9 on top of its 4-bit quantization (bitsandbytes' own bf16 compute
rounds the dequantized weights to bf16 too). The result stays within bf16 precision of the exact sum.
"""
from __future__ import annotations

from array import array
from functools import lru_cache

import torch
import torch.nn.functional as F

from .errors import InputError

try:  # after torch: the module then binds to torch's libgomp (same soname) and shares its OpenMP thread pool
    from . import _kernels as _native
except ImportError:  # built without a C compiler or without AVX-512: PyTorch fallback below
    _native = None

HAVE_NATIVE = _native is not None
MAX_GEMV_ROWS = 8  # activation rows the GEMV kernel takes in one pass (batched decode); more is prefill
# 4-bit GEMV with bf16 activations multiplies by the code book rounded to bf16 (see the module docstring)
BF16_CODE_4BIT = bool(HAVE_NATIVE and _native.BF16_CODE_4BIT)

_DT = {torch.float32: 0, torch.bfloat16: 1}  # the dtype codes of _kernels.c (DT_F32, DT_BF16)
_SCALE_DT = {**_DT, torch.float16: 2}  # ... and DT_F16, for 4-bit absmax


def _ceil128(k: int) -> int:
    return (k + 127) // 128 * 128


def row_blocks(n: int, width: int) -> list[slice]:
    """Rows [0, n) of a matrix `width` wide in blocks of ~4M elements: whole-matrix work on the 32000-row head made
    hundreds of MB of temporaries at load (~1.3 GB for int8 quantization); a block's stay in the tens of MB."""
    step = max(1, (1 << 22) // max(1, width))
    return [slice(r0, r0 + step) for r0 in range(0, n, step)]


def _check(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The kernels read raw memory: refuse anything but the exact dtype, shape and a contiguous layout."""
    if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
        raise InputError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)}, got "
                         f"{tensor.dtype} {list(tensor.shape)}{'' if tensor.is_contiguous() else ' (not contiguous)'}")


def _linear(x: torch.Tensor, n: int, k: int, native_args, dequant, bias, out_dtype) -> torch.Tensor:
    """Shared driver of the linear_* functions. `native_args` = (fmt, w, scale, code) for the GEMV kernel, or None
    when the weight's shape does not suit it; `dequant(dtype)` returns W [N, K] in `dtype`."""
    out_dtype = out_dtype or x.dtype
    if x.shape[-1] != k:
        raise InputError(f"the input's last dimension is {x.shape[-1]}, but the layer takes {k} features")
    x2 = x.reshape(-1, k)
    small = x2.shape[0] <= MAX_GEMV_ROWS
    if (
        small
        and HAVE_NATIVE
        and x2.device.type == "cpu"
        and native_args is not None
        and x2.dtype in _DT
        and out_dtype in _DT
        and not (torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)))
    ):  # the kernel has no backward: anything that needs gradients takes the PyTorch path
        fmt, w, scale, code = native_args
        sdt = 0 if scale is None else _SCALE_DT[scale.dtype]
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], n, dtype=out_dtype)
        if bias is not None:
            bias = (bias if bias.dtype in _DT else bias.float()).contiguous()  # added in fp32, then one rounding
        _native.gemv(
            fmt, y.data_ptr(), _DT[out_dtype], x2.data_ptr(), _DT[x2.dtype], w.data_ptr(),
            0 if scale is None else scale.data_ptr(), sdt, 0 if code is None else code.data_ptr(),
            0 if bias is None else bias.data_ptr(), 0 if bias is None else _DT[bias.dtype],
            x2.shape[0], n, k, torch.get_num_threads(),
        )
    else:
        # Small batches compute in fp32 like the kernel; prefill with bf16 activations uses bf16 weights and bias
        # (fast bf16 matmul; bitsandbytes' semantics).
        w = dequant(torch.bfloat16 if x.dtype == torch.bfloat16 and not small else torch.float32)
        y = F.linear(x2.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(out_dtype)
    return y.reshape(*x.shape[:-1], n)


# ---- bf16 weights ----


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for a bf16 weight [N, K] (K a multiple of 32 for the native path). The output has x's
    dtype unless `out_dtype` says otherwise (e.g. fp32 logits from a bf16 head)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise InputError(f"linear_bf16 takes a 2-D bfloat16 weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    native = (_native.FMT_BF16, weight, None, None) if HAVE_NATIVE and k % 32 == 0 and weight.is_contiguous() else None
    return _linear(x, n, k, native, weight.to, bias, out_dtype)


# ---- int8 weights with one scale per output row ----


def dequantize_int8(qweight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = qweight * SCB / 127 as bitsandbytes computes it ((q * SCB) * fp32(1/127)), then rounded to `dtype`."""
    n, k = qweight.shape
    if HAVE_NATIVE and dtype in _DT and k % 16 == 0 and qweight.device.type == "cpu":
        out = torch.empty(n, k, dtype=dtype)
        _native.dequantize(_native.FMT_INT8, out.data_ptr(), _DT[dtype], qweight.data_ptr(), scb.data_ptr(), 0, 0, n,
                           k, torch.get_num_threads())
        return out
    return (qweight.float() * scb.float()[:, None] * 7.874015718698502e-3).to(dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x @ W.T + bias` with W = qweight [N, K] int8 * SCB [N] fp32 / 127 (bitsandbytes' Linear8bitLt format). The
    kernel scales each row's int8 dot product once instead of each weight."""
    n, k = qweight.shape
    _check(qweight, "qweight", torch.int8, (n, k))
    _check(scb, "SCB", torch.float32, (n,))
    native = (_native.FMT_INT8, qweight, scb, None) if HAVE_NATIVE and k % 32 == 0 else None
    return _linear(x, n, k, native, lambda dt: dequantize_int8(qweight, scb, dt), bias, out_dtype)


# ---- 4-bit weights (nf4/fp4 code indices, one absmax per 64) in the runtime layout ----


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Code indices [N, K] (values 0..15) -> runtime layout uint8 [N, Kp/2] (see the module docstring)."""
    n, k = indices.shape
    kp = _ceil128(k)
    order = _runtime_order(kp)
    out = torch.empty(n, kp // 2, dtype=torch.uint8)
    for rows in row_blocks(n, kp):
        idx = F.pad(indices[rows].to(torch.uint8), (0, kp - k))[:, order]
        lane_nibble = idx.view(-1, kp // 128, 4, 32).transpose(2, 3)  # [rows, line, lane w, nibble t]
        out[rows] = (lane_nibble[..., 0::2] | (lane_nibble[..., 1::2] << 4)).reshape(-1, kp // 2)
    return out


@lru_cache(maxsize=None)
def _runtime_order(kp: int) -> torch.Tensor:
    """The element of a padded row at each position 128 line + 32 t + w of the 4-bit runtime layout."""
    parts, g0 = [], 0
    while g0 < kp:
        left = (kp - g0) // 128
        lines = 8 if left >= 8 else 4 if left >= 4 else 2 if left >= 2 else 1
        l, t, j, e = torch.meshgrid(*(torch.arange(size) for size in (lines, 4, 16, 2)), indexing="ij")
        parts.append((g0 + 64 * (j % (2 * lines)) + 8 * lines * (j // (2 * lines)) + 8 * l + 2 * t + e).reshape(-1))
        g0 += 128 * lines
    return torch.cat(parts)


def quantize_4bit_native(flat: torch.Tensor, nf4: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """bitsandbytes' blockwise 4-bit quantization of a flat fp32/bf16 tensor by the native module: (code indices uint8
    [n], absmax fp32 [n/64]), bit-exact with neoxja.quantization's PyTorch definition and several times faster. None
    when the native module is missing or the input does not suit it (n not a multiple of 64, another dtype)."""
    n = flat.numel()
    if not HAVE_NATIVE or n % 64 or flat.dtype not in _DT or flat.device.type != "cpu":
        return None
    flat = flat.contiguous()
    indices, absmax = torch.empty(n, dtype=torch.uint8), torch.empty(n // 64)
    _native.quantize_4bit(indices.data_ptr(), absmax.data_ptr(), flat.data_ptr(), _DT[flat.dtype], n, nf4,
                          torch.get_num_threads())
    return indices, absmax


def unpack_4bit(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: runtime layout -> code indices [N, K] uint8."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n, kp // 128, 32, 2)
    lane_nibble = torch.stack((b & 15, b >> 4), dim=-1).reshape(n, kp // 128, 32, 4)
    natural = torch.empty(n, kp, dtype=torch.uint8)
    natural[:, _runtime_order(kp)] = lane_nibble.transpose(2, 3).reshape(n, kp)
    return natural[:, :k].contiguous()


def pad_absmax(absmax: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-block absmax of a [N, K] weight (K a multiple of 64, blocks in row-major order) -> fp32 [N, Kp/64]."""
    return F.pad(absmax.float().view(n, k // 64), (0, (_ceil128(k) - k) // 64)).contiguous()


def narrow_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 absmax values as bf16 or fp16 when every one of them survives the round trip exactly (as weights
    quantized from bf16 or fp16 give: each absmax is one of the weights), else unchanged."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = absmax.to(dtype)
        if torch.equal(narrow.float(), absmax):
            return narrow
    return absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, k: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Runtime layout -> W [N, K]: code[index] * absmax in fp32 (bitsandbytes' rule), then rounded to `dtype`."""
    n = packed.shape[0]
    if HAVE_NATIVE and dtype in _DT and packed.device.type == "cpu":
        out = torch.empty(n, k, dtype=dtype)
        _native.dequantize(_native.FMT_4BIT, out.data_ptr(), _DT[dtype], packed.data_ptr(), absmax.data_ptr(),
                           _SCALE_DT[absmax.dtype], code.data_ptr(), n, k, torch.get_num_threads())
        return out
    values = code.float()[unpack_4bit(packed, k).long()].view(n, k // 64, 64)
    return (values * absmax[:, : k // 64, None].float()).reshape(n, k).to(dtype)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x @ W.T + bias` with W in the 4-bit runtime layout (`pack_4bit`, `pad_absmax`, optionally
    `narrow_absmax`; `code`: 16 fp32 values)."""
    n, kp = packed.shape[0], _ceil128(in_features)
    if in_features % 64:
        raise InputError(f"4-bit layers need in_features divisible by 64, got {in_features}")
    _check(packed, "packed", torch.uint8, (n, kp // 2))
    _check(absmax, "absmax", absmax.dtype if absmax.dtype in _SCALE_DT else torch.float32, (n, kp // 64))
    _check(code, "code", torch.float32, (16,))
    native = (_native.FMT_4BIT, packed, absmax, code) if HAVE_NATIVE else None
    return _linear(x, n, in_features, native,
                   lambda dt: dequantize_4bit(packed, absmax, code, in_features, dt), bias, out_dtype)


# ---- decode attention ----


def fused_decode_ready(qkv: torch.Tensor, heads: int) -> bool:
    """Whether `decode_attention` can take this step: the native module, a CPU tensor in fp32/bf16 holding one new
    token per sequence, no gradients."""
    return (HAVE_NATIVE and qkv.device.type == "cpu" and qkv.dtype in _DT and qkv.dim() == 3 and qkv.shape[1] == 1
            and qkv.shape[2] % (3 * heads) == 0 and qkv.shape[2] // (3 * heads) <= 256
            and not torch.is_grad_enabled())


def cache_suits(keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the KV cache buffers are laid out as the native attention writes them: on the CPU, in `dtype`, with
    one shape and one set of strides for both and the head dimension contiguous."""
    return (keys.dtype == values.dtype == dtype and keys.device.type == values.device.type == "cpu"
            and keys.shape == values.shape and keys.stride(-1) == 1 and keys.stride() == values.stride())


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, position: int, heads: int, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's attention in one native call: qkv [B, 1, H*3*D] (per head [q | k | v], as GPT-NeoX lays out
    its projection); cos, sin [B, ..., R] for the new position; keys, values the cache buffers [B, H, >position, D]
    (last dimension contiguous). Rotates query and key, writes key and value at `position`, attends over 0..position
    (mask: additive [B or 1, 1, 1, position + 1] or None). Returns [B, 1, H*D] in qkv's dtype. The same arithmetic
    as rotary + cache update + one-query attention with fp32 scores and sums, the rotation in fp32 rounded once
    (PyTorch rounds each bf16 op). PyTorch's attention pays a fixed cost per call that exceeds the work at this
    size, bf16 most of all (~1 ms per layer at 512 cached tokens)."""
    batch = qkv.shape[0]
    dim = qkv.shape[2] // (3 * heads)
    if (not fused_decode_ready(qkv, heads) or keys.shape[0] != batch or keys.shape[2] <= position
            or not cache_suits(keys, values, qkv.dtype)):
        raise InputError("decode_attention: these tensors do not suit the native kernel (check fused_decode_ready)")
    qkv = qkv.contiguous()
    out = qkv.new_empty(batch, 1, heads * dim)
    cos, sin, mask, strides = _attention_inputs(qkv.dtype, batch, cos, sin, keys, position, mask)
    _native.decode_attention(qkv.data_ptr(), _DT[qkv.dtype], cos.data_ptr(), sin.data_ptr(), batch, heads, dim,
                             cos.shape[-1], keys.data_ptr(), values.data_ptr(), *strides, position, scale,
                             0 if mask is None else mask.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def _attention_inputs(dtype: torch.dtype, batch: int, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                      position: int, mask: torch.Tensor | None):
    """The rotary tables as contiguous [B, R] in `dtype`, the mask as contiguous fp32 [B, position + 1] (or None) and
    the cache's strides (batch, head, position), as the native attention reads them."""
    rot = cos.shape[-1]
    if not (cos.dtype == sin.dtype == dtype and cos.numel() == sin.numel() == batch * rot and cos.is_contiguous()
            and sin.is_contiguous()):  # the model's tables usually are in form already: no copies per layer then
        cos = cos.to(dtype).reshape(-1, rot).expand(batch, rot).contiguous()
        sin = sin.to(dtype).reshape(-1, rot).expand(batch, rot).contiguous()
    if mask is not None and not (mask.dtype == torch.float32 and mask.numel() == batch * (position + 1)
                                 and mask.is_contiguous()):
        mask = mask.to(torch.float32).expand(batch, 1, 1, position + 1).contiguous()
    return cos, sin, mask, keys.stride()[:3]


# ---- decoder layers in one call ----

_FORMATS = {"bf16": "FMT_BF16", "int8": "FMT_INT8", "4bit": "FMT_4BIT"}
# (format name, weight, scale or None, code or None, bias or None, in_features): what a linear layer's gemv_spec()
# returns when its weights suit the GEMV kernel (neoxja.modeling.Linear, neoxja.quantization's layers)
GemvSpec = tuple


def decode_ready(x: torch.Tensor, heads: int) -> bool:
    """Whether `decode_layers` can take this step: the native module, bf16 activations on the CPU holding one new
    token for at most MAX_GEMV_ROWS sequences, no gradients."""
    return (HAVE_NATIVE and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 3
            and x.shape[1] == 1 and x.shape[0] <= MAX_GEMV_ROWS and x.shape[2] % 16 == 0
            and x.shape[2] % heads == 0 and x.shape[2] // heads <= 256 and not torch.is_grad_enabled())


def layer_plan(specs: list[GemvSpec | None], norms: tuple, dense_bias: torch.Tensor | None, parallel: bool,
               heads: int, scale: float) -> bytes | None:
    """One GPT-NeoX decoder layer's fixed arguments for `decode_layers`, checked once: `specs`, the gemv_spec of
    query_key_value, attention.dense, dense_h_to_4h and dense_4h_to_h; `norms`, ((weight, bias, eps) of
    input_layernorm, of post_attention_layernorm); `dense_bias`, the attention output's separate bias or None. None
    when the kernel cannot read these weights (the layer then runs its modules). The plan holds raw pointers: it is
    valid while every tensor it was made from keeps its storage, dtype and shape (neoxja.modeling.Layer.decode_plan
    rebuilds it otherwise)."""
    if not HAVE_NATIVE or any(spec is None for spec in specs):
        return None
    hidden = specs[0][5]
    (w1, b1, eps1), (w2, b2, eps2) = norms
    if w1 is None or w2 is None:
        return None
    params = [t for t in (w1, b1, w2, b2) if t is not None]
    biases = [(spec[4], spec[1].shape[0]) for spec in specs] + [(dense_bias, hidden)]
    weights = [t for spec in specs for t in spec[1:4] if t is not None]  # weight, scale, code
    tensors = params + weights + [b for b, _ in biases if b is not None]
    if (w1.dtype not in _DT or any(t.dtype != w1.dtype or t.numel() != hidden for t in params)
            or any(b is not None and (b.dtype not in _DT or b.numel() != n) for b, n in biases)
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)):
        return None
    linears = [(getattr(_native, _FORMATS[fmt]), w.data_ptr(), 0 if scale_ is None else scale_.data_ptr(),
                0 if scale_ is None else _SCALE_DT[scale_.dtype], 0 if code is None else code.data_ptr(),
                0 if bias is None else bias.data_ptr(), 0 if bias is None else _DT[bias.dtype], w.shape[0], in_features)
               for fmt, w, scale_, code, bias, in_features in specs]
    return _native.layer_plan(*linears, w1.data_ptr(), 0 if b1 is None else b1.data_ptr(), w2.data_ptr(),
                              0 if b2 is None else b2.data_ptr(), eps1,
                              0 if dense_bias is None else dense_bias.data_ptr(),
                              0 if dense_bias is None else _DT[dense_bias.dtype], eps2, _DT[w1.dtype], int(parallel),
                              hidden, heads, scale)


def _caches_suit(caches: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, heads: int,
                 position: int) -> bool:
    """Whether the layers' KV cache buffers are laid out as `decode_layers` reads them: each [batch, heads,
    > position, head_dim] in x's dtype, on the CPU, all with one shape and one set of strides."""
    batch, _, hidden = x.shape
    shape, strides = caches[0][0].shape, caches[0][0].stride()
    return (shape[0] == batch and shape[1] == heads and shape[2] > position and shape[3] == hidden // heads
            and all(k.shape == shape and k.stride() == strides and cache_suits(k, v, x.dtype) for k, v in caches))


def decode_layers(x: torch.Tensor, plans: list[bytes], caches: list[tuple[torch.Tensor, torch.Tensor]],
                  position: int, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """A run of decoder layers for one new token per sequence, in one native call: x [B, 1, H] bf16 -> the last
    layer's output. `plans`: each layer's `layer_plan`; `caches`: each layer's (keys, values) buffers; the rest as
    for `decode_attention`. Every value the module path (neoxja.modeling.Layer) stores in bf16 is rounded here at
    the same point; the layer norms and the GELU (erf from a 1.2e-7 fit) use their own fp32 arithmetic, so outputs
    agree with the module path to within one bf16 rounding of a few elements."""
    batch, _, hidden = x.shape
    if (not decode_ready(x, heads) or not plans or len(plans) != len(caches) or any(p is None for p in plans)
            or not _caches_suit(caches, x, heads, position)):
        raise InputError("decode_layers: these tensors do not suit the native kernel (check decode_ready and "
                         "layer_plan; each layer's cache must be [batch, heads, > position, head_dim] in x's dtype)")
    x = x.contiguous()
    out = torch.empty_like(x)
    cos, sin, mask, strides = _attention_inputs(x.dtype, batch, cos, sin, caches[0][0], position, mask)
    pointers = array("Q", [t.data_ptr() for pair in caches for t in pair]).tobytes()
    _native.decode_layers(x.data_ptr(), out.data_ptr(), batch, hidden, heads, b"".join(plans), pointers,
                          cos.data_ptr(), sin.data_ptr(), cos.shape[-1], *strides, position,
                          0 if mask is None else mask.data_ptr(), torch.get_num_threads())
    return out
