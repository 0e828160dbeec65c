"""Checkpoint loading and saving: formats, key names, head tying, dtypes, the hub cache, and every error case."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from conftest import japanese_reference, neox_reference
from safetensors.torch import load_file, save_file

import neoxja
import neoxja.files
from neoxja.errors import CheckpointError, ConfigError

IDS = torch.tensor([[3, 17, 42, 99, 5, 64]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def test_auto_classes_pick_the_family(japanese_checkpoint, neox_checkpoint):
    assert type(neoxja.AutoConfig.from_pretrained(japanese_checkpoint)).__name__ == "GPTNeoXJapaneseConfig"
    assert type(neoxja.AutoModelForCausalLM.from_pretrained(neox_checkpoint)).__name__ == "GPTNeoXForCausalLM"
    assert type(neoxja.AutoModel.from_pretrained(japanese_checkpoint)).__name__ == "GPTNeoXJapaneseModel"
    with pytest.raises(CheckpointError, match="gpt_neox.*GPTNeoXForCausalLM"):
        neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(neox_checkpoint)


def test_base_model_from_lm_checkpoint_and_back(tmp_path, japanese_checkpoint):
    lm = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    base = neoxja.GPTNeoXJapaneseModel.from_pretrained(japanese_checkpoint)
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, lm.gpt_neox_japanese(IDS).last_hidden_state)
    base.save_pretrained(tmp_path)  # keys without prefix, no head: the LM ties the head to embed_in
    again = neoxja.GPTNeoXJapaneseForCausalLM.from_pretrained(tmp_path)
    assert again.heads_tied
    assert torch.equal(logits(again), logits(lm))


def test_pytorch_bin_and_sharded_checkpoints(tmp_path):
    ref = neox_reference()
    expected = logits(ref)
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "shards"
    bin_dir.mkdir()
    ref.config.save_pretrained(bin_dir)
    state = {k.replace("lm_head.", "embed_out."): v for k, v in ref.state_dict().items()}
    # legacy buffers that old rinna files carry must be ignored
    state["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(4, 4, dtype=torch.uint8))
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({k: v.half() if v.is_floating_point() and v.dim() > 1 else v for k, v in state.items()},
               bin_dir / "pytorch_model.bin")
    model = neoxja.AutoModelForCausalLM.from_pretrained(bin_dir, dtype=torch.float32)
    assert torch.allclose(logits(model), expected, atol=5e-3)
    ref.save_pretrained(shard_dir, max_shard_size="100KB")
    assert (shard_dir / "model.safetensors.index.json").exists()
    sharded = neoxja.AutoModelForCausalLM.from_pretrained(shard_dir)
    assert torch.allclose(logits(sharded), expected, atol=1e-4)


def test_save_and_reload_round_trip_and_reference_reads_ours(tmp_path, neox_checkpoint, japanese_checkpoint):
    for checkpoint in (neox_checkpoint, japanese_checkpoint):
        model = neoxja.AutoModelForCausalLM.from_pretrained(checkpoint)
        out = tmp_path / checkpoint.name
        model.save_pretrained(out)
        assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries
        assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {neoxja.files.FILE_MODE}  # not 0600
        again = neoxja.AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(logits(again), logits(model))
        saved = json.loads((out / "config.json").read_text())
        assert "rope_parameters" in saved and "rotary_pct" not in saved  # the current generation
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.allclose(logits(ref), logits(model), atol=1e-4)
    keys = load_file(tmp_path / japanese_checkpoint.name / "model.safetensors").keys()
    assert "embed_out.weight" not in keys  # a tied head is stored once


def test_sharded_save(tmp_path, japanese_checkpoint):
    model = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(logits(neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model))


def _rewrite_weights(checkpoint, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_head_tying_rules(tmp_path, japanese_checkpoint):
    base = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    embed = base.gpt_neox_japanese.embed_in.weight.detach()

    equal = _rewrite_weights(japanese_checkpoint, tmp_path / "equal", lambda t: t.update(
        {"embed_out.weight": t["gpt_neox_japanese.embed_in.weight"].clone()}))
    assert neoxja.AutoModelForCausalLM.from_pretrained(equal).heads_tied

    other = torch.randn_like(embed)
    differ = _rewrite_weights(japanese_checkpoint, tmp_path / "differ",
                              lambda t: t.update({"embed_out.weight": other}))
    with pytest.warns(UserWarning, match="NOT tied"):
        untied = neoxja.AutoModelForCausalLM.from_pretrained(differ)
    assert not untied.heads_tied and torch.equal(untied.embed_out.weight, other)
    ref = transformers.AutoModelForCausalLM.from_pretrained(differ).eval()  # 5.x: the file's embed_out is used
    assert torch.allclose(logits(ref), logits(untied), atol=1e-4)

    def only_head(t):
        t["embed_out.weight"] = t.pop("gpt_neox_japanese.embed_in.weight")
    head_only = neoxja.AutoModelForCausalLM.from_pretrained(_rewrite_weights(japanese_checkpoint,
                                                                            tmp_path / "head", only_head))
    assert head_only.heads_tied and torch.equal(head_only.embed_out.weight, embed)


def test_older_config_generation(tmp_path):
    ref = japanese_reference(rotary_pct=0.5)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rotary_pct=0.5, rotary_emb_base=10000, rope_scaling=None, transformers_version="4.19.0.dev0",
                  torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.rotary_dim == 8 and model.config.rotary_pct == 0.5
    assert torch.allclose(logits(model), logits(ref), atol=1e-4)
    # unknown keys survive a round trip, a config round trip keeps rotary_pct (reference bug #44913)
    config["my_custom_key"] = {"a": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = neoxja.AutoConfig.from_pretrained(tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    reread = neoxja.AutoConfig.from_pretrained(tmp_path / "again")
    assert reread.extra["my_custom_key"] == {"a": 1} and reread.rotary_pct == 0.5 and reread == loaded


def test_dtypes(japanese_checkpoint, tmp_path):
    bf16 = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.heads_tied
    assert torch.allclose(logits(bf16), logits(neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)),
                          atol=0.05)
    assert neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, torch_dtype="float16").dtype == \
        torch.float16
    bf16.save_pretrained(tmp_path)
    assert neoxja.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert neoxja.AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16  # from the weights
    with pytest.raises(ConfigError, match="dtype"):
        neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, dtype="int7")
    with pytest.raises(ConfigError, match="device"):
        neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, device_map="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, device_map="cuda")
    auto = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint, device_map="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_hub_cache_offline(tmp_path, japanese_checkpoint, monkeypatch):
    """A pre-filled hub cache, HF_HUB_OFFLINE=1: hub ids resolve through huggingface_hub with no network."""
    cache = tmp_path / "hub"
    repo = cache / "models--abeja--tiny-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(japanese_checkpoint / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model = neoxja.AutoModelForCausalLM.from_pretrained("abeja/tiny-test", cache_dir=cache)
    expected = neoxja.AutoModelForCausalLM.from_pretrained(japanese_checkpoint)
    assert torch.equal(logits(model), logits(expected))
    model = neoxja.AutoModelForCausalLM.from_pretrained("abeja/tiny-test", cache_dir=cache, revision=commit,
                                                        local_files_only=True)
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        neoxja.AutoModelForCausalLM.from_pretrained("abeja/not-cached", cache_dir=cache)


def test_errors_name_the_problem(tmp_path, japanese_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        neoxja.AutoModelForCausalLM.from_pretrained(str(tmp_path / "missing" / "deeper" / "dir"))
    with pytest.raises(CheckpointError, match="empty"):
        neoxja.AutoModelForCausalLM.from_pretrained("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        neoxja.AutoModelForCausalLM.from_pretrained(empty)
    shutil.copy(japanese_checkpoint / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no weights found"):
        neoxja.AutoModelForCausalLM.from_pretrained(empty)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(japanese_checkpoint, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        neoxja.AutoModelForCausalLM.from_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        neoxja.AutoModelForCausalLM.from_pretrained(corrupt)
    (corrupt / "model.safetensors").unlink()
    (corrupt / "pytorch_model.bin").write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        neoxja.AutoModelForCausalLM.from_pretrained(corrupt)
    (corrupt / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        neoxja.AutoModelForCausalLM.from_pretrained(corrupt)
    (corrupt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama.*not supported"):
        neoxja.AutoModelForCausalLM.from_pretrained(corrupt)

    def drop_layer(t):
        del t["gpt_neox_japanese.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CheckpointError, match="lacks weights.*layers.1.mlp.dense_4h_to_h"):
        neoxja.AutoModelForCausalLM.from_pretrained(_rewrite_weights(japanese_checkpoint, tmp_path / "m", drop_layer))

    def add_key(t):
        t["gpt_neox_japanese.layers.0.something_new.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError, match="does not have.*something_new"):
        neoxja.AutoModelForCausalLM.from_pretrained(_rewrite_weights(japanese_checkpoint, tmp_path / "u", add_key))

    def wrong_shape(t):
        t["gpt_neox_japanese.final_layer_norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="final_layer_norm.weight has shape \\[7\\].*\\[64\\]"):
        neoxja.AutoModelForCausalLM.from_pretrained(_rewrite_weights(japanese_checkpoint, tmp_path / "s",
                                                                     wrong_shape))
    bad_config = tmp_path / "badconfig"
    shutil.copytree(japanese_checkpoint, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    config["num_attention_heads"] = 5
    (bad_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="hidden_size = 64 is invalid.*divisible"):
        neoxja.AutoModelForCausalLM.from_pretrained(bad_config)


def test_config_validation_and_defaults():
    config = neoxja.GPTNeoXJapaneseConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == \
        (32000, 2560, 32, 32)
    assert (config.intermediate_multiple_size, config.hidden_act, config.rotary_pct, config.rotary_emb_base) == \
        (4, "gelu", 1.0, 10000.0)
    assert (config.max_position_embeddings, config.initializer_range, config.layer_norm_eps) == (2048, 0.02, 1e-5)
    assert (config.bos_token_id, config.eos_token_id, config.attention_dropout, config.hidden_dropout) == \
        (31996, 31999, 0.1, 0.0)
    assert config.use_cache and config.tie_word_embeddings and config.intermediate_size == 10240
    reference = transformers.GPTNeoXJapaneseConfig()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "attention_dropout", "hidden_dropout", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(reference, key), key
    neox = neoxja.GPTNeoXConfig()
    assert neox.rotary_pct == 0.25 and neox.use_parallel_residual and not neox.tie_word_embeddings
    for bad, match in [({"vocab_size": 0}, "vocab_size"), ({"hidden_act": "mish"}, "hidden_act"),
                       ({"attention_dropout": 1.5}, "attention_dropout"), ({"eos_token_id": "x"}, "eos_token_id"),
                       ({"rope_scaling": {"type": "weird"}}, "rope_type"),
                       ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
                       ({"rotary_pct": 0.0}, "partial_rotary_factor")]:
        with pytest.raises(ConfigError, match=match):
            neoxja.GPTNeoXJapaneseConfig(**bad)
    legacy = neoxja.GPTNeoXJapaneseConfig(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_type"] == "linear" and legacy.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize("settings", [
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), dict(load_in_8bit=True)], ids=["nf4-double", "fp4", "int8"])
def test_quantized_checkpoint_round_trip(tmp_path, japanese_checkpoint, settings):
    model = neoxja.AutoModelForCausalLM.from_pretrained(
        japanese_checkpoint, quantization_config=neoxja.BitsAndBytesConfig(**settings))
    model.save_pretrained(tmp_path)
    assert "quantization_config" in json.loads((tmp_path / "config.json").read_text())
    again = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)  # pre-quantized: no quantization_config needed
    assert torch.equal(logits(again), logits(model))


def quantized_modules(model) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ in (
        "Linear4bit", "Int8Linear", "Linear8bitLt")}


SKIP_LISTS = [None, [], ["embed_out"], ["gpt_neox.layers.1", "gpt_neox_japanese.layers.1"], ["dense_4h_to_h"],
              [r"gpt_neox(_japanese)?\.layers\.\d+\.attention"], ["layers.1"], ["gpt_neox.layers.1.mlp"], ["h_to_4h"],
              ["lm_head"]]


@pytest.mark.parametrize("family", ["japanese", "neox"])
def test_skip_modules_pick_what_transformers_picks(request, family):
    """llm_int8_skip_modules as transformers 5 reads it: None keeps the head in float; a list replaces that default
    (so [] quantizes the head too); entries match from the name's start up to a module boundary, as regular
    expressions, or as plain suffixes."""
    path = request.getfixturevalue(f"{family}_checkpoint")
    transformers.logging.set_verbosity_error()
    head = "embed_out" if family == "japanese" else "lm_head"  # the head's name in the reference's model
    for skip in SKIP_LISTS:
        # neoxja's head answers to both names (embed_out, lm_head); the reference's only to its own
        their_skip = None if skip is None else [head if s in ("embed_out", "lm_head") else s for s in skip]
        for kind in [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), dict(load_in_8bit=True)]:
            ours = neoxja.AutoModelForCausalLM.from_pretrained(
                path, quantization_config=neoxja.BitsAndBytesConfig(llm_int8_skip_modules=skip, **kind))
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                path, device_map="cpu",
                quantization_config=transformers.BitsAndBytesConfig(llm_int8_skip_modules=their_skip, **kind))
            expected = {name.replace("lm_head", "embed_out") for name in quantized_modules(theirs)}
            assert quantized_modules(ours) == expected, (skip, kind)
            assert len(expected) > 0
    with pytest.raises(ConfigError, match=r"llm_int8_skip_modules entry '\(' is not a valid regular expression"):
        neoxja.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["("])


@pytest.mark.parametrize("settings", [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True), dict(load_in_8bit=True)],
                         ids=["nf4-double", "int8"])
@pytest.mark.parametrize("family", ["japanese", "neox"])
def test_quantized_head_saves_loads_and_decodes(request, tmp_path, family, settings):
    """llm_int8_skip_modules=[] quantizes the head too; the ABEJA model's tied head gets its own quantized copy while
    the input embedding stays in float."""
    path = request.getfixturevalue(f"{family}_checkpoint")
    plain = neoxja.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = neoxja.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=neoxja.BitsAndBytesConfig(llm_int8_skip_modules=[], **settings))
    assert "embed_out" in quantized_modules(model) and not model.heads_tied
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    head = model.embed_out.dequantize().float()
    reference = plain.embed_out.weight
    assert head.shape == reference.shape and 0 < (head - reference).abs().max() <= reference.abs().max() / 4
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "embed_out differs from embed_in" warning: a quantized head is its own
        again = neoxja.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "embed_out" in quantized_modules(again)
    assert torch.equal(logits(again), logits(model))
    ids = IDS[:, :3]
    assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False),
                       model.generate(ids, max_new_tokens=6, do_sample=False))
