"""`neoxja convert`: export a checkpoint for other engines, as a standard GPT-NeoX checkpoint or a GGUF file.

Why ABEJA's model converts losslessly: GPT-NeoX-Japanese computes exactly what a plain GPT-NeoX computes with
sequential residuals and no linear biases, except the last layer's attention output, which adds `dense_bias`
after its projection. Everything else is the same computation in both reference implementations: q|k|v
interleaved per head in `query_key_value`, half-split rotary on the first int(head_dim * partial_rotary_factor)
channels of each head with the same frequencies, scores scaled by 1/sqrt(head_dim), the same layer norms and MLP.
So conversion renames the tensors, writes zero biases where ABEJA has none and puts `dense_bias` into the last
layer's `attention.dense.bias`; the logits agree to float32 precision. (The reference runs ABEJA's soft-max in
the activation dtype and GPT-NeoX's in float32, so fp16 logits may differ in the last bits. In training, GPT-NeoX
also applies hidden_dropout to the embeddings.) A GPT-NeoX source (rinna) is simply re-saved.

- `convert_to_gpt_neox`: a GPTNeoXForCausalLM checkpoint (safetensors, config.json, generation_config.json and
  the source's tokenizer files) for vLLM, text-generation-inference and transformers. The head is always stored
  as `embed_out.weight` (TGI reads it even for a tied model); config.json carries both rope generations.
- `convert_to_gguf`: one file for llama.cpp's `gptneox` architecture (written by neoxja.gguf). llama.cpp wants
  q|k|v as three blocks rather than interleaved per head, and every bias (zeros are written). Its vocabulary is
  the source tokenizer's: rinna's SentencePiece model maps onto llama.cpp's SentencePiece tokenizer; ABEJA's
  BPEEncoder-V2 has no llama.cpp equivalent, so its GGUF decodes ids to ABEJA's text but does not tokenize text
  as ABEJA does (a warning says so; tokenize with neoxja and give llama.cpp token ids)."""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .config import CONFIG_NAME, AutoConfig, GPTNeoXConfig, read_config_dict
from .errors import CheckpointError, ConfigError, InputError
from .files import write_atomic
from .gguf import Metadata, TensorEntry, TensorType, ValueType, encode_tensor, write_gguf
from .hub import is_local, resolve_file

TARGETS = ("gpt-neox", "gguf")
# Files a transformers tokenizer may need; each one the source has is copied byte for byte.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "emoji.json", "spiece.model",
                   "tokenizer.model", "tokenizer.json", "added_tokens.json")
ABEJA_TOKENIZER_CLASS = "GPTNeoXJapaneseTokenizer"

GGUF_ARCH = "gptneox"  # llama.cpp's LLM_ARCH_GPTNEOX
GGUF_TYPES = {"f32": TensorType.F32, "f16": TensorType.F16, "bf16": TensorType.BF16, "q8_0": TensorType.Q8_0}
GGUF_TYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
                     "bfloat16": "bf16"}
GGUF_FILE_TYPES = {TensorType.F32: 0, TensorType.F16: 1, TensorType.Q8_0: 7, TensorType.BF16: 32}  # general.file_type
GGUF_QUANTIZATION_VERSION = 2
# llama.cpp's gptneox graph always applies GELU (tanh-approximated); other activations would silently change.
GGUF_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
GGUF_TOP_NAMES = {"gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm",
                  "embed_out": "output"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}  # fmt: skip
# GGUF token types; SentencePiece's piece types use the same numbers.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_UNIGRAM, SPM_BPE = 1, 2
SPM_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}


# ---------------------------------------------------------------------------------------------------------------
# The common step: any neoxja model as plain GPT-NeoX tensors and config
def standard_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under GPT-NeoX checkpoint names, with zero biases where the model has none and the
    head always present (the embedding itself when they are tied)."""
    body = model.model
    out = {"gpt_neox.embed_in.weight": body.embed_in.weight}
    for i, layer in enumerate(body.layers):
        attention, mlp = layer.attention, layer.mlp
        dense_bias = _bias(attention.dense)
        if attention.dense_bias is not None:  # ABEJA's last layer adds it right after the projection
            dense_bias = dense_bias + attention.dense_bias
        prefix = f"gpt_neox.layers.{i}."
        out.update({
            prefix + "input_layernorm.weight": layer.input_layernorm.weight,
            prefix + "input_layernorm.bias": layer.input_layernorm.bias,
            prefix + "attention.query_key_value.weight": attention.query_key_value.weight,
            prefix + "attention.query_key_value.bias": _bias(attention.query_key_value),
            prefix + "attention.dense.weight": attention.dense.weight,
            prefix + "attention.dense.bias": dense_bias,
            prefix + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            prefix + "post_attention_layernorm.bias": layer.post_attention_layernorm.bias,
            prefix + "mlp.dense_h_to_4h.weight": mlp.dense_h_to_4h.weight,
            prefix + "mlp.dense_h_to_4h.bias": _bias(mlp.dense_h_to_4h),
            prefix + "mlp.dense_4h_to_h.weight": mlp.dense_4h_to_h.weight,
            prefix + "mlp.dense_4h_to_h.bias": _bias(mlp.dense_4h_to_h),
        })  # fmt: skip
    out["gpt_neox.final_layer_norm.weight"] = body.final_layer_norm.weight
    out["gpt_neox.final_layer_norm.bias"] = body.final_layer_norm.bias
    out["embed_out.weight"] = model.embed_out.weight
    return {name: tensor.detach() for name, tensor in out.items()}


def _bias(linear: nn.Linear) -> Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


# config fields a converted checkpoint keeps as they are
_KEPT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "initializer_range", "layer_norm_eps", "use_cache",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "hidden_dropout", "is_decoder",
                "use_parallel_residual")


def standard_config(model: nn.Module) -> GPTNeoXConfig:
    """The GPTNeoXConfig that describes `model` with the tensors of `standard_tensors`."""
    source = model.config
    return GPTNeoXConfig(
        **{name: getattr(source, name) for name in _KEPT_FIELDS},
        rope_parameters=dict(source.rope_parameters),
        tie_word_embeddings=model.heads_tied,  # a differing saved head was kept: say so
        attention_bias=True,
        dtype=str(model.dtype).replace("torch.", ""),
        extra=dict(source.extra),
    )


def _load_model(src: str | os.PathLike, dtype: Any) -> nn.Module:
    from .modeling import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    if "quantization_config" in config.extra:
        raise InputError(f"{src} is a quantized checkpoint; convert the original (unquantized) one")
    return AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype)


def _check_destination(src: str | os.PathLike, dst: Path, force: bool, directory: bool) -> None:
    """Refuse to overwrite anything unless forced, and never write over the source."""
    if is_local(src) and dst.exists() and dst.resolve() == Path(src).resolve():
        raise InputError(f"the destination {dst} is the source checkpoint; choose another path")
    if not dst.exists():
        return
    if directory and not dst.is_dir():
        raise InputError(f"{dst} exists and is not a directory")
    if not directory and dst.is_dir():
        raise InputError(f"{dst} is a directory; give the path of the .gguf file to write")
    if (not directory or any(dst.iterdir())) and not force:
        what = "is not empty" if directory else "exists"
        raise InputError(f"{dst} {what}; pass --force (force=True) to overwrite its files")


# ---------------------------------------------------------------------------------------------------------------
# Standard GPT-NeoX checkpoint
def convert_to_gpt_neox(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = None, *,
                        force: bool = False) -> Path:
    """Write `src` (a directory or hub id, ABEJA or GPT-NeoX) to the directory `dst` as a standard
    GPTNeoXForCausalLM checkpoint, in `dtype` (float32, float16, bfloat16; None keeps the source's)."""
    from .loading import save_pretrained
    from .modeling import GPTNeoXForCausalLM

    dst = Path(dst)
    _check_destination(src, dst, force, directory=True)
    model = _load_model(src, dtype)
    tensors = standard_tensors(model)
    if model.heads_tied:  # stored twice on purpose: safetensors refuses shared memory, TGI wants embed_out
        tensors["embed_out.weight"] = tensors["embed_out.weight"].clone()
    config = standard_config(model)
    with torch.device("meta"):
        target = GPTNeoXForCausalLM(config, init=False)
    target.load_state_dict(tensors, strict=True, assign=True)
    target.generation_config = model.generation_config
    save_pretrained(target, dst)
    _add_legacy_config_keys(dst, config)
    _copy_tokenizer_files(src, dst, model.config.model_type)
    return dst


def _add_legacy_config_keys(directory: Path, config: GPTNeoXConfig) -> None:
    """Add the older config.json spellings: readers built on transformers 4.x (TGI, llama.cpp's converter) know
    rotary_pct / rotary_emb_base / rope_scaling / torch_dtype, not rope_parameters / dtype. Both generations
    describe the same values, and current readers take rope_parameters."""
    path = directory / CONFIG_NAME
    data = read_config_dict(path)
    data.update(rotary_pct=config.rotary_pct, rotary_emb_base=config.rotary_emb_base, torch_dtype=data["dtype"])
    if config.rope_parameters["rope_type"] != "default":
        data["rope_scaling"] = dict(config.rope_parameters)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _copy_tokenizer_files(src: str | os.PathLike, dst: Path, model_type: str) -> None:
    from .tokenization.base import bundled_dir, read_json

    source = bundled_dir(src) or src
    copied = []
    for name in TOKENIZER_FILES:
        path = resolve_file(source, name, required=False)
        if path is not None:
            write_atomic(dst / name, path.read_bytes())
            copied.append(name)
    if not copied:
        warnings.warn(f"{src} has no tokenizer files, so {dst} has none either: copy the tokenizer into it "
                      f"before serving it", stacklevel=3)
        return
    if model_type == "gpt_neox_japanese":
        # Without tokenizer_class, transformers would pick the tokenizer of model_type gpt_neox, a different one.
        config_path = dst / "tokenizer_config.json"
        data = read_json(config_path if config_path.is_file() else None)
        if data.get("tokenizer_class") != ABEJA_TOKENIZER_CLASS:
            data["tokenizer_class"] = ABEJA_TOKENIZER_CLASS
            write_atomic(config_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# GGUF for llama.cpp
def convert_to_gguf(src: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16", *,
                    force: bool = False) -> Path:
    """Write `src` (a directory or hub id, ABEJA or GPT-NeoX) as one GGUF file for llama.cpp's gptneox
    architecture. dtype: the type of the 2-D weights, f32, f16, bf16 or q8_0 (norms and biases stay f32, and a
    weight whose rows are not a multiple of 32 long stays f16 under q8_0)."""
    tensor_type = gguf_type(dtype)
    out_path = Path(out_path)
    _check_destination(src, out_path, force, directory=False)
    model = _load_model(src, None)
    tokenizer = _load_tokenizer(src)
    config = model.config
    _check_gguf_expressible(config)
    metadata = Metadata()
    _add_model_metadata(metadata, config, Path(str(src)).name or str(src), tensor_type)
    _add_vocabulary(metadata, tokenizer, config.vocab_size)
    entries = list(_gguf_tensors(standard_tensors(model), config, tensor_type))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(out_path, metadata, entries)


def gguf_type(dtype: str) -> TensorType:
    name = GGUF_TYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in GGUF_TYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not supported: use {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def _load_tokenizer(src: str | os.PathLike) -> Any:
    from .tokenization import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except CheckpointError as err:
        raise CheckpointError(f"a GGUF file carries the vocabulary, but the tokenizer of {src} cannot be loaded: "
                              f"{err}") from None


def _check_gguf_expressible(config: Any) -> None:
    if config.hidden_act not in GGUF_ACTIVATIONS:
        raise ConfigError(f"hidden_act {config.hidden_act!r}: llama.cpp's gptneox always applies GELU, so this "
                          f"model cannot be expressed as GGUF (convert --to gpt-neox instead)")
    if config.rope_parameters["rope_type"] not in ("default", "linear"):
        raise ConfigError(f"rope_type {config.rope_parameters['rope_type']!r} is not written to GGUF by neoxja "
                          f"(default and linear are); convert --to gpt-neox instead")


def _add_model_metadata(metadata: Metadata, config: Any, name: str, tensor_type: TensorType) -> None:
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    metadata.add("general.architecture", ValueType.STRING, GGUF_ARCH)
    metadata.add("general.name", ValueType.STRING, name)
    metadata.add("general.file_type", u32, GGUF_FILE_TYPES[tensor_type])
    metadata.add("general.quantization_version", u32, GGUF_QUANTIZATION_VERSION)
    metadata.add(f"{GGUF_ARCH}.context_length", u32, config.max_position_embeddings)
    metadata.add(f"{GGUF_ARCH}.embedding_length", u32, config.hidden_size)
    metadata.add(f"{GGUF_ARCH}.block_count", u32, config.num_hidden_layers)
    metadata.add(f"{GGUF_ARCH}.feed_forward_length", u32, config.intermediate_size)
    metadata.add(f"{GGUF_ARCH}.attention.head_count", u32, config.num_attention_heads)
    metadata.add(f"{GGUF_ARCH}.attention.layer_norm_epsilon", f32, config.layer_norm_eps)
    metadata.add(f"{GGUF_ARCH}.rope.dimension_count", u32, config.rotary_dim)
    metadata.add(f"{GGUF_ARCH}.rope.freq_base", f32, config.rope_parameters["rope_theta"])
    if config.rope_parameters["rope_type"] == "linear":
        metadata.add(f"{GGUF_ARCH}.rope.scaling.type", ValueType.STRING, "linear")
        metadata.add(f"{GGUF_ARCH}.rope.scaling.factor", f32, config.rope_parameters["factor"])
    metadata.add(f"{GGUF_ARCH}.use_parallel_residual", ValueType.BOOL, bool(config.use_parallel_residual))


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for a GPT-NeoX checkpoint tensor name."""
    stem, kind = name.rsplit(".", 1)
    if stem in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[stem]}.{kind}"
    _, _, index, rest = stem.split(".", 3)  # gpt_neox.layers.N.<rest>
    return f"blk.{index}.{GGUF_LAYER_NAMES[rest]}.{kind}"


def qkv_blocks(tensor: Tensor, heads: int) -> Tensor:
    """query_key_value rows from GPT-NeoX's per-head [q_h, k_h, v_h] order to llama.cpp's [all q, all k, all v]."""
    return tensor.reshape(heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _gguf_tensors(tensors: dict[str, Tensor], config: Any, tensor_type: TensorType) -> Iterator[TensorEntry]:
    for name, tensor in tensors.items():
        if tensor.dim() == 1:
            kind = TensorType.F32  # llama.cpp's ops expect f32 norms and biases
        elif tensor_type == TensorType.Q8_0 and tensor.shape[-1] % 32:
            kind = TensorType.F16
        else:
            kind = tensor_type
        reorder = ".attention.query_key_value." in name

        def data(tensor: Tensor = tensor, kind: TensorType = kind, reorder: bool = reorder) -> bytes:
            return encode_tensor(qkv_blocks(tensor, config.num_attention_heads) if reorder else tensor, kind)

        yield TensorEntry(gguf_tensor_name(name), tuple(tensor.shape), kind, data)


def _add_vocabulary(metadata: Metadata, tokenizer: Any, vocab_size: int) -> None:
    from .tokenization import GPTNeoXJapaneseTokenizer

    if isinstance(tokenizer, GPTNeoXJapaneseTokenizer):
        tokens, scores, types, flags = _abeja_vocabulary(tokenizer)
    else:
        tokens, scores, types, flags = _sentencepiece_vocabulary(tokenizer)
    if len(tokens) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokens)} ids but the model only {vocab_size}")
    # llama.cpp needs one entry per row of the embedding; the rows no token names get placeholders.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[UNUSED_{i}]")
        scores.append(0.0)
        types.append(TOKEN_UNUSED)
    metadata.add("tokenizer.ggml.model", ValueType.STRING, "llama")
    metadata.add_array("tokenizer.ggml.tokens", ValueType.STRING, tokens)
    metadata.add_array("tokenizer.ggml.scores", ValueType.FLOAT32, scores)
    metadata.add_array("tokenizer.ggml.token_type", ValueType.INT32, types)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            metadata.add(f"tokenizer.ggml.{key}_token_id", ValueType.UINT32, token_id)
    # Prompts are continued as written: neither family's generation prepends <s> or appends </s>.
    metadata.add("tokenizer.ggml.add_bos_token", ValueType.BOOL, False)
    metadata.add("tokenizer.ggml.add_eos_token", ValueType.BOOL, False)
    for key, value in flags.items():
        metadata.add(f"tokenizer.ggml.{key}", ValueType.BOOL, value)


def _abeja_vocabulary(tokenizer: Any) -> tuple[list[str], list[float], list[int], dict[str, bool]]:
    """Each id as the text ABEJA's tokenizer decodes it to; byte tokens in llama.cpp's <0xNN> form, so runs of
    them decode to UTF-8 there too. llama.cpp needs distinct token texts: an id whose text repeats an earlier
    one (never produced by ABEJA's encoder, which picks the smallest id) or is empty becomes an unused
    placeholder."""
    from .tokenization.abeja import BYTE_TOKEN

    warnings.warn("ABEJA's tokenizer (BPEEncoder-V2: variant spellings, emoji classes, whitespace tags) has no "
                  "llama.cpp equivalent: the GGUF file decodes token ids to ABEJA's text, but llama.cpp splits text "
                  "into different ids than ABEJA does. Tokenize with neoxja and give llama.cpp the token ids.",
                  stacklevel=4)
    special = set(tokenizer.all_special_ids)
    tokens: list[str] = []
    types: list[int] = []
    seen: set[str] = set()
    for i, spellings in enumerate(tokenizer.spellings):
        byte = BYTE_TOKEN.fullmatch(spellings[0]) if spellings else None
        if i in special:
            text, kind = tokenizer.convert_ids_to_tokens(i), TOKEN_CONTROL
        elif byte and int(byte.group(1)) < 256:
            text, kind = f"<0x{int(byte.group(1)):02X}>", TOKEN_BYTE
        else:
            text, kind = tokenizer.convert_ids_to_tokens(i), TOKEN_NORMAL
        if not text or text in seen:
            text, kind = f"[UNUSED_{i}]", TOKEN_UNUSED
        seen.add(text)
        tokens.append(text)
        types.append(kind)
    return tokens, [0.0] * len(tokens), types, {"add_space_prefix": False}


@dataclass
class SentencePieceModel:
    """What a GGUF vocabulary needs from a SentencePiece .model file (a ModelProto)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = SPM_UNIGRAM
    normalizer: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def read_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """Parse the fields neoxja needs from a serialized ModelProto (protobuf wire format; field numbers from
    sentencepiece_model.proto; defaults as there), without the protobuf package."""
    model = SentencePieceModel([], [], [])
    for number, value in _protobuf_fields(data):
        if number == 1:  # SentencePiece {piece = 1, score = 2, type = 3}
            piece, score, kind = "", 0.0, TOKEN_NORMAL
            for field, item in _protobuf_fields(value):
                if field == 1:
                    piece = item.decode("utf-8")
                elif field == 2:
                    score = struct.unpack("<f", item)[0]
                elif field == 3:
                    kind = item
            model.pieces.append(piece)
            model.scores.append(score)
            model.types.append(kind)
        elif number == 2:  # TrainerSpec {model_type = 3}
            for field, item in _protobuf_fields(value):
                if field == 3:
                    model.model_type = item
        elif number == 3:  # NormalizerSpec {name = 1, precompiled_charsmap = 2, add_dummy_prefix = 3, ...}
            for field, item in _protobuf_fields(value):
                if field == 1:
                    model.normalizer = item.decode("utf-8")
                elif field == 2:
                    model.charsmap = item
                elif field == 3:
                    model.add_dummy_prefix = bool(item)
                elif field == 4:
                    model.remove_extra_whitespaces = bool(item)
    if not model.pieces:
        raise CheckpointError("the SentencePiece model has no pieces (not a .model file?)")
    return model


def _protobuf_fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for the other wire types."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            wire = key & 7
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos:pos + size], pos + size
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = data[pos:pos + size], pos + size
            else:
                raise CheckpointError(f"the SentencePiece model is corrupt (protobuf wire type {wire})")
            if pos > len(data):
                raise CheckpointError("the SentencePiece model is truncated")
            yield key >> 3, value
    except IndexError:
        raise CheckpointError("the SentencePiece model is truncated") from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _sentencepiece_vocabulary(tokenizer: Any) -> tuple[list[str], list[float], list[int], dict[str, bool]]:
    """The pieces, scores and piece types as they are; llama.cpp's "llama" tokenizer is SentencePiece's BPE."""
    model = read_sentencepiece_model(tokenizer.sp.serialized_model_proto())
    if model.model_type != SPM_BPE:
        warnings.warn(f"this SentencePiece model is a {SPM_MODEL_TYPES.get(model.model_type, 'non-BPE')} model; "
                      f"llama.cpp's SentencePiece tokenizer merges pieces by score as BPE does, so it can split "
                      f"some text into other ids than sentencepiece (the ids decode to the same text). For exact "
                      f"ids, tokenize with neoxja and give llama.cpp the token ids.", stacklevel=4)
    if model.charsmap:
        warnings.warn(f"this SentencePiece model normalizes text ({model.normalizer or 'custom rules'}, e.g. "
                      f"full-width to half-width) and llama.cpp's SentencePiece tokenizer does not: text that "
                      f"normalization changes is tokenized differently there.", stacklevel=4)
    flags = {"add_space_prefix": model.add_dummy_prefix, "remove_extra_whitespaces": model.remove_extra_whitespaces}
    return model.pieces, model.scores, model.types, flags


# ---------------------------------------------------------------------------------------------------------------
# Command line
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = ("Convert a checkpoint (ABEJA GPT-NeoX-Japanese or GPT-NeoX/rinna; a directory or hub id) "
                          "to a standard GPT-NeoX checkpoint directory for vLLM/TGI/transformers, or to one GGUF "
                          "file for llama.cpp.")
    parser.add_argument("--to", required=True, choices=TARGETS, help="gpt-neox: a GPTNeoXForCausalLM directory; "
                        "gguf: a .gguf file for llama.cpp")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory or hub id")
    parser.add_argument("dst", metavar="DST", help="output directory (gpt-neox) or .gguf file (gguf)")
    parser.add_argument("--dtype", help="gpt-neox: float32, float16 or bfloat16 (default: the source's); "
                        "gguf: f32, f16, bf16 or q8_0 for the weight matrices (default f16)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def cli_main(args: argparse.Namespace, name: str) -> int:
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        if args.to == "gguf":
            written = convert_to_gguf(args.src, args.dst, args.dtype or "f16", force=args.force)
        else:
            written = convert_to_gpt_neox(args.src, args.dst, args.dtype, force=args.force)
    for note in notes:
        print(f"neoxja {name}: note: {note.message}", file=sys.stderr)
    print(f"wrote {written}")
    return 0
