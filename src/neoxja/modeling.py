"""The GPT-NeoX transformer, for both families, in one implementation.

ABEJA GPT-NeoX-Japanese and plain GPT-NeoX (rinna) differ only in switches read from the config: linear biases,
the last layer's separate attention-output bias (`dense_bias`), parallel vs sequential residual, embedding dropout,
and the parameter-name prefix. Module and parameter names follow the checkpoints, so state dicts load as they are:

    <prefix>.embed_in.weight                                    [V, H]
    <prefix>.layers.N.input_layernorm.{weight,bias}             [H]
    <prefix>.layers.N.attention.query_key_value.weight (+bias)  [3H, H]  (q|k|v interleaved per head)
    <prefix>.layers.N.attention.dense.weight (+bias)            [H, H]
    <prefix>.layers.N.attention.dense_bias                      [H]      (ABEJA, last layer only)
    <prefix>.layers.N.post_attention_layernorm.{weight,bias}    [H]
    <prefix>.layers.N.mlp.dense_h_to_4h.weight (+bias)          [I, H]
    <prefix>.layers.N.mlp.dense_4h_to_h.weight (+bias)          [H, I]
    <prefix>.final_layer_norm.{weight,bias}                     [H]
    embed_out.weight                                            [V, H]

Numerics: attention scores are formed in the activation dtype, masked and soft-maxed in float32, as plain
GPT-NeoX does; the reference's Japanese model soft-maxes in the activation dtype, which only differs in fp16/bf16
and is the safer choice there. Loading, saving and `generate` live in loading.py and generation.py; the methods
here only forward to them."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import GPTNeoXConfig, GPTNeoXJapaneseConfig, NeoXConfig
from .errors import InputError

IGNORE_INDEX = -100
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# ---------------------------------------------------------------------------------------------------------------
# Outputs: dicts with attribute access; integer indexing walks the fields that are set, like the reference's.
class ModelOutput(dict):
    fields: tuple[str, ...] = ()

    def __init__(self, **values: Any) -> None:
        super().__init__((k, values.get(k)) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in self.fields:
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.fields if k in self)


class BaseModelOutputWithPast(ModelOutput):
    fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")


class CausalLMOutputWithPast(ModelOutput):
    fields = ("loss", "logits", "past_key_values", "hidden_states", "attentions")


# ---------------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys (after RoPE) and values of every layer, in buffers allocated once and grown by doubling, so a decode
    step writes one position instead of concatenating the whole history."""

    def __init__(self, num_layers: int, capacity: int = 0, keep_plans: bool = False) -> None:
        self.num_layers = num_layers
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        # keep_plans (generate's cache): the first native decode step's layer plans serve every later step of this
        # cache, unchecked (checking them costs ~40 us per layer and token, whose weights streaming through have
        # evicted the modules from the caches), with the storages they point at, which they keep alive.
        self.keep_plans = keep_plans
        self.plans: tuple[list[nn.Module], list[bytes | None], list[Any]] | None = None

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        n = self.lengths[layer]
        if self.keys[layer] is None:
            raise IndexError(f"layer {layer} of the cache is empty")
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]  # type: ignore[index]

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append [B, NH, T, D] key/value; return views of everything cached for this layer."""
        start, new = self.lengths[layer], key.shape[2]
        self.reserve(layer, new, key, key.shape[:2], key.shape[3], value.shape[3])
        self.keys[layer][:, :, start:start + new] = key  # type: ignore[index]
        self.values[layer][:, :, start:start + new] = value  # type: ignore[index]
        self.lengths[layer] = start + new
        return self[layer]

    def reserve(self, layer: int, new: int, like: Tensor, batch_heads: tuple[int, int] | torch.Size, key_dim: int,
                value_dim: int) -> tuple[Tensor, Tensor]:
        """Make room for `new` more positions of [batch, heads] rows in `layer` (buffers get `like`'s dtype and
        device); returns the layer's whole key and value buffers."""
        buf = self.keys[layer]
        if buf is None or buf.shape[2] < self.lengths[layer] + new or buf.shape[0] != batch_heads[0]:
            old_k, old_v, n = buf, self.values[layer], self.lengths[layer]
            size = max(self.lengths[layer] + new, self.capacity, 2 * (old_k.shape[2] if old_k is not None else 0))
            self.keys[layer] = like.new_empty((*batch_heads, size, key_dim))
            self.values[layer] = like.new_empty((*batch_heads, size, value_dim))
            if old_k is not None and n:
                self.keys[layer][:, :, :n] = old_k[:, :, :n]  # type: ignore[index]
                self.values[layer][:, :, :n] = old_v[:, :, :n]  # type: ignore[index]
        return self.keys[layer], self.values[layer]  # type: ignore[return-value]

    def select_batch(self, index: Tensor) -> None:
        """Keep only the batch rows in `index` (in that order)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, index)  # type: ignore[union-attr]
                self.values[i] = self.values[i].index_select(0, index)  # type: ignore[union-attr]

    @classmethod
    def stack(cls, caches: list["KVCache"]) -> "KVCache":
        """One cache holding the batch rows of `caches`, in order. Shorter caches are padded with zeros on the
        left, so every row's latest position is the last column; the caller marks the padding with 0 in
        attention_mask and gives each row its own position_ids (continuous batching joins requests this way)."""
        num_layers = caches[0].num_layers
        if any(c.num_layers != num_layers for c in caches):
            raise InputError("cannot stack caches of models with different numbers of layers")
        out = cls(num_layers)
        for layer in range(num_layers):
            parts = [c[layer] for c in caches]
            length = max(k.shape[2] for k, _ in parts)
            out.keys[layer] = torch.cat([F.pad(k, (0, 0, length - k.shape[2], 0)) for k, _ in parts])
            out.values[layer] = torch.cat([F.pad(v, (0, 0, length - v.shape[2], 0)) for _, v in parts])
            out.lengths[layer] = length
        return out

    def crop_left(self, count: int) -> None:
        """Drop the `count` oldest positions of every layer (say, columns that are padding in every row)."""
        if not 0 <= count <= min(self.lengths):
            raise InputError(f"cannot drop {count} positions from a cache holding {min(self.lengths)}")
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, count:]  # type: ignore[index]
                self.values[i] = self.values[i][:, :, count:]  # type: ignore[index]
                self.lengths[i] -= count

    def to_legacy_cache(self) -> tuple[tuple[Tensor, Tensor], ...]:
        return tuple(self[i] for i in range(self.num_layers))

    @classmethod
    def from_legacy_cache(cls, past: Any, num_layers: int) -> "KVCache":
        cache = cls(num_layers)
        for i, (k, v) in enumerate(past):
            cache.update(i, k, v)
        return cache


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding: inverse frequencies per rope_type, then cos/sin for the given positions.
def rope_inv_freq(config: NeoXConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies over the rotary dimension and the cos/sin scaling for config.rope_parameters."""
    rope = config.rope_parameters
    kind, base, dim = rope["rope_type"], float(rope["rope_theta"]), config.rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    max_pos = config.max_position_embeddings
    if kind == "dynamic":
        seq_len = max(seq_len or max_pos, max_pos)
        factor = rope["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponent)
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    original = rope["original_max_position_embeddings"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    factor = rope.get("factor") or max_pos / original
    if kind == "yarn":
        return _yarn_inv_freq(rope, base, dim, original, factor, exponent)
    # longrope
    scaling = rope.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope["long_factor"] if seq_len and seq_len > original else rope["short_factor"]
    return 1.0 / (torch.tensor(ext, dtype=torch.float32, device="cpu") * base ** exponent), scaling


def _yarn_inv_freq(rope: dict, base: float, dim: int, original: int, factor: float,
                   exponent: Tensor) -> tuple[Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp over the rotary dims."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = rope.get("attention_factor")
    if scaling is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            scaling = float(mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"]))
        else:
            scaling = mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** exponent
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, scaling


class RotaryEmbedding:
    """cos/sin for position ids. Static rope types read a table grown on demand (no per-step trigonometry);
    `dynamic` and `longrope` recompute their frequencies from the longest position, as the reference does."""

    def __init__(self, config: NeoXConfig) -> None:
        self.config = config
        self.kind = config.rope_parameters["rope_type"]
        self.original_inv_freq, self.scaling = rope_inv_freq(config)
        self.inv_freq = self.original_inv_freq
        self.max_seq_len_cached = config.max_position_embeddings
        self.table: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, position_ids: Tensor, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin for `position_ids`, whose largest value is end - 1."""
        if self.kind in ("dynamic", "longrope"):
            self._update_frequencies(end)
            cos, sin = self._cos_sin(position_ids.float(), self.inv_freq.to(position_ids.device))
        else:
            cos_table, sin_table = self._table(position_ids.device, end)
            cos, sin = cos_table[position_ids], sin_table[position_ids]
        return cos.to(dtype), sin.to(dtype)

    def _cos_sin(self, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def _table(self, device: torch.device, length: int) -> tuple[Tensor, Tensor]:
        table = self.table.get(device)
        if table is None or table[0].shape[0] < length:
            size = max(length, self.config.max_position_embeddings, 2 * (table[0].shape[0] if table else 0))
            positions = torch.arange(size, device=device, dtype=torch.int64).float()
            table = self._cos_sin(positions, self.inv_freq.to(device))
            self.table[device] = table
        return table

    def _update_frequencies(self, seq_len: int) -> None:
        original = self.config.max_position_embeddings
        if self.kind == "longrope":
            long_threshold = self.config.rope_parameters["original_max_position_embeddings"]
            self.inv_freq, _ = rope_inv_freq(self.config, seq_len=seq_len if seq_len > long_threshold else None)
            return
        if seq_len > self.max_seq_len_cached:  # grown past what the frequencies were built for
            self.inv_freq, self.scaling = rope_inv_freq(self.config, seq_len=seq_len)
            self.max_seq_len_cached = seq_len
        if seq_len < original < self.max_seq_len_cached:  # back within the trained length: reset
            self.inv_freq, self.max_seq_len_cached = self.original_inv_freq, original


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x [..., D] half-split style (cos, sin [..., R] broadcast); the rest pass
    through."""
    rot_dim = cos.shape[-1]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos + rotated_half * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


# ---------------------------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """nn.Linear whose inference with bf16 weights runs on neoxja's kernels: decoding is a few rows times every
    weight, which PyTorch's bf16 matmul reads at about half the memory bandwidth (benchmarks/matmul.py). Training
    and other dtypes stay on F.linear."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            return kernels.linear_bf16(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def gemv_spec(self) -> kernels.GemvSpec | None:
        """This layer as the GEMV kernel reads it (for kernels.layer_plan), or None when its weight does not suit."""
        w = self.weight
        if w.dtype != torch.bfloat16 or not w.is_contiguous() or self.in_features % 32:
            return None
        return ("bf16", w, None, None, self.bias, self.in_features)


# ---------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: NeoXConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.layer_index = layer_index
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.query_key_value = Linear(hidden, 3 * hidden, bias=config.attention_bias)
        self.dense = Linear(hidden, hidden, bias=config.attention_bias)
        is_last = layer_index == config.num_hidden_layers - 1
        self.dense_bias = nn.Parameter(torch.zeros(hidden)) if config.last_layer_dense_bias and is_last else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                head_mask: Tensor | None = None, output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        batch, length, _ = x.shape
        qkv = self.query_key_value(x)
        dropout = self.dropout if self.training else 0.0
        if (length == 1 and cache is not None and not (output_attentions or head_mask is not None or dropout)
                and kernels.fused_decode_ready(qkv, self.num_heads)):  # decoding: rotary, cache write, attention
            keys, values = cache.reserve(self.layer_index, 1, qkv, (batch, self.num_heads), self.head_dim,
                                         self.head_dim)
            if kernels.cache_suits(keys, values, qkv.dtype):
                position = cache.lengths[self.layer_index]
                out = kernels.decode_attention(qkv, cos, sin, keys, values, position, self.num_heads, self.scale,
                                               mask)
                cache.lengths[self.layer_index] = position + 1
                return self._output(out), None
        qkv = qkv.view(batch, length, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        # queries and keys rotate together: half the elementwise calls, which a decode step pays per layer
        qk = apply_rotary(qkv[..., : 2 * self.head_dim].unflatten(-1, (2, self.head_dim)), cos[..., None, :],
                          sin[..., None, :])
        q, k = qk.unbind(-2)
        v = qkv[..., 2 * self.head_dim:]
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if output_attentions or head_mask is not None:
            out, probs = self._explicit_attention(q, k, v, mask, dropout, head_mask)
        else:
            causal = mask is None and length > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scale)
            probs = None
        return self._output(out.transpose(1, 2).reshape(batch, length, -1)), probs

    def _output(self, heads: Tensor) -> Tensor:
        out = self.dense(heads)
        return out + self.dense_bias if self.dense_bias is not None else out

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float,
                            head_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The textbook form, for when attention weights are returned or heads are masked."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], None, q.dtype, q.device)
        probs = torch.softmax(scores.float() + mask.float(), dim=-1)
        probs = F.dropout(probs, dropout, training=dropout > 0)
        if head_mask is not None:
            probs = probs * head_mask
        probs = probs.to(v.dtype)
        return torch.matmul(probs, v), probs


class MLP(nn.Module):
    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, config: NeoXConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, index)
        self.mlp = MLP(config)
        self.parallel = config.use_parallel_residual
        self.dropout = config.hidden_dropout
        self._plan: tuple[tuple | None, bytes | None] = (None, None)  # (_plan_key, decode_plan)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                head_mask: Tensor | None = None, output_attentions: bool = False) -> tuple[Tensor, Tensor | None]:
        attn, probs = self.attention(self.input_layernorm(x), cos, sin, mask, cache, head_mask, output_attentions)
        attn = self._dropout(attn)
        if self.parallel:  # both branches read the layer input
            return self._dropout(self.mlp(self.post_attention_layernorm(x))) + attn + x, probs
        x = attn + x
        return self._dropout(self.mlp(self.post_attention_layernorm(x))) + x, probs

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, True) if self.training and self.dropout else x

    def decode_plan(self) -> bytes | None:
        """This layer's fixed arguments for kernels.decode_layers (NeoXModel's decode step), kept until anything they
        point at changes; None when the layer must run its modules: hooks on it or inside it (the native step would
        silently skip them), submodules of other kinds, weights the kernel cannot read."""
        key = self._plan_key()
        if key is None:
            return None
        kept = self.__dict__.get("_plan", (None, None))  # absent in a Layer unpickled from before decode plans
        if kept[0] != key:
            kept = self._plan = (key, self._make_plan())
        return kept[1]

    def _plan_modules(self) -> tuple[nn.Module, ...] | None:
        """The modules a decode plan reads, through the module dicts (attribute access costs ~1 us each, per layer and
        token); None when they are not this class's."""
        attention, mlp = self._modules.get("attention"), self._modules.get("mlp")
        if not (isinstance(attention, Attention) and isinstance(mlp, MLP)):
            return None
        mods = (self, attention, mlp, self._modules.get("input_layernorm"),
                self._modules.get("post_attention_layernorm"), attention._modules.get("query_key_value"),
                attention._modules.get("dense"), mlp._modules.get("dense_h_to_4h"), mlp._modules.get("dense_4h_to_h"))
        return None if any(m is None for m in mods) else mods

    def _plan_key(self) -> tuple | None:
        """Everything the decode plan encodes, checked every step: which modules, their settings, and each tensor's
        storage, dtype, shape and strides (a plan holds raw pointers). None when a module has hooks."""
        mods = self._plan_modules()
        if mods is None or any(m._forward_hooks or m._forward_pre_hooks for m in mods):
            return None
        attention, mlp, norm1, norm2 = mods[1:5]
        tensors = _plan_tensors(mods)
        return (tuple(map(id, mods)), mlp.act, self.parallel, attention.num_heads, attention.scale,
                getattr(norm1, "eps", None), getattr(norm2, "eps", None),
                tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors))

    def plan_storages(self) -> list[Any]:
        """The storages of the tensors this layer's decode plan points at (see KVCache.keep_plans)."""
        mods = self._plan_modules()
        return [] if mods is None else [t.untyped_storage() for t in _plan_tensors(mods)]

    def _make_plan(self) -> bytes | None:
        attention, mlp = self.attention, self.mlp
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if mlp.act is not F.gelu or not all(isinstance(norm, nn.LayerNorm) for norm in norms):
            return None
        layers = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        specs = [getattr(layer, "gemv_spec", lambda: None)() for layer in layers]
        return kernels.layer_plan(specs, tuple((norm.weight, norm.bias, norm.eps) for norm in norms),
                                  attention.dense_bias, self.parallel, attention.num_heads, attention.scale)


def _plan_tensors(mods: tuple[nn.Module, ...]) -> list[Tensor]:
    """The parameters and buffers of a layer's plan modules (Layer._plan_modules) but the layer itself."""
    return [t for m in mods[1:] for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


def _global_hooks() -> bool:
    """Whether forward hooks for every module exist (nn.modules.module.register_module_forward_hook)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def causal_mask(new: int, total: int, attention_mask: Tensor | None, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Additive mask [B or 1, 1, new, total]: 0 where a query may attend (key not in its future and not padding),
    the dtype's most negative value elsewhere. A fully masked row (a left-padding query) thus becomes uniform
    rather than NaN, as in the reference."""
    past = total - new
    query_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= query_pos
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------------------
class PreTrainedModel(nn.Module):
    """What both the bare model and the LM share: config, init, device/dtype, and the loading entry points."""

    config_class: type[NeoXConfig] = NeoXConfig
    base_model_prefix = ""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise InputError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """Random weights as the reference initialises them."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            if isinstance(module, Attention) and module.dense_bias is not None:
                nn.init.zeros_(module.dense_bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def from_pretrained(cls, name_or_path: Any, *args: Any, **kwargs: Any) -> "PreTrainedModel":
        from .loading import load_pretrained

        return load_pretrained(cls, name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        from .loading import save_pretrained

        save_pretrained(self, save_directory, **kwargs)


class NeoXModel(PreTrainedModel):
    """The transformer body: embeddings, layers, final norm."""

    def __init__(self, config: NeoXConfig, init: bool = True) -> None:
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.embedding_dropout = config.hidden_dropout if isinstance(config, GPTNeoXConfig) else 0.0
        if init:
            self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_in

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        head_mask: Tensor | None = None,
        past_key_values: KVCache | Any | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: Tensor | None = None,
        **unused: Any,
    ) -> BaseModelOutputWithPast | tuple:
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        _reject_unknown(unused)

        x = self._embed(input_ids, inputs_embeds)
        batch, length = x.shape[:2]
        cache = self._cache(past_key_values, use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        positions, end = self._positions(position_ids, cache_position, batch, length, past, x.device)
        mask = self._mask(attention_mask, batch, length, past, x.dtype, x.device)
        cos, sin = self.rotary(positions, end, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        heads = _expand_head_mask(head_mask, config.num_hidden_layers)

        hidden_states: list[Tensor] = []
        attentions: list[Tensor] = []
        layers = list(self.layers)
        plans, caches = self._decode_plans(layers, x, cache, heads, output_attentions)
        i = 0
        while i < len(layers):
            if output_hidden_states:
                hidden_states.append(x)
            if plans[i] is None:
                x, probs = layers[i](x, cos, sin, mask, cache, heads[i], output_attentions)
                if output_attentions:
                    attentions.append(probs)  # type: ignore[arg-type]
                i += 1
                continue
            stop = i + 1  # a run of layers in one native call (one layer where each one's output is kept)
            while stop < len(layers) and plans[stop] is not None and not output_hidden_states:
                stop += 1
            position = cache.lengths[i]  # type: ignore[union-attr]
            x = kernels.decode_layers(x, plans[i:stop], caches[i:stop], position, cos, sin,  # type: ignore[arg-type]
                                      config.num_attention_heads, mask)
            cache.lengths[i:stop] = [position + 1] * (stop - i)  # type: ignore[union-attr]
            i = stop
        x = self.final_layer_norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()

    def _decode_plans(self, layers: list[nn.Module], x: Tensor, cache: KVCache | None,
                      head_masks: list[Tensor | None],
                      output_attentions: bool) -> tuple[list[bytes | None], list[tuple[Tensor, Tensor]]]:
        """Per layer its decode plan (Layer.decode_plan, or the plans the cache keeps: KVCache.keep_plans) when this
        step can run natively (kernels.decode_layers: one new token per sequence, bf16, no gradients, nothing asked
        of the layers but their output), else None; and every layer's KV cache buffers, made room in for the new
        token."""
        config, none = self.config, [None] * len(layers)
        if (cache is None or output_attentions or self.training or any(h is not None for h in head_masks)
                or not kernels.decode_ready(x, config.num_attention_heads) or _global_hooks()
                or len(set(cache.lengths)) != 1):
            return none, []
        count, dim = config.num_attention_heads, config.head_dim
        caches = [cache.reserve(i, 1, x, (x.shape[0], count), dim, dim) for i in range(len(layers))]
        if not kernels.cache_suits(*caches[0], x.dtype):  # e.g. a legacy cache in another dtype: the modules take it
            return none, []  # (kernels.decode_layers checks every layer's buffers before it reads them)
        kept = cache.plans
        if kept is not None and len(kept[0]) == len(layers) and all(a is b for a, b in zip(kept[0], layers)):
            return kept[1], caches
        plans = [layer.decode_plan() if isinstance(layer, Layer) else None for layer in layers]
        if cache.keep_plans:
            storages = [layer.plan_storages() for layer, plan in zip(layers, plans) if plan is not None]
            cache.plans = (list(layers), plans, storages)
        return plans, caches

    def _embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise InputError(f"inputs_embeds must have shape [batch, length, {self.config.hidden_size}], "
                                 f"got {list(inputs_embeds.shape)}")
            x = inputs_embeds
        else:
            input_ids = _as_batch(input_ids)
            check_token_ids(input_ids, self.config.vocab_size)
            x = self.embed_in(input_ids)
        if x.shape[1] == 0:
            raise InputError("the input is empty (sequence length 0)")
        return F.dropout(x, self.embedding_dropout, self.training) if self.embedding_dropout else x

    def _cache(self, past_key_values: Any, use_cache: bool) -> KVCache | None:
        if past_key_values is None:
            return KVCache(self.config.num_hidden_layers) if use_cache else None
        if isinstance(past_key_values, KVCache):
            return past_key_values
        if isinstance(past_key_values, (tuple, list)):
            return KVCache.from_legacy_cache(past_key_values, self.config.num_hidden_layers)
        raise InputError(f"past_key_values must be the KVCache a previous call returned, "
                         f"got {type(past_key_values).__name__}")

    def _positions(self, position_ids: Tensor | None, cache_position: Tensor | None, batch: int, length: int,
                   past: int, device: torch.device) -> tuple[Tensor, int]:
        """The positions [batch, length] and one past the largest of them."""
        if position_ids is None:
            if cache_position is not None:
                position_ids = cache_position.view(1, -1)
            else:
                position_ids = torch.arange(past, past + length, device=device)[None]
        position_ids = _as_batch(position_ids)
        if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise InputError(f"position_ids must have shape [{batch}, {length}] (or [1, {length}]), "
                             f"got {list(position_ids.shape)}")
        end = int(position_ids.max()) + 1
        if end > self.config.max_position_embeddings and self.config.rope_parameters["rope_type"] == "default":
            raise InputError(f"the sequence reaches position {end}, beyond the model's context window of "
                             f"max_position_embeddings={self.config.max_position_embeddings} tokens")
        return position_ids.expand(batch, length), end

    def _mask(self, attention_mask: Tensor | None, batch: int, length: int, past: int, dtype: torch.dtype,
              device: torch.device) -> Tensor | None:
        """None when plain causal attention suffices (the fast path), else an additive mask."""
        total = past + length
        if attention_mask is not None:
            attention_mask = _as_batch(attention_mask)
            if attention_mask.shape != (batch, total):
                raise InputError(f"attention_mask must have shape [{batch}, {total}] (past + new tokens), "
                                 f"got {list(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None
        if attention_mask is None and (past == 0 or length == 1):
            return None
        return causal_mask(length, total, attention_mask, dtype, device)


class GPTNeoXJapaneseModel(NeoXModel):
    config_class = GPTNeoXJapaneseConfig


class GPTNeoXModel(NeoXModel):
    config_class = GPTNeoXConfig


# ---------------------------------------------------------------------------------------------------------------
class NeoXForCausalLM(PreTrainedModel):
    """The body plus the `embed_out` head; the body sits under the family's prefix so keys match checkpoints."""

    base_model_class: type[NeoXModel] = NeoXModel

    def __init__(self, config: NeoXConfig, init: bool = True) -> None:
        super().__init__(config)
        self.add_module(self.base_model_prefix, self.base_model_class(config, init=False))
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config: Any = None  # set from generation_config.json at load time
        if init:
            self.init_weights()
        if config.tie_word_embeddings:
            self.tie_weights()

    @property
    def model(self) -> NeoXModel:
        return getattr(self, self.base_model_prefix)

    base_model = model

    def tie_weights(self) -> None:
        self.embed_out.weight = self.model.embed_in.weight

    @property
    def heads_tied(self) -> bool:
        head = self.embed_out  # a quantized head (Int8Linear, Linear4bit) has its own tensors
        return isinstance(head, nn.Linear) and head.weight is self.model.embed_in.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_in

    def get_output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        head_mask: Tensor | None = None,
        past_key_values: KVCache | Any | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: Tensor | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | Tensor | None = None,
        **unused: Any,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        body = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, head_mask=head_mask, past_key_values=past_key_values,
                          use_cache=use_cache, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, return_dict=True,
                          cache_position=cache_position, **unused)
        hidden = body.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.embed_out(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, _as_batch(labels), num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=body.past_key_values,
                                     hidden_states=body.hidden_states, attentions=body.attentions)
        return out if return_dict else out.to_tuple()

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        from .generation import generate

        return generate(self, *args, **kwargs)


class GPTNeoXJapaneseForCausalLM(NeoXForCausalLM):
    config_class = GPTNeoXJapaneseConfig
    base_model_prefix = "gpt_neox_japanese"
    base_model_class = GPTNeoXJapaneseModel


class GPTNeoXForCausalLM(NeoXForCausalLM):
    config_class = GPTNeoXConfig
    base_model_prefix = "gpt_neox"
    base_model_class = GPTNeoXModel


GPTNeoXJapaneseModel.base_model_prefix = GPTNeoXJapaneseForCausalLM.base_model_prefix
GPTNeoXModel.base_model_prefix = GPTNeoXForCausalLM.base_model_prefix

MODEL_CLASSES: dict[str, type[NeoXModel]] = {
    "gpt_neox_japanese": GPTNeoXJapaneseModel, "gpt_neox": GPTNeoXModel}
CAUSAL_LM_CLASSES: dict[str, type[NeoXForCausalLM]] = {
    "gpt_neox_japanese": GPTNeoXJapaneseForCausalLM, "gpt_neox": GPTNeoXForCausalLM}


class _AutoClass:
    registry: dict[str, type[PreTrainedModel]]

    @classmethod
    def from_config(cls, config: NeoXConfig, **kwargs: Any) -> PreTrainedModel:
        return cls.registry[config.model_type](config, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: Any, *args: Any, **kwargs: Any) -> PreTrainedModel:
        from .loading import load_pretrained

        return load_pretrained(cls, name_or_path, *args, **kwargs)


class AutoModel(_AutoClass):
    registry = MODEL_CLASSES  # type: ignore[assignment]


class AutoModelForCausalLM(_AutoClass):
    registry = CAUSAL_LM_CLASSES  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy in float32: position t predicts labels[t+1]; -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels must have shape {list(logits.shape[:2])}, got {list(labels.shape)}")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_items_in_batch


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"token id {bad} is outside the vocabulary (valid ids are 0..{vocab_size - 1})")


def _as_batch(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if t.dim() == 1:
        return t[None]
    if t.dim() != 2:
        raise InputError(f"expected a [batch, length] tensor, got shape {list(t.shape)}")
    return t


def _expand_head_mask(head_mask: Tensor | None, num_layers: int) -> list[Tensor | None]:
    """[NH] or [L, NH] (1 = keep) → one [1, NH, 1, 1] multiplier per layer."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None].expand(num_layers, -1)
    if head_mask.dim() != 2 or head_mask.shape[0] != num_layers:
        raise InputError(f"head_mask must have shape [num_heads] or [{num_layers}, num_heads], "
                         f"got {list(head_mask.shape)}")
    return [m[None, :, None, None] for m in head_mask]


def _reject_unknown(unused: dict[str, Any]) -> None:
    if unused:
        raise InputError(f"unexpected argument(s) to forward: {', '.join(sorted(unused))}")
