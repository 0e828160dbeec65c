"""Weight-only quantization with the bitsandbytes API and checkpoint format, running on CPU.

This module owns:
- `BitsAndBytesConfig`, the transformers-compatible configuration (`quantization_config=` of from_pretrained, and the
  `"quantization_config"` entry of config.json);
- the number formats, bit-exact with bitsandbytes (see shared/docs/reference-spec.md §7): blockwise 4-bit NF4/FP4
  with blocksize 64, double quantization of the absmax values (signed dynamic 8-bit map, blocks of 256), and int8
  with one absmax per output row (LLM.int8()'s weight format);
- the modules `Int8Linear` and `Linear4bit`, which save and load bitsandbytes' state-dict keys (`Linear8bitLt`,
  `Linear4bit`), so checkpoints move between neoxja and transformers+bitsandbytes;
- replacing a model's `nn.Linear` layers: `quantize_model` (from float weights) and `prepare_quantized_model` (empty
  layers that a pre-quantized checkpoint fills).

The arithmetic lives in neoxja.kernels. Both layers compute y = x·Wᵀ (+ bias) with W decoded exactly to fp32 and
fp32 accumulation, returning the activations' dtype; `dequantize()` returns that W.

Loading, as neoxja.loading uses it:
- quantize at load: build the model, load the float weights, then `quantize_loaded_model(model, config, dtype)`;
- pre-quantized checkpoint: `prepare_quantized_model(model, saved_config, requested_config, dtype)` on the meta
  skeleton, then `model.load_state_dict(tensors, strict=False, assign=True)`. Before loading, the quantized layers'
  state_dict() lists each key they read as a meta tensor with the checkpoint's dtype and shape (the JSON key
  `*.quant_state.bitsandbytes__*` has shape [0]: its length varies); `quantized_state_keys(model)` names those
  keys, whose tensors must reach load_state_dict as stored: they are not in the model's dtype. `*.weight_format`
  (int8 checkpoints written by transformers) is an obsolete marker that neoxja neither needs nor writes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from functools import lru_cache
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import kernels
from .errors import CheckpointError, ConfigError, InputError

BLOCKSIZE = 64  # 4-bit: weights per absmax (bitsandbytes' Params4bit default)
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per second-level scale

# The NF4 code book, verbatim from bitsandbytes (quantiles of N(0, 1), normalized to [-1, 1]).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit; bias 3) as bitsandbytes defines it in functional.get_4bit_type("fp4"):
# index = sign*8 + 3 bits, the 3 bits in bit-pattern (not value) order, divided by the largest magnitude, 12.
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# FP4 quantization follows bitsandbytes' CUDA kernel dQuantizeFP4 (csrc/kernels.cu): sign bit from x < 0, then a
# decision tree on |x| whose float32 pivots, ascending, separate the magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1
# (3-bit patterns 0, 1, 6, 7, 4, 5, 2, 3); a value equal to a pivot takes the lower magnitude.
FP4_PIVOTS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_PATTERN_BY_RANK = (0, 1, 6, 7, 4, 5, 2, 3)
QUANT_TYPES = ("fp4", "nf4")


# ---------------------------------------------------------------------------------------------------------------
# Code books


@lru_cache(maxsize=None)
def _code(quant_type: str) -> Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    values = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32)
    return values / 12.0  # fp32 division, as bitsandbytes normalizes (-0.0 stays -0.0 at index 8)


def code_book(quant_type: str) -> Tensor:
    """The 16 fp32 values of the "nf4" or "fp4" code (a fresh copy: safetensors refuses shared tensors)."""
    _check_quant_type(quant_type)
    return _code(quant_type).clone()


@lru_cache(maxsize=None)
def _dynamic_map() -> Tensor:
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()  # fp32 products
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
    256 sorted fp32 values in [-0.99296875, 1], a single 0 at index 127. Used for the double-quantized absmax."""
    return _dynamic_map().clone()


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


# ---------------------------------------------------------------------------------------------------------------
# Blockwise 4-bit quantization (bitsandbytes' quantize_4bit / dequantize_4bit)


def _blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Split into blocks (the last may be partial); return (absmax per block, values scaled to [-1, 1]).
    Scaling multiplies by the fp32 reciprocal of max(absmax, 1e-38), as bitsandbytes' CUDA kernels do."""
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    return absmax, scaled.view(-1)[:n]


def _code_indices(s: Tensor, quant_type: str) -> Tensor:
    """Code index (uint8) of each value of `s` (already scaled to [-1, 1])."""
    if quant_type == "nf4":
        code = _code("nf4")
        thresholds = (code[:-1] + code[1:]) / 2  # fp32 midpoints; on a midpoint the lower index wins
        return torch.bucketize(s, thresholds, out_int32=True).to(torch.uint8)
    rank = torch.bucketize(s.abs(), torch.tensor(FP4_PIVOTS, dtype=torch.float32), out_int32=True)
    pattern = torch.tensor(FP4_PATTERN_BY_RANK, dtype=torch.uint8)[rank.long()]
    return pattern | ((s < 0).to(torch.uint8) << 3)


def _quantize_4bit_indices(weight: Tensor, quant_type: str) -> tuple[Tensor, Tensor]:
    """weight (any float dtype, any shape) -> (code indices uint8, flattened row-major; absmax fp32 per 64)."""
    _check_quant_type(quant_type)
    flat = weight.detach().reshape(-1)
    native = kernels.quantize_4bit_native(flat, quant_type == "nf4")
    if native is not None:
        return native
    absmax, s = _blocks(flat.float(), BLOCKSIZE)
    return _code_indices(s, quant_type), absmax


def _pack_pairs(indices: Tensor, quant_type: str) -> Tensor:
    """bitsandbytes' 4-bit storage: element 2k in the high nibble, 2k+1 in the low one; uint8 [ceil(n/2), 1].
    An odd count is padded with the code of 0.0, as bitsandbytes pads the values."""
    if indices.numel() % 2:
        indices = torch.cat((indices, _code_indices(torch.zeros(1), quant_type)))
    return ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)


def _unpack_pairs(packed: Tensor, n: int) -> Tensor:
    b = packed.reshape(-1)
    return torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:n]


def quantize_4bit(weight: Tensor, quant_type: str = "nf4") -> tuple[Tensor, Tensor]:
    """bitsandbytes' blockwise 4-bit quantization (blocksize 64) of `weight`, flattened row-major.

    Returns (packed uint8 [ceil(n/2), 1], absmax fp32 [ceil(n/64)]), bit-exact with bitsandbytes (reference-spec
    §7.3; NF4 compares against the fp32 midpoints of the code, FP4 follows the CUDA decision tree)."""
    indices, absmax = _quantize_4bit_indices(weight, quant_type)
    return _pack_pairs(indices, quant_type), absmax


def dequantize_4bit(packed: Tensor, absmax: Tensor, shape: Iterable[int], quant_type: str = "nf4",
                    dtype: torch.dtype = torch.float32, code: Tensor | None = None) -> Tensor:
    """Inverse of quantize_4bit: code[index] * absmax of its block in fp32, then cast to `dtype` (`code`: a stored
    code book, default the quant_type's)."""
    shape = tuple(shape)
    n = int(torch.Size(shape).numel())
    values = (_code(quant_type) if code is None else code.float())[_unpack_pairs(packed, n).long()]
    pad = -n % BLOCKSIZE
    w = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCKSIZE) * absmax.float()[:, None]
    return w.view(-1)[:n].view(shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Double quantization of the absmax values


def _nearest_dynamic_code(s: Tensor) -> Tensor:
    """Index into the dynamic map for values in [-1, 1], simulating bitsandbytes' CUDA dQuantize binary search
    (reference-spec §7.4): it equals the nearest entry, and at exact midpoints follows the search path."""
    code = _dynamic_map()
    pivot = torch.full(s.shape, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(s, -1.0), torch.full_like(s, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = s > val
        lower_pivot, lower = torch.where(up, pivot, lower_pivot), torch.where(up, val, lower)
        upper_pivot, upper = torch.where(up, upper_pivot, pivot), torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(s > (upper + val) / 2, upper_pivot, pivot)
    below = torch.where(s < (lower + val) / 2, lower_pivot, pivot)
    return torch.where(s > val, above, below).to(torch.uint8)


def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, float]:
    """Compress fp32 absmax values (compress_statistics=True): subtract their mean, quantize blockwise (256) with
    the dynamic map. Returns (codes uint8 [n], nested_absmax fp32 [ceil(n/256)], offset)."""
    offset = absmax.float().mean()
    nested_absmax, s = _blocks(absmax.float() - offset, NESTED_BLOCKSIZE)
    return _nearest_dynamic_code(s), nested_absmax, offset.item()


def double_dequantize(codes: Tensor, nested_absmax: Tensor, offset: float, code: Tensor | None = None) -> Tensor:
    """absmax = code[q] * nested_absmax[block // 256] + offset, in fp32 (`code`: the stored map, default ours)."""
    code = _dynamic_map() if code is None else code.float()
    n = codes.numel()
    pad = -n % NESTED_BLOCKSIZE
    values = torch.nn.functional.pad(code[codes.reshape(-1).long()], (0, pad)).view(-1, NESTED_BLOCKSIZE)
    return (values * nested_absmax.float()[:, None]).view(-1)[:n] + torch.tensor(offset, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# int8 with one absmax per output row


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [N, K], SCB fp32 [N]) with q = round(w * 127 / SCB), SCB = max |w| of the row: bitsandbytes'
    int8_vectorwise_quant, applied to the fp32 value of the weight (bitsandbytes first casts to fp16, which changes
    nothing for fp16/bf16 checkpoints except weights below fp16's normal range). All-zero rows give q = 0."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scb = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows in kernels.row_blocks(w.shape[0], w.shape[1]):
        block = w[rows].float()
        scb[rows] = absmax = block.abs().amax(dim=1)
        q[rows] = torch.where(absmax[:, None] > 0, torch.round(block * (127.0 / absmax)[:, None]), 0)
    return q, scb


# ---------------------------------------------------------------------------------------------------------------
# Modules


class _QuantizedLinear(nn.Module):
    """What Int8Linear and Linear4bit share: shape, bias, and the rules for casting and loading."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) \
            if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _apply(self, fn, recurse: bool = True):
        # Moving is fine; casting would corrupt the fp32 quantization state (transformers forbids it too).
        if fn(torch.zeros(())).dtype != torch.float32:
            raise InputError(f"{type(self).__name__} cannot be cast to another dtype: cast the model before "
                             f"quantizing it (outputs follow the activations' dtype anyway)")
        return super()._apply(fn, recurse)

    def _checkpoint_keys(self) -> list[str]:
        raise NotImplementedError

    def _checkpoint_tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load_checkpoint_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, tensor in self._checkpoint_tensors().items():
            destination[prefix + key] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        mine = {key[len(prefix):]: t for key, t in state_dict.items() if key.startswith(prefix)}
        mine.pop("weight_format", None)  # obsolete bitsandbytes marker; "row" is the only layout
        where = prefix.rstrip(".") or type(self).__name__
        if self.bias is not None:
            if "bias" not in mine:
                raise CheckpointError(f"{where}: the checkpoint lacks {prefix}bias")
            self.bias = nn.Parameter(mine.pop("bias").to(self.bias.dtype).clone(), requires_grad=False)
        self._load_checkpoint_tensors(mine, where)

    @staticmethod
    def _take(tensors: dict[str, Tensor], key: str, where: str, dtype: torch.dtype, numel: int) -> Tensor:
        if key not in tensors:
            raise CheckpointError(f"{where}: the checkpoint lacks {where}.{key} (not a bitsandbytes checkpoint of "
                                  f"this quantization type?)")
        t = tensors.pop(key)
        if t.dtype != dtype or t.numel() != numel:
            raise CheckpointError(f"{where}.{key} is {t.dtype} with {t.numel()} elements, expected {dtype} with "
                                  f"{numel} elements")
        return t.reshape(-1)

    @staticmethod
    def _no_leftovers(tensors: dict[str, Tensor], where: str) -> None:
        if tensors:
            raise CheckpointError(f"{where}: unexpected checkpoint keys {sorted(tensors)} for this quantized layer")


class Int8Linear(_QuantizedLinear):
    """Weight-only int8 linear layer: W = weight [N, K] int8 * SCB [N] / 127 (bitsandbytes' Linear8bitLt format:
    keys `weight` and `SCB`). Activations stay in their dtype (no LLM.int8() activation quantization)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"),
                             persistent=False)
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device="meta"), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        layer.weight, layer.SCB = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self) -> Tensor:
        return kernels.dequantize_int8(self.weight, self.SCB)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear_int8(x, self.weight, self.SCB, self.bias)

    def gemv_spec(self) -> kernels.GemvSpec | None:
        """This layer as the GEMV kernel reads it (for kernels.layer_plan), or None when it does not suit."""
        if self.in_features % 32 or not self.weight.is_contiguous():
            return None
        return ("int8", self.weight, self.SCB, None, self.bias, self.in_features)

    def _checkpoint_keys(self) -> list[str]:
        return ["weight", "SCB"]

    def _checkpoint_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "SCB": self.SCB}

    def _load_checkpoint_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        n, k = self.out_features, self.in_features
        # Views of the checkpoint's (memory-mapped) tensors: the kernels only read them.
        self.weight = self._take(tensors, "weight", where, torch.int8, n * k).reshape(n, k)
        self.SCB = self._take(tensors, "SCB", where, torch.float32, n).contiguous()
        self._no_leftovers(tensors, where)


class Linear4bit(_QuantizedLinear):
    """Weight-only 4-bit linear layer (NF4 or FP4, one absmax per 64 weights, optionally double-quantized absmax).

    Saved and loaded in bitsandbytes' Linear4bit format (reference-spec §7.6). When in_features is a multiple of 64
    (every layer of the real models), blocks never straddle rows and the weights are kept in the kernels' runtime
    layout (`kernels.pack_4bit`) with the absmax decoded once (to bf16 or fp16 where that is exact, else fp32:
    `kernels.narrow_absmax`). Otherwise (small models such as the demo model) they stay in bitsandbytes' flat
    layout and each call dequantizes them: slower, same numbers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "fp4",
                 compress_statistics: bool = False, dtype: torch.dtype = torch.float32) -> None:
        _check_quant_type(quant_type)
        super().__init__(in_features, out_features, bias, dtype)
        self.quant_type, self.compress_statistics, self.weight_dtype = quant_type, compress_statistics, dtype
        self.row_blocks = in_features % BLOCKSIZE == 0
        n, k, kp = out_features, in_features, (in_features + 127) // 128 * 128
        nblocks = -(-n * k // BLOCKSIZE)
        qweight_shape, absmax_shape = ((n, kp // 2), (n, kp // 64)) if self.row_blocks else \
            (((n * k + 1) // 2, 1), (nblocks,))
        self.register_buffer("qweight", torch.empty(qweight_shape, dtype=torch.uint8, device="meta"), persistent=False)
        self.register_buffer("absmax", torch.empty(absmax_shape, device="meta"), persistent=False)
        self.register_buffer("code", code_book(quant_type), persistent=False)
        # The double-quantized absmax, kept only to save it again unchanged.
        self.nested: tuple[Tensor, Tensor, float] | None = (
            torch.empty(nblocks, dtype=torch.uint8, device="meta"),
            torch.empty(-(-nblocks // NESTED_BLOCKSIZE), device="meta"), 0.0) if compress_statistics else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", compress_statistics: bool = False) -> Linear4bit:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type,
                    compress_statistics, linear.weight.dtype)
        indices, absmax = _quantize_4bit_indices(linear.weight, quant_type)
        if compress_statistics:
            layer.nested = double_quantize(absmax)
            absmax = double_dequantize(*layer.nested)
        layer._set_runtime(indices, absmax)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _set_runtime(self, indices: Tensor, absmax: Tensor) -> None:
        n, k = self.out_features, self.in_features
        if self.row_blocks:
            self.qweight = kernels.pack_4bit(indices.view(n, k))
            self.absmax = kernels.narrow_absmax(kernels.pad_absmax(absmax, n, k))
        else:
            self.qweight, self.absmax = _pack_pairs(indices, self.quant_type), absmax.float().contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}, double_quant={self.compress_statistics}"

    def dequantize(self) -> Tensor:
        if self.row_blocks:
            return kernels.dequantize_4bit(self.qweight, self.absmax, self.code, self.in_features)
        return dequantize_4bit(self.qweight, self.absmax, (self.out_features, self.in_features), code=self.code)

    def gemv_spec(self) -> kernels.GemvSpec | None:
        """This layer as the GEMV kernel reads it (for kernels.layer_plan), or None in the flat layout."""
        return ("4bit", self.qweight, self.absmax, self.code, self.bias, self.in_features) if self.row_blocks else None

    def forward(self, x: Tensor) -> Tensor:
        if self.row_blocks:
            return kernels.linear_4bit(x, self.qweight, self.absmax, self.code, self.in_features, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.dequantize(), bias).to(x.dtype)

    def _checkpoint_keys(self) -> list[str]:
        nested = ["weight.nested_absmax", "weight.nested_quant_map"] if self.nested is not None else []
        return ["weight", "weight.absmax", "weight.quant_map", *nested,
                f"weight.quant_state.bitsandbytes__{self.quant_type}"]

    def _checkpoint_tensors(self) -> dict[str, Tensor]:
        n, k = self.out_features, self.in_features
        info: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": BLOCKSIZE,
                                "dtype": str(self.weight_dtype).replace("torch.", ""), "shape": [n, k]}
        if self.qweight.is_meta:  # an empty layer: the shapes and dtypes a checkpoint must have
            values = [torch.empty((n * k + 1) // 2, 1, dtype=torch.uint8, device="meta")]
        else:
            values = [_pack_pairs(kernels.unpack_4bit(self.qweight, k).reshape(-1), self.quant_type)
                      if self.row_blocks else self.qweight]
        if self.nested is None:
            values.append(self.absmax[:, : k // BLOCKSIZE].float().reshape(-1) if self.row_blocks else self.absmax)
        else:
            values.append(self.nested[0])
        values.append(self.code.clone())
        if self.nested is not None:
            values += [self.nested[1], dynamic_map()]
            info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested[2])
        values.append(torch.empty(0, dtype=torch.uint8, device="meta") if self.qweight.is_meta else
                      torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8))
        return dict(zip(self._checkpoint_keys(), values))

    def _load_checkpoint_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        n, k = self.out_features, self.in_features
        nblocks = -(-n * k // BLOCKSIZE)
        info = self._quant_state(tensors, where)
        if "weight" in tensors:  # any quant_storage dtype holds the same bytes
            tensors["weight"] = tensors["weight"].contiguous().view(torch.uint8)
        weight = self._take(tensors, "weight", where, torch.uint8, (n * k + 1) // 2)
        code = self._take(tensors, "weight.quant_map", where, torch.float32, 16)
        if "nested_offset" in info:
            q8 = self._take(tensors, "weight.absmax", where, torch.uint8, nblocks)
            nested_absmax = self._take(tensors, "weight.nested_absmax", where, torch.float32,
                                       -(-nblocks // NESTED_BLOCKSIZE))
            nested_code = self._take(tensors, "weight.nested_quant_map", where, torch.float32, 256)
            self.nested = (q8.clone(), nested_absmax.clone(), float(info["nested_offset"]))
            absmax = double_dequantize(q8, nested_absmax, self.nested[2], nested_code)
        else:
            self.nested = None
            absmax = self._take(tensors, "weight.absmax", where, torch.float32, nblocks)
        self._no_leftovers(tensors, where)
        self.compress_statistics = self.nested is not None
        self.weight_dtype = getattr(torch, str(info.get("dtype", "float32")), torch.float32)
        self.code = code.clone()
        self._set_runtime(_unpack_pairs(weight, n * k), absmax)

    def _quant_state(self, tensors: dict[str, Tensor], where: str) -> dict[str, Any]:
        keys = [key for key in tensors if key.startswith("weight.quant_state.bitsandbytes__")]
        if len(keys) != 1:
            raise CheckpointError(f"{where}: expected one weight.quant_state.bitsandbytes__<type> entry, found "
                                  f"{keys or 'none'}")
        try:
            info = json.loads(bytes(tensors.pop(keys[0]).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{where}.{keys[0]} is not the JSON bitsandbytes writes") from None
        expected = {"quant_type": self.quant_type, "blocksize": BLOCKSIZE, "shape": [self.out_features,
                                                                                     self.in_features]}
        found = {key: info.get(key) for key in expected}
        found["shape"] = list(found["shape"] or [])
        if found != expected:
            raise CheckpointError(f"{where}: the checkpoint's 4-bit state {found} does not match this layer "
                                  f"{expected} (config.json's quantization_config and the weights disagree)")
        return info


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def _dtype_name(value: Any, field: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, value.replace("torch.", ""))
    raise ConfigError(f"{field} must be a torch dtype or its name (e.g. 'bfloat16'), got {value!r}")


@dataclasses.dataclass(init=False)
class BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig, same fields and defaults, for CPU weight-only quantization.

    On CPU some fields have no work to do; they are accepted, validated and saved so configs round-trip:
    - llm_int8_threshold: LLM.int8() splits activation columns above it into an fp16 matmul because it quantizes
      activations to int8. neoxja never quantizes activations (int8 weights, fp32 arithmetic), so nothing needs the
      split and the value has no effect.
    - llm_int8_enable_fp32_cpu_offload: is about modules a device_map leaves on the CPU; here everything is on the CPU.
    - bnb_4bit_compute_dtype: the 4-bit layers compute in fp32 and return the activations' dtype. bitsandbytes itself
      replaces compute_dtype by the input's dtype for fp32 and bf16 inputs, so results agree.
    Not supported: llm_int8_has_fp16_weight=True (keeps fp16 master weights for training) and
    bnb_4bit_quant_storage other than uint8 (a layout for sharded GPU training); both raise ConfigError."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype = torch.float32
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype = torch.uint8

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: list[str] | None = None, llm_int8_enable_fp32_cpu_offload: bool = False,
                 llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype: torch.dtype | str | None = None,
                 bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                 bnb_4bit_quant_storage: torch.dtype | str | None = None) -> None:
        for name in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
                     "bnb_4bit_use_double_quant"):
            if not isinstance(locals()[name], bool):
                raise ConfigError(f"{name} must be True or False, got {locals()[name]!r}")
        if load_in_8bit and load_in_4bit:
            raise ConfigError("load_in_8bit and load_in_4bit are both True: choose one")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise ConfigError(f"llm_int8_threshold must be a number, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and (
                isinstance(llm_int8_skip_modules, str)
                or not all(isinstance(m, str) for m in llm_int8_skip_modules)):
            raise ConfigError(f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}")
        for entry in llm_int8_skip_modules or ():
            _skip_pattern(entry)
        if llm_int8_has_fp16_weight:
            raise ConfigError("llm_int8_has_fp16_weight=True (fp16 master weights for training) is not supported; "
                              "neoxja keeps only the int8 weights")
        _check_quant_type(bnb_4bit_quant_type)
        storage = _dtype_name("uint8" if bnb_4bit_quant_storage is None else bnb_4bit_quant_storage,
                              "bnb_4bit_quant_storage")
        if storage != torch.uint8:
            raise ConfigError(f"bnb_4bit_quant_storage={storage} is not supported: neoxja stores 4-bit weights as "
                              f"uint8 (bitsandbytes' default)")
        self.load_in_8bit, self.load_in_4bit = load_in_8bit, load_in_4bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None else list(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_compute_dtype = _dtype_name(bnb_4bit_compute_dtype or torch.float32, "bnb_4bit_compute_dtype")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_quant_storage = storage

    @property
    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def to_dict(self) -> dict[str, Any]:
        """The dict transformers writes as config.json's "quantization_config" (dtypes as names)."""
        out: dict[str, Any] = {"quant_method": "bitsandbytes", "_load_in_8bit": self.load_in_8bit,
                               "_load_in_4bit": self.load_in_4bit}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BitsAndBytesConfig:
        """From to_dict()'s output or a checkpoint's "quantization_config"; unknown keys are ignored with a warning."""
        config = dict(config)
        method = config.pop("quant_method", "bitsandbytes")
        if method != "bitsandbytes":
            raise ConfigError(f"quantization_config has quant_method={method!r}; neoxja reads only 'bitsandbytes'")
        for private in ("_load_in_8bit", "_load_in_4bit"):
            public = private[1:]
            config.setdefault(public, config.pop(private, False))
            config.pop(private, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            warnings.warn(f"quantization_config: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in config.items() if k in known})


def _as_config(config: BitsAndBytesConfig | dict[str, Any]) -> BitsAndBytesConfig:
    if isinstance(config, BitsAndBytesConfig):
        return config
    if isinstance(config, dict):
        return BitsAndBytesConfig.from_dict(config)
    raise ConfigError(f"quantization_config must be a BitsAndBytesConfig or a dict, got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Replacing a model's linear layers


@lru_cache(maxsize=256)
def _skip_pattern(entry: str) -> re.Pattern:
    try:
        return re.compile(entry)
    except re.error as e:
        raise ConfigError(f"llm_int8_skip_modules entry {entry!r} is not a valid regular expression: {e}") from None


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """transformers 5's rule for modules_to_not_convert. An entry skips a module when it is a plain suffix of the
    module's name ("dense_4h_to_h" skips every layer's), or when, read as a regular expression, it matches the
    name's start up to a module boundary: "gpt_neox.layers.1" skips layer 1 and not layer 11, "gpt_neox.layers.*"
    skips them all, and "layers.1" nothing (names start with the body's prefix)."""
    ends = [i for i, c in enumerate(name) if c == "."]
    boundaries = sorted(set(ends) | {i + 1 for i in ends} | {len(name)})  # just before or just after a dot, or the end
    for entry in skip:
        pattern = _skip_pattern(entry)
        if name.endswith(entry) or any(pattern.fullmatch(name, 0, end) for end in boundaries):
            return True
    return False


def default_skip_modules(model: nn.Module) -> set[str]:
    """transformers' modules to keep in float: the output embedding (the head) and the module of the last parameter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    last = [name for name, _ in model.named_parameters()][-1:]
    names.update(name.rsplit(".", 1)[0] for name in last if "." in name)
    return names


def kept_in_float(model: nn.Module, config: BitsAndBytesConfig) -> set[str]:
    """The modules from_pretrained leaves in float, as transformers picks them: default_skip_modules when
    llm_int8_skip_modules is None; a list given replaces those defaults (so [] quantizes the head too)."""
    if config.llm_int8_skip_modules is None:
        return default_skip_modules(model)
    return set(config.llm_int8_skip_modules)


def _replace_linears(model: nn.Module, skip: set[str], make) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def names(name: str, module: nn.Module) -> tuple[str, ...]:
        # the head answers to both names it goes by: transformers 5 calls rinna's (gpt_neox) head lm_head, the
        # ABEJA model's and every checkpoint's is embed_out
        return (name, "lm_head") if module is head else (name,)

    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(_skipped(n, skip) for n in names(name, module))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(linear))


def quantize_model(model: nn.Module, config: BitsAndBytesConfig | dict[str, Any],
                   skip_modules: Iterable[str] = ()) -> None:
    """Replace, in place, every nn.Linear of `model` (with its float weights loaded) by Int8Linear or Linear4bit,
    except the modules named in `skip_modules` or config.llm_int8_skip_modules. Each float weight is released as
    soon as it is quantized."""
    config = _as_config(config)
    if not config.is_quantizable:
        raise ConfigError("quantization_config asks for nothing: set load_in_8bit=True or load_in_4bit=True")

    def make(linear: nn.Linear) -> nn.Module:
        if config.load_in_8bit:
            return Int8Linear.from_linear(linear)
        return Linear4bit.from_linear(linear, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant)

    with torch.no_grad():
        _replace_linears(model, set(skip_modules) | set(config.llm_int8_skip_modules or ()), make)


def quantized_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys held by quantized layers whose tensors must be loaded as stored (not cast to the model's
    dtype): everything of Int8Linear/Linear4bit except the bias."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedLinear):
            prefix = f"{name}." if name else ""
            keys.update(prefix + key for key in module._checkpoint_keys())
    return keys


def quantize_loaded_model(model: nn.Module, quantization_config: BitsAndBytesConfig | dict[str, Any]) -> None:
    """Quantize-at-load: `model` has its float weights. Quantizes all linear layers but those kept_in_float picks,
    and records the config in model.config (config.json's "quantization_config")."""
    config = _as_config(quantization_config)
    quantize_model(model, config, kept_in_float(model, config))
    _record(model, config)


def prepare_quantized_model(model: nn.Module, saved_quantization: dict[str, Any] | None,
                            quantization_config: BitsAndBytesConfig | dict[str, Any] | None,
                            dtype: torch.dtype) -> None:
    """Before the weights load. For a pre-quantized checkpoint (`saved_quantization`, its config.json entry), replace
    the linear layers by empty quantized layers that load_state_dict fills (see the module docstring); a
    `quantization_config` passed as well must agree with it. With only `quantization_config`, check it: the model is
    quantized after loading, by quantize_loaded_model."""
    requested = None if quantization_config is None else _as_config(quantization_config)
    if requested is not None and not requested.is_quantizable:
        raise ConfigError("quantization_config asks for nothing: set load_in_8bit=True or load_in_4bit=True")
    if saved_quantization is None:
        return
    saved = _as_config(saved_quantization)
    if not saved.is_quantizable:
        raise CheckpointError("config.json's quantization_config has neither load_in_8bit nor load_in_4bit set")
    if requested is not None and (requested.load_in_8bit, requested.bnb_4bit_quant_type) != \
            (saved.load_in_8bit, saved.bnb_4bit_quant_type):
        raise ConfigError("the checkpoint is already quantized with a different quantization_config; load it "
                          "without quantization_config, or quantize its float original instead")

    def make(linear: nn.Linear) -> nn.Module:
        bias = linear.bias is not None
        if saved.load_in_8bit:
            return Int8Linear(linear.in_features, linear.out_features, bias, dtype)
        return Linear4bit(linear.in_features, linear.out_features, bias, saved.bnb_4bit_quant_type,
                          saved.bnb_4bit_use_double_quant, dtype)

    _replace_linears(model, kept_in_float(model, saved), make)
    _record(model, saved)


def _record(model: nn.Module, config: BitsAndBytesConfig) -> None:
    model_config = getattr(model, "config", None)
    if model_config is not None and isinstance(getattr(model_config, "extra", None), dict):
        model_config.extra["quantization_config"] = config.to_dict()
