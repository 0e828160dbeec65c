"""The tokenizer base class (neoxja.tokenization.base) on a toy character-level subclass: special-token splitting,
truncation and padding rules, tensors, the streaming decoder's contract, and checkpoint files."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neoxja.errors import CheckpointError, InputError
from neoxja.files import write_atomic
from neoxja.tokenization.base import BatchEncoding, Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<sep>", "<s>x"]


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet; "</s>" ends every sequence; decode strips like ABEJA's."""

    vocab_files = {"vocab_file": "chars.txt"}

    def __init__(self, vocab_file, *, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", bos_token="<s>", **kw):
        with open(vocab_file, encoding="utf-8") as f:
            self.tokens = f.read().split("\n")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        super().__init__(eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, bos_token=bos_token, **kw)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.ids.get(token, self.ids["<unk>"])

    def _convert_id_to_token(self, index):
        return self.tokens[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens).strip()

    def build_inputs_with_special_tokens(self, ids_a, ids_b=None):
        eos = [self.eos_token_id]
        return ids_a + eos if ids_b is None else ids_a + eos + ids_b + eos

    @property
    def vocab_size(self):
        return len(self.tokens)

    def get_vocab(self):
        return dict(self.ids)

    def save_vocabulary(self, directory):
        return (str(write_atomic(os.path.join(directory, "chars.txt"), "\n".join(self.tokens))),)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chars")
    (path / "chars.txt").write_text("\n".join(SPECIALS + list("abcdefgh xyz\u3000")), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return CharTokenizer(vocab_dir / "chars.txt", additional_special_tokens=["<sep>", "<s>x"])


def ids_of(tok, text):
    return [tok.ids[c] for c in text]


def test_special_tokens_split_whole_and_longest_first(tok):
    assert tok.tokenize("ab<s>xc</s><sep>q") == ["a", "b", "<s>x", "c", "</s>", "<sep>", "q"]
    assert tok.tokenize("<s>y") == ["<s>", "y"]
    assert tok.all_special_tokens == ["<s>", "</s>", "<unk>", "<pad>", "<sep>", "<s>x"]
    assert tok.all_special_ids == [1, 2, 3, 0, 4, 5]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 3, 0)
    assert tok.encode("a<unk>", add_special_tokens=False) == [tok.ids["a"], 3]


def test_truncation_keeps_room_for_special_tokens(tok, vocab_dir):
    a, b = "abcdefgh", "xyz"
    assert tok.encode(a, max_length=4) == ids_of(tok, "abc") + [2]
    assert tok.encode(a, b, max_length=6, truncation=True) == ids_of(tok, "ab") + [2] + ids_of(tok, "xy") + [2]
    assert tok.encode(a, b, max_length=6, truncation="only_first") == ids_of(tok, "a") + [2] + ids_of(tok, "xyz") + [2]
    with pytest.raises(InputError, match="too short"):
        tok.encode(a, b, max_length=6, truncation="only_second")
    with pytest.raises(InputError, match="special tokens"):
        tok.encode(a, b, max_length=1, truncation=True)
    assert tok.encode(a, max_length=3, truncation=False) == ids_of(tok, a) + [2]

    left = CharTokenizer(vocab_dir / "chars.txt", truncation_side="left")
    assert left.encode(a, max_length=4) == ids_of(left, "fgh") + [2]


def test_padding(tok, vocab_dir):
    enc = tok(["ab", "abcd"], padding=True)
    assert enc.input_ids == [ids_of(tok, "ab") + [2, 0, 0], ids_of(tok, "abcd") + [2]]
    assert enc.attention_mask == [[1, 1, 1, 0, 0], [1] * 5]
    enc = tok(["ab", "abcd"], padding="max_length", max_length=8, padding_side="left", return_tensors="pt")
    assert enc.input_ids.shape == (2, 8) and enc.attention_mask[0].tolist() == [0] * 5 + [1] * 3
    assert tok(["a"], padding=True, pad_to_multiple_of=4)["input_ids"] == [[tok.ids["a"], 2, 0, 0]]
    assert tok("ab", padding="max_length", max_length=4)["input_ids"] == ids_of(tok, "ab") + [2, 0]
    single = tok.pad({"input_ids": [1, 2]}, padding="max_length", max_length=3)
    assert single == {"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}
    batch = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]])}
    padded = tok.pad(batch, max_length=3, padding="max_length", return_tensors="np")
    assert padded["input_ids"].tolist() == [[5, 6, 0]] and padded["attention_mask"].tolist() == [[1, 1, 0]]
    with pytest.raises(InputError, match="max_length"):
        tok(["a"], padding="max_length")
    no_pad = CharTokenizer(vocab_dir / "chars.txt", pad_token=None)
    with pytest.raises(InputError, match="pad_token"):
        no_pad(["a", "ab"], padding=True)
    assert no_pad(["a", "b"], padding=True)["input_ids"] == [[no_pad.ids["a"], 2], [no_pad.ids["b"], 2]]


def test_tensors_and_batch_encoding(tok):
    enc = tok("ab", return_tensors="pt")
    assert enc.input_ids.tolist() == [ids_of(tok, "ab") + [2]] and enc.input_ids.dtype == torch.long
    assert enc.to("cpu") is enc
    assert isinstance(tok("ab", return_tensors="np")["input_ids"], np.ndarray)
    assert tok("", return_tensors="pt", add_special_tokens=False).input_ids.shape == (1, 0)
    assert pickle.loads(pickle.dumps(enc)).input_ids.tolist() == enc.input_ids.tolist()
    with pytest.raises(AttributeError):
        enc.token_type_ids
    with pytest.raises(InputError, match="token type"):
        tok("ab", return_token_type_ids=True)
    assert isinstance(tok(["a", "b"]), BatchEncoding)


def test_decode(tok):
    ids = tok.encode(" ab<sep>c ")
    assert tok.decode(ids) == "ab<sep>c </s>"
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert tok.convert_ids_to_tokens(ids[:3]) == [" ", "a", "b"] and tok.convert_ids_to_tokens(4) == "<sep>"
    assert tok.batch_decode(np.array([ids, ids])) == ["ab<sep>c </s>"] * 2
    with pytest.raises(InputError, match="out of range"):
        tok.decode([len(tok)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(SPECIALS) + 12), max_size=20), st.booleans(), st.randoms())
def test_stream_decoder_contract(tok, ids, skip, rng):
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(decoder.add(ids[i : i + n]))
        i += n
    out.append(decoder.finish())
    assert "".join(out) == tok.decode(ids, skip_special_tokens=skip)
    assert decoder.finish() == ""  # reusable


def test_from_pretrained_reads_configs_and_overrides(vocab_dir, tmp_path):
    (tmp_path / "chars.txt").write_bytes((vocab_dir / "chars.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CharTokenizer", "name_or_path": "x", "added_tokens_decoder": {}, "not_an_argument": 1,
        "model_max_length": 7, "eos_token": {"content": "<sep>", "__type": "AddedToken"}, "padding_side": "left",
    }))  # fmt: skip
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    loaded = CharTokenizer.from_pretrained(tmp_path, bos_token="<s>x")
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<sep>", "<unk>", "<s>x")
    assert loaded.model_max_length == 7 and loaded.padding_side == "left"
    assert loaded.encode("abcdefgh", truncation=True) == ids_of(loaded, "abcdef") + [4]
    written = loaded.save_pretrained(tmp_path / "saved")
    assert [os.path.basename(p) for p in written] == ["tokenizer_config.json", "special_tokens_map.json", "chars.txt"]
    assert not [p for p in os.listdir(tmp_path / "saved") if p.startswith(".tmp")]
    again = CharTokenizer.from_pretrained(tmp_path / "saved")
    assert again.special_tokens_map == loaded.special_tokens_map and again.model_max_length == 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="chars.txt not found"):
        CharTokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "chars.txt").write_text("a")
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        CharTokenizer.from_pretrained(tmp_path / "broken")
