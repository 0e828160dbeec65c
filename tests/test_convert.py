"""`neoxja convert`: standard GPT-NeoX checkpoints checked against the reference (transformers'
GPTNeoXForCausalLM loaded from the output gives neoxja's logits on the source, and the reference's own), and GGUF
files read back with the `gguf` package (llama.cpp's reader): metadata, tensor names, shapes, types and data, and
the vocabulary arrays."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from safetensors.torch import load_file

from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)
from conftest import japanese_reference, neox_reference
from neoxja import AutoModelForCausalLM, AutoTokenizer
from neoxja.cli import main
from neoxja.convert import (
    TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, convert_to_gguf,
    convert_to_gpt_neox, qkv_blocks, read_sentencepiece_model, standard_tensors,
)  # fmt: skip
from neoxja.errors import CheckpointError, ConfigError, InputError

IDS = torch.tensor([[1, 5, 9, 33, 60, 2, 100, 7, 64, 3]])
TEXT = "吾輩は猫である。名前はまだ無い。　どこで生れたかとんと見当がつかぬ🐯 ＡＢＣ１２３"
NEOXJA = [str(Path(sys.executable).parent / "neoxja")]

REFERENCES = {
    "abeja": lambda: japanese_reference(),
    "abeja-partial-rotary": lambda: japanese_reference(rotary_pct=0.5),
    "abeja-untied": lambda: japanese_reference(tie_word_embeddings=False),
    "abeja-linear-rope": lambda: japanese_reference(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rinna": lambda: neox_reference(),
    "rinna-parallel-residual": lambda: neox_reference(use_parallel_residual=True, rotary_pct=0.25),
}


def quiet_convert(*args, **kwargs) -> list[str]:
    """Run a conversion; return the warnings it gave."""
    convert = convert_to_gguf if str(args[1]).endswith(".gguf") else convert_to_gpt_neox
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(*args, **kwargs)
    return [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (reference model, source dir, converted dir)."""
    out = {}
    for name, build in REFERENCES.items():
        reference = build()
        src, dst = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "-neox") / "out"
        reference.save_pretrained(src)
        quiet_convert(src, dst)
        out[name] = (reference, src, dst)
    return out


# ---------------------------------------------------------------------------------------------------------------
# --to gpt-neox
@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_gpt_neox_gives_the_source_logits(converted, name):
    reference, src, dst = converted[name]
    converted_model = transformers.GPTNeoXForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        got = converted_model(IDS).logits
        expected = AutoModelForCausalLM.from_pretrained(src)(IDS).logits
        original = reference(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, original, atol=1e-4, rtol=0)
    # and neoxja reads its own output back as the same model
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(dst)(IDS).logits, expected, atol=1e-4, rtol=0)


def test_config_of_a_converted_abeja_model(converted):
    reference, _, dst = converted["abeja-partial-rotary"]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["use_parallel_residual"] is False and config["attention_bias"] is True
    assert config["intermediate_size"] == 4 * reference.config.hidden_size
    assert config["tie_word_embeddings"] is True
    # both generations of the rope keys, with the same values
    assert config["rope_parameters"]["partial_rotary_factor"] == config["rotary_pct"] == 0.5
    assert config["rope_parameters"]["rope_theta"] == config["rotary_emb_base"] == 10000.0
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == reference.config.eos_token_id
    untied = json.loads((converted["abeja-untied"][2] / "config.json").read_text())
    assert untied["tie_word_embeddings"] is False
    scaled = json.loads((converted["abeja-linear-rope"][2] / "config.json").read_text())
    assert scaled["rope_scaling"]["rope_type"] == "linear" and scaled["rope_scaling"]["factor"] == 2.0


def test_zero_biases_and_the_last_layers_dense_bias(converted):
    reference, _, dst = converted["abeja"]
    state = load_file(dst / "model.safetensors")
    layers = reference.config.num_hidden_layers
    dense_bias = reference.gpt_neox_japanese.layers[layers - 1].attention.dense_bias.detach()
    assert dense_bias.abs().sum() > 0  # the fixture randomizes it, so placing it is really tested
    for i in range(layers):
        prefix = f"gpt_neox.layers.{i}."
        for name in ("attention.query_key_value.bias", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"):
            assert not state[prefix + name].any()
        expected = dense_bias if i == layers - 1 else torch.zeros_like(dense_bias)
        torch.testing.assert_close(state[prefix + "attention.dense.bias"], expected, atol=0, rtol=0)
    # a tied head is also stored as embed_out (TGI reads it), equal to the embedding
    torch.testing.assert_close(state["embed_out.weight"], state["gpt_neox.embed_in.weight"], atol=0, rtol=0)


def test_dtype(converted, tmp_path):
    _, src, _ = converted["abeja"]
    quiet_convert(src, tmp_path / "bf16", dtype="bfloat16")
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_abeja_tokenizer_through_transformers(abeja_checkpoint, tmp_path):
    dst = tmp_path / "abeja-neox"
    notes = quiet_convert(abeja_checkpoint, dst)
    assert not notes
    for name in ("vocab.txt", "emoji.json", "special_tokens_map.json"):
        assert (dst / name).read_bytes() == (abeja_checkpoint / name).read_bytes()
    assert json.loads((dst / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPTNeoXJapaneseTokenizer"
    reference = transformers.AutoTokenizer.from_pretrained(dst)
    ids = AutoTokenizer.from_pretrained(abeja_checkpoint)(TEXT)["input_ids"]
    assert reference(TEXT)["input_ids"] == ids
    model = transformers.GPTNeoXForCausalLM.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits,
                                   AutoModelForCausalLM.from_pretrained(abeja_checkpoint)(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=0)


def _copy_checkpoint(source: Path, destination: Path) -> Path:
    """A copy of a checkpoint directory that a test may edit."""
    destination.mkdir()
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def test_abeja_tokenizer_config_gets_its_class(abeja_checkpoint, tmp_path):
    """A source whose tokenizer_config.json names no class still converts to one transformers loads right."""
    src = _copy_checkpoint(abeja_checkpoint, tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    quiet_convert(src, tmp_path / "dst")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "dst")
    assert type(reference).__name__ == "GPTNeoXJapaneseTokenizer"
    assert reference(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]


def test_rinna_is_resaved_with_its_tokenizer(rinna_model_checkpoint, tmp_path):
    dst = tmp_path / "rinna-neox"
    quiet_convert(rinna_model_checkpoint, dst)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (dst / name).read_bytes() == (rinna_model_checkpoint / name).read_bytes()
    text = "ユーザー: こんにちは<NL>システム: "
    assert (AutoTokenizer.from_pretrained(dst)(text)["input_ids"]
            == AutoTokenizer.from_pretrained(rinna_model_checkpoint)(text)["input_ids"])


def test_no_tokenizer_files_is_a_warning(converted, tmp_path):
    _, src, _ = converted["abeja"]
    [note] = quiet_convert(src, tmp_path / "out")
    assert "no tokenizer files" in note


def test_destination_rules(converted, tmp_path):
    _, src, _ = converted["rinna"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty.*--force"):
        convert_to_gpt_neox(src, taken)
    quiet_convert(src, taken, force=True)
    assert (taken / "model.safetensors").is_file() and (taken / "keep.txt").is_file()
    with pytest.raises(InputError, match="is the source"):
        convert_to_gpt_neox(src, src, force=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        convert_to_gpt_neox(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    quiet_convert(src, empty)  # an empty directory is not "taken"
    assert (empty / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# --to gguf
# Parsing a file's 32000-entry vocabulary takes the reader seconds: each file is read once.
read_gguf = functools.cache(gguf.GGUFReader)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_data(tensor) -> np.ndarray:
    """A tensor's values in torch order (dequantized where needed)."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return data.reshape([int(d) for d in reversed(tensor.shape)])


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, abeja_checkpoint, rinna_model_checkpoint):
    out = {}
    directory = tmp_path_factory.mktemp("gguf")
    for family, src in (("abeja", abeja_checkpoint), ("rinna", rinna_model_checkpoint)):
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            path = directory / f"{family}-{dtype}.gguf"
            out[family, dtype] = (src, path, quiet_convert(src, path, dtype=dtype))
    return out


@pytest.mark.parametrize("family", ["abeja", "rinna"])
def test_gguf_metadata(gguf_files, family):
    src, path, _ = gguf_files[family, "f32"]
    config = AutoModelForCausalLM.from_pretrained(src).config
    reader = read_gguf(path)
    assert field(reader, "general.architecture") == "gptneox"
    assert field(reader, "general.file_type") == 0
    expected = {
        "gptneox.context_length": config.max_position_embeddings,
        "gptneox.embedding_length": config.hidden_size,
        "gptneox.block_count": config.num_hidden_layers,
        "gptneox.feed_forward_length": config.intermediate_size,
        "gptneox.attention.head_count": config.num_attention_heads,
        "gptneox.rope.dimension_count": config.rotary_dim,
        "gptneox.use_parallel_residual": config.use_parallel_residual,
    }  # fmt: skip
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "gptneox.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(reader, "gptneox.attention.layer_norm_epsilon") == pytest.approx(config.layer_norm_eps)


def test_gguf_file_type(gguf_files):
    assert [field(read_gguf(gguf_files["rinna", t][1]), "general.file_type")
            for t in ("f16", "bf16", "q8_0")] == [1, 32, 7]


@pytest.mark.parametrize("family", ["abeja", "rinna"])
def test_gguf_tensors_hold_the_source_weights(gguf_files, family):
    src, path, _ = gguf_files[family, "f32"]
    model = AutoModelForCausalLM.from_pretrained(src)
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    tensors = {t.name: t for t in read_gguf(path).tensors}
    per_layer = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    expected_names = {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"}
    expected_names |= {f"blk.{i}.{n}.{k}" for i in range(layers) for n in per_layer for k in ("weight", "bias")}
    assert set(tensors) == expected_names  # every bias llama.cpp requires, zero or not
    source = standard_tensors(model)
    body = model.model
    checks = {
        "token_embd.weight": body.embed_in.weight,
        "output.weight": model.embed_out.weight,
        "output_norm.bias": body.final_layer_norm.bias,
        f"blk.{layers - 1}.attn_output.bias": body.layers[layers - 1].attention.dense_bias
        if family == "abeja" else body.layers[layers - 1].attention.dense.bias,
        "blk.0.ffn_up.weight": body.layers[0].mlp.dense_h_to_4h.weight,
        "blk.0.ffn_down.weight": body.layers[0].mlp.dense_4h_to_h.weight,
        "blk.0.attn_norm.weight": body.layers[0].input_layernorm.weight,
    }  # fmt: skip
    for name, value in checks.items():
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == list(reversed(value.shape))  # ggml lists dims innermost first
        np.testing.assert_array_equal(gguf_data(tensor), value.detach().numpy())
    # q|k|v: three blocks (all heads' q, then k, then v) instead of interleaved per head
    qkv = gguf_data(tensors["blk.0.attn_qkv.weight"])
    hidden = model.config.hidden_size
    interleaved = source["gpt_neox.layers.0.attention.query_key_value.weight"].reshape(heads, 3, -1, hidden)
    for block in range(3):
        np.testing.assert_array_equal(qkv[block * hidden:(block + 1) * hidden],
                                      interleaved[:, block].reshape(hidden, hidden).numpy())
    np.testing.assert_array_equal(gguf_data(tensors["blk.0.attn_qkv.bias"]), qkv_blocks(
        source["gpt_neox.layers.0.attention.query_key_value.bias"], heads).numpy())


@pytest.mark.parametrize("dtype, torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_gguf_half_types_are_the_torch_cast(gguf_files, dtype, torch_dtype):
    src, path, _ = gguf_files["rinna", dtype]
    model = AutoModelForCausalLM.from_pretrained(src)
    tensors = {t.name: t for t in read_gguf(path).tensors}
    up = tensors["blk.1.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType[dtype.upper()]
    expected = model.model.layers[1].mlp.dense_h_to_4h.weight.detach().to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(gguf_data(up), expected)
    assert tensors["blk.1.ffn_up.bias"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stays f32


def test_gguf_q8_0_matches_ggml_quantizer(gguf_files):
    src, path, _ = gguf_files["abeja", "q8_0"]
    model = AutoModelForCausalLM.from_pretrained(src)
    tensors = {t.name: t for t in read_gguf(path).tensors}
    for name, weight in (("blk.0.ffn_down.weight", model.model.layers[0].mlp.dense_4h_to_h.weight),
                         ("token_embd.weight", model.model.embed_in.weight)):
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        values = weight.detach().numpy().astype(np.float32)
        expected = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(tensor.data.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8))
        assert np.abs(gguf_data(tensor) - values).max() <= np.abs(values).max() / 127


def test_gguf_rinna_vocabulary(gguf_files):
    src, path, notes = gguf_files["rinna", "f32"]
    reader = read_gguf(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "spiece.model"))
    n = sp.get_piece_size()
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    np.testing.assert_array_equal(np.array(field(reader, "tokenizer.ggml.scores"), dtype=np.float32),
                                  np.array([sp.get_score(i) for i in range(n)], dtype=np.float32))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[sp.piece_to_id("<NL>")] == TOKEN_USER_DEFINED
    assert [i for i, t in enumerate(types) if t == TOKEN_CONTROL] == [i for i in range(n) if sp.is_control(i)]
    assert [i for i, t in enumerate(types) if t == TOKEN_BYTE] == [i for i in range(n) if sp.is_byte(i)]
    assert sum(t == TOKEN_BYTE for t in types) == 256 and types[sp.piece_to_id("<0x0A>")] == TOKEN_BYTE
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.unknown_token_id"), field(reader, "tokenizer.ggml.padding_token_id")) == (
        sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    # rinna's options: no dummy prefix, whitespace kept; nothing is added to a prompt
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert field(reader, "tokenizer.ggml.remove_extra_whitespaces") is False
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    # the stand-in is a unigram model with NFKC normalization: both limits of llama.cpp's tokenizer are stated
    assert any("unigram" in note for note in notes) and any("normalizes" in note for note in notes)


def test_gguf_abeja_vocabulary(gguf_files):
    src, path, notes = gguf_files["abeja", "f32"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    reader = read_gguf(path)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(set(tokens)) == 32000  # llama.cpp requires distinct texts
    assert tokens[tokenizer.eos_token_id] == "<|endoftext|>" and types[tokenizer.eos_token_id] == TOKEN_CONTROL
    assert tokens[tokenizer.bos_token_id] == "<|startoftext|>" and types[tokenizer.bos_token_id] == TOKEN_CONTROL
    byte_values = [b for b in range(256) if f"<|byte{b}|>" in tokenizer.vocab]  # ABEJA's stop at 254
    assert len(byte_values) == 255
    byte_ids = tokenizer.convert_tokens_to_ids([f"<|byte{b}|>" for b in byte_values])
    assert [tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in byte_values]
    assert {types[i] for i in byte_ids} == {TOKEN_BYTE}
    # every other id is the text ABEJA's tokenizer decodes it to, or an unused placeholder for repeats
    ids = tokenizer(TEXT)["input_ids"]
    assert all(types[i] == TOKEN_NORMAL and tokens[i] == tokenizer.convert_ids_to_tokens(i) for i in ids
               if i not in byte_ids)
    sp_id = tokenizer.convert_tokens_to_ids("<SP>")
    assert tokens[sp_id] == " "
    unused = [i for i, t in enumerate(types) if t == TOKEN_UNUSED]
    assert unused and all(tokens[i] == f"[UNUSED_{i}]" for i in unused)
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert any("no llama.cpp equivalent" in note for note in notes)


def test_gguf_refusals(converted, tmp_path):
    _, src, _ = converted["rinna"]
    with pytest.raises(InputError, match="GGUF dtype"):
        convert_to_gguf(src, tmp_path / "x.gguf", dtype="q4_0")
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(InputError, match="exists.*--force"):
        convert_to_gguf(src, existing)
    with pytest.raises(CheckpointError, match="tokenizer"):  # the conftest checkpoint has no tokenizer files
        convert_to_gguf(src, tmp_path / "x.gguf")


def test_gguf_refuses_an_activation_llama_cpp_lacks(rinna_model_checkpoint, tmp_path):
    src = _copy_checkpoint(rinna_model_checkpoint, tmp_path / "relu")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="GELU"):
        convert_to_gguf(src, tmp_path / "x.gguf")


def test_read_sentencepiece_model_agrees_with_sentencepiece(rinna_model_checkpoint):
    proto = (rinna_model_checkpoint / "spiece.model").read_bytes()
    model = read_sentencepiece_model(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.scores == [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert [i for i, t in enumerate(model.types) if t == 2] == [sp.unk_id()]
    assert model.model_type == 1 and model.add_dummy_prefix is False and model.remove_extra_whitespaces is False
    with pytest.raises(CheckpointError):
        read_sentencepiece_model(proto[:1000])


# ---------------------------------------------------------------------------------------------------------------
# Command line
def test_cli_subprocess(rinna_model_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rinna.gguf"
    done = subprocess.run(NEOXJA + ["convert", "--to", "gguf", str(rinna_model_checkpoint), str(out), "--dtype",
                                    "q8_0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "neoxja convert: note: this SentencePiece model" in done.stderr
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 7
    again = subprocess.run(NEOXJA + ["convert", "--to", "gguf", str(rinna_model_checkpoint), str(out)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"neoxja convert: error: {out} exists; pass --force (force=True) "
                                                 f"to overwrite its files"]


def test_cli_in_process(converted, tmp_path, capsys):
    _, src, _ = converted["abeja"]
    assert main(["convert", "--to", "gpt-neox", str(src), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"wrote {tmp_path / 'out'}" and "note: " in err and "no tokenizer files" in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert main(["convert", "--to", "gpt-neox", str(src), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "--to", "gpt-neox", str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neoxja convert: error:") and len(err.strip().splitlines()) == 1
    assert main(["convert", "--to", "gpt-neox", str(src), str(tmp_path / "q"), "--dtype", "q8_0"]) == 2
    assert "dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--to", "onnx", str(src), str(tmp_path / "o")])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
