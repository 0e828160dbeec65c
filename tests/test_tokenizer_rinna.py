"""rinna's SentencePiece tokenizer (neoxja.tokenization.spm) on a locally trained rinna-layout checkpoint:
ids equal to sentencepiece's own (+ "</s>"), the model card's behaviours, byte fallback, loading/saving, and
chat prompts. transformers is not the oracle here: it mis-tokenizes this layout (checkpoint-facts.md)."""
import pickle
import shutil
import unicodedata

import pytest
import sentencepiece as spm
import torch

import neoxja
from neoxja import AutoTokenizer
from neoxja.chat import build_prompt, parse_reply
from neoxja.errors import CheckpointError
from neoxja.tokenization.spm import SentencePieceTokenizer
from rinna_fixtures import BOS, EOS, PAD, PPO_MESSAGES, PPO_PROMPT, UNK, shared_data_dir, write_rinna_tokenizer_files
from rinna_fixtures import rinna_checkpoint  # noqa: F401  (a fixture; pytest finds it in this module's namespace)

CARD_TEXT = "გამარჯობა  吾輩は  猫である   "

# Scripts and characters the training slice never contains: each must survive as UTF-8 byte pieces.
UNSEEN = {
    "georgian": "გამარჯობა",
    "arabic": "مرحبا بالعالم",
    "emoji": "猫🐈と犬🐕‍🦺",
    "rare kanji": "𠮷野家の𩸽",
    "hangul": "안녕하세요",
}

WHITESPACE = ["", " ", "   ", "\t吾輩\t", "先頭  中  末尾  ", "全角　空白", "改行\nの\r\n扱い", "ASCII words, 123!"]


@pytest.fixture(scope="module")
def tokenizer(rinna_checkpoint):
    return AutoTokenizer.from_pretrained(rinna_checkpoint, use_fast=False)


@pytest.fixture(scope="module")
def sp(rinna_checkpoint):
    return spm.SentencePieceProcessor(model_file=str(rinna_checkpoint / "spiece.model"))


@pytest.fixture(scope="module")
def corpus_lines():
    with open(shared_data_dir() / "corpus" / "valid.txt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(300), f)]
    assert len(lines) == 300
    return lines


# ---- picking and loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_fast", [None, False, True])
def test_auto_tokenizer_picks_sentencepiece(rinna_checkpoint, use_fast):
    tok = AutoTokenizer.from_pretrained(rinna_checkpoint, use_fast=use_fast)
    assert type(tok) is SentencePieceTokenizer
    assert tok.encode(CARD_TEXT) == AutoTokenizer.from_pretrained(rinna_checkpoint).encode(CARD_TEXT)


def test_t5_tokenizer_name_is_the_same_class(rinna_checkpoint):
    assert neoxja.T5Tokenizer is SentencePieceTokenizer
    assert neoxja.T5Tokenizer.from_pretrained(rinna_checkpoint).encode(CARD_TEXT) == \
        AutoTokenizer.from_pretrained(rinna_checkpoint).encode(CARD_TEXT)


def test_special_tokens_and_ids(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == \
        ("<s>", "</s>", "<unk>", "[PAD]")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id) == \
        (BOS, EOS, UNK, PAD)
    assert sorted(tokenizer.all_special_ids) == [PAD, UNK, BOS, EOS]
    assert len(tokenizer) == tokenizer.vocab_size == 4000
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 4000 and vocab["</s>"] == EOS and vocab["<0xE1>"] == tokenizer.convert_tokens_to_ids("<0xE1>")


def test_save_and_reload(tokenizer, rinna_checkpoint, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "spiece.model").read_bytes() == (rinna_checkpoint / "spiece.model").read_bytes()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is SentencePieceTokenizer
    assert again.special_tokens_map == tokenizer.special_tokens_map
    for text in [CARD_TEXT, PPO_PROMPT, *UNSEEN.values()]:
        assert again.encode(text) == tokenizer.encode(text)


def test_pickles(tokenizer):
    # DataLoader workers and multiprocessing pools ship the tokenizer by pickle.
    assert pickle.loads(pickle.dumps(tokenizer)).encode(CARD_TEXT) == tokenizer.encode(CARD_TEXT)


def test_broken_checkpoints(rinna_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="spiece.model"):
        SentencePieceTokenizer.from_pretrained(tmp_path)
    shutil.copytree(rinna_checkpoint, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="cannot load SentencePiece model"):
        AutoTokenizer.from_pretrained(tmp_path / "corrupt")
    with pytest.raises(CheckpointError, match=r"\['<mask>'\] are not pieces"):
        AutoTokenizer.from_pretrained(rinna_checkpoint, additional_special_tokens=["<mask>"])
    with pytest.raises(CheckpointError, match="extra_ids"):
        AutoTokenizer.from_pretrained(rinna_checkpoint, extra_ids=100)


# ---- ids: sentencepiece is the oracle ----------------------------------------------------------------------


def test_ids_equal_sentencepiece_on_corpus(tokenizer, sp, corpus_lines):
    for line in corpus_lines:
        assert tokenizer.encode(line, add_special_tokens=False) == sp.encode(line)
        assert tokenizer.encode(line) == sp.encode(line) + [EOS]
        assert tokenizer.tokenize(line) == sp.encode(line, out_type=str)


@pytest.mark.parametrize("text", WHITESPACE + list(UNSEEN.values()) + [CARD_TEXT, PPO_PROMPT])
def test_ids_equal_sentencepiece_on_edge_cases(tokenizer, sp, text):
    assert tokenizer.encode(text) == sp.encode(text) + [EOS]
    assert tokenizer(text)["input_ids"] == sp.encode(text) + [EOS]


def test_batch_encoding_pads_with_pad_id(tokenizer, sp):
    batch = tokenizer(["吾輩は猫である", "猫"], padding=True, return_tensors="pt")
    short = sp.encode("猫") + [EOS]
    width = len(sp.encode("吾輩は猫である")) + 1
    assert batch["input_ids"][1].tolist() == short + [PAD] * (width - len(short))
    assert batch["attention_mask"][1].tolist() == [1] * len(short) + [0] * (width - len(short))


def test_eos_is_appended_once(tokenizer, sp):
    # As rinna's T5Tokenizer (transformers 4.x): "</s>" in the text is the special token, and a sequence that
    # already ends with it gets no second one.
    assert tokenizer.encode("猫</s>") == sp.encode("猫") + [EOS]
    assert tokenizer.encode("猫", "犬") == sp.encode("猫") + [EOS] + sp.encode("犬") + [EOS]


# ---- the model card's three behaviours ---------------------------------------------------------------------


def test_card_no_dummy_prefix(tokenizer):
    assert tokenizer.tokenize("吾輩は猫である") == ["吾", "輩", "は", "猫", "である"]


def test_card_whitespace_kept(tokenizer):
    assert tokenizer.tokenize("  吾輩は  猫である   ") == ["▁", "▁", "吾", "輩", "は", "▁", "▁", "猫", "である", "▁", "▁", "▁"]


def test_card_decode_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer.encode(CARD_TEXT)) == "გამარჯობა  吾輩は  猫である   </s>"
    assert tokenizer.decode(tokenizer.encode(CARD_TEXT), skip_special_tokens=True) == CARD_TEXT


def test_card_generation_snippet_shapes(tokenizer, sp):
    # The card: encode(text, add_special_tokens=False, return_tensors="pt") -> a [1, n] LongTensor.
    ids = tokenizer.encode("西田幾多郎は、", add_special_tokens=False, return_tensors="pt")
    assert ids.dtype == torch.long and ids.tolist() == [sp.encode("西田幾多郎は、")]


# ---- byte fallback ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_byte_fallback_round_trip(tokenizer, name):
    text = UNSEEN[name]
    assert unicodedata.normalize("NFKC", text) == text  # the model's normalizer leaves it as is
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert UNK not in ids
    assert any(piece.startswith("<0x") for piece in tokenizer.convert_ids_to_tokens(ids))
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text


@pytest.mark.parametrize("text", ["", " ", "   ", "先頭  中  末尾  ", "გამარჯობა  吾輩は", "🐈‍⬛ 𩸽"])
def test_whitespace_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_control_whitespace_becomes_space(tokenizer):
    # The model's nmt_nfkc normalizer turns tabs and newlines into spaces: why rinna's chat format needs <NL>.
    assert tokenizer.decode(tokenizer.encode("\t吾輩\n猫"), skip_special_tokens=True) == " 吾輩 猫"


def test_special_tokens_render_between_runs(tokenizer):
    ids = [BOS] + tokenizer.encode("猫🐈", add_special_tokens=False) + [EOS, PAD, UNK]
    assert tokenizer.decode(ids) == "<s>猫🐈</s>[PAD]<unk>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "猫🐈"
    assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) == "<s>猫🐈</s>[PAD]<unk>"


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("猫🐈ですგამარჯობა  ", add_special_tokens=True)
    stream = tokenizer.stream_decoder()
    chunks = [stream.add(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + stream.finish() == tokenizer.decode(ids) == "猫🐈ですგამარჯობა  </s>"


# ---- the .model file decides: rinna's GPT-2 vocabulary (dummy prefix, spaces folded, no byte fallback) ------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    model = (shared_data_dir() / "rinna-gpt2-spm" / "google_sp.model").read_bytes()
    return write_rinna_tokenizer_files(tmp_path_factory.mktemp("rinna-gpt2"), model_proto=model)


def test_follows_the_model_file(gpt2_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(gpt2_dir / "spiece.model"))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    # SOURCE.md's documented encoding of this file.
    assert tok.encode("吾輩は猫である。名前はまだ無い。", add_special_tokens=False) == \
        [9, 5361, 31082, 11, 4324, 27, 8, 1515, 6389, 8404, 8]
    assert tok.tokenize("  吾輩は  猫である") == ["▁", "吾", "輩", "は", "▁", "猫", "である"]
    for text in WHITESPACE + [CARD_TEXT]:
        assert tok.encode(text) == sp.encode(text) + [2]
    assert tok.unk_token_id in tok.encode("გ")


# ---- chat ---------------------------------------------------------------------------------------------------


def test_chat_template_text(tokenizer):
    assert tokenizer.apply_chat_template(PPO_MESSAGES, tokenize=False) == PPO_PROMPT
    assert tokenizer.apply_chat_template(PPO_MESSAGES[:1], tokenize=False, add_generation_prompt=False) == \
        "ユーザー: コンタクトレンズを慣れるにはどうすればよいですか？"


def test_chat_template_ids(tokenizer, sp):
    expected = sp.encode(PPO_PROMPT)  # no "</s>": the cards encode prompts with add_special_tokens=False
    encoded = tokenizer.apply_chat_template(PPO_MESSAGES)
    assert encoded["input_ids"] == expected and encoded["attention_mask"] == [1] * len(expected)
    assert tokenizer.apply_chat_template(PPO_MESSAGES, return_dict=False) == expected
    tensor = tokenizer.apply_chat_template(PPO_MESSAGES, return_dict=False, return_tensors="pt")
    assert tensor.tolist() == [expected]
    assert tokenizer.convert_tokens_to_ids("<NL>") in expected  # the fixture's <NL> is one piece


def test_chat_template_batch(tokenizer, sp):
    short = [{"role": "user", "content": "こんにちは"}]
    batch = tokenizer.apply_chat_template([PPO_MESSAGES, short], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, len(sp.encode(PPO_PROMPT)))
    assert batch["input_ids"][1, : len(sp.encode(build_prompt(short)))].tolist() == sp.encode(build_prompt(short))
    assert tokenizer.apply_chat_template([PPO_MESSAGES, short], tokenize=False) == [PPO_PROMPT, build_prompt(short)]


def test_chat_reply_round_trip(tokenizer):
    # What the card does with a generated reply: decode, then <NL> -> newline, minus the final </s>.
    reply_ids = tokenizer.encode("はい。<NL>目薬を試してください。")  # ends with </s> like a generation
    assert parse_reply(tokenizer.decode(reply_ids)) == "はい。\n目薬を試してください。"


def test_lone_surrogate_is_a_clear_error(tokenizer):
    from neoxja.errors import InputError

    with pytest.raises(InputError, match=r"lone surrogate U\+D800 at position 2"):
        tokenizer("猫が\ud800いる")
    with pytest.raises(InputError, match="lone surrogate"):
        tokenizer.tokenize("\udfff")
