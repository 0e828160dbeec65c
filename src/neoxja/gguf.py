"""Writing GGUF files, llama.cpp's model format (version 3), without the `gguf` package.

A file is: the magic "GGUF", the version, the tensor and metadata counts; the metadata as typed key/value pairs;
one info record per tensor (name, dimensions innermost first, element type, offset into the data section); then
the data section, aligned to 32 bytes, with every tensor's bytes starting on a 32-byte boundary. All integers are
little-endian; strings are a u64 byte length followed by UTF-8.

Tensors are written one at a time from a callable, so a model is never held twice in memory. Element types: F32,
F16, BF16 (both rounded to nearest even, as torch does) and Q8_0 (blocks of 32 values along the innermost
dimension: an f16 scale amax/127 and 32 int8 values x/scale rounded half away from zero, as ggml's reference
quantizer does). This module knows the format only; neoxja.convert decides names, metadata and types."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .files import atomic_path

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32
Q8_0_BLOCK = 32


class ValueType(IntEnum):
    """Metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class TensorType(IntEnum):
    """The ggml element types neoxja writes."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    BF16 = 30


_SCALAR_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}  # fmt: skip


@dataclass
class TensorEntry:
    """One tensor to write: `shape` in torch order (outermost first); `data()` returns its encoded bytes."""

    name: str
    shape: tuple[int, ...]
    type: TensorType
    data: Callable[[], bytes]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        if self.type == TensorType.Q8_0:
            return count // Q8_0_BLOCK * (2 + Q8_0_BLOCK)
        return count * (4 if self.type == TensorType.F32 else 2)


class Metadata:
    """Typed key/value pairs, written in the order they were added. An array value is (element type, values)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, ValueType, Any]] = []

    def add(self, key: str, value_type: ValueType, value: Any) -> None:
        if any(key == existing for existing, _, _ in self.items):
            raise InputError(f"GGUF metadata key {key!r} given twice")
        self.items.append((key, value_type, value))

    def add_array(self, key: str, element_type: ValueType, values: Sequence[Any]) -> None:
        self.add(key, ValueType.ARRAY, (element_type, values))


def encode_tensor(tensor: Tensor, tensor_type: TensorType) -> bytes:
    """The bytes of `tensor` (any float dtype) stored as `tensor_type`, in row-major order."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor_type == TensorType.F32:
        return tensor.float().numpy().tobytes()
    if tensor_type == TensorType.F16:
        return tensor.half().numpy().tobytes()
    if tensor_type == TensorType.BF16:
        return tensor.bfloat16().view(torch.int16).numpy().tobytes()
    return _quantize_q8_0(tensor)


def _quantize_q8_0(tensor: Tensor) -> bytes:
    if tensor.shape[-1] % Q8_0_BLOCK:
        raise InputError(f"Q8_0 needs the innermost dimension to be a multiple of {Q8_0_BLOCK}, "
                         f"got shape {list(tensor.shape)}")
    blocks = tensor.float().reshape(-1, Q8_0_BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    scaled = blocks * inverse
    quants = (scaled.sign() * torch.floor(scaled.abs() + 0.5)).to(torch.int8)  # C's roundf, not half-to-even
    out = np.empty((blocks.shape[0], 2 + Q8_0_BLOCK), dtype=np.uint8)
    out[:, :2] = scale.half().numpy().view(np.uint8)
    out[:, 2:] = quants.numpy().view(np.uint8)
    return out.tobytes()


def write_gguf(path: str | os.PathLike, metadata: Metadata, tensors: Sequence[TensorEntry]) -> Path:
    """Write a GGUF file atomically; tensor data is produced and written one tensor at a time."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise InputError("GGUF tensor names must be unique")
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata.items))]
    for key, value_type, value in metadata.items:
        header += [_string(key), struct.pack("<I", value_type), _value(value_type, value)]
    offset = 0
    for entry in tensors:
        dims = entry.shape[::-1]  # ggml lists dimensions innermost first
        header += [_string(entry.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, entry.type, offset)]
        offset += _padded(entry.nbytes)
    head = b"".join(header)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(head + bytes(_padded(len(head)) - len(head)))
        for entry in tensors:
            data = entry.data()
            if len(data) != entry.nbytes:
                raise InputError(f"tensor {entry.name}: {len(data)} bytes of data, expected {entry.nbytes}")
            handle.write(data + bytes(_padded(len(data)) - len(data)))
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def _padded(size: int) -> int:
    return (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value_type: ValueType, value: Any) -> bytes:
    if value_type == ValueType.STRING:
        return _string(value)
    if value_type == ValueType.ARRAY:
        element_type, values = value
        head = struct.pack("<IQ", element_type, len(values))
        if element_type == ValueType.STRING:
            return head + b"".join(map(_string, values))
        if element_type == ValueType.ARRAY:
            raise InputError("nested GGUF arrays are not supported")
        return head + np.asarray(values, dtype=np.dtype(_SCALAR_FORMATS[element_type])).tobytes()
    return struct.pack(_SCALAR_FORMATS[value_type], value)
