"""The ABEJA tokenizer (neoxja.tokenization.abeja) against transformers' GPTNeoXJapaneseTokenizer, the oracle:
identical ids (and tokens) on the shared corpus, hard hand-made cases and random text, for do_clean_text off and
on, on both the C and the pure-Python segmentation path; golden data from reference-spec §4.10/§4.11; decoding
(with byte runs joined), streaming, the tokenizer surface, files and errors."""
from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neoxja
from neoxja.errors import CheckpointError, InputError
from neoxja.tokenization import AutoTokenizer, GPTNeoXJapaneseTokenizer
from neoxja.tokenization import abeja as abeja_module

DATA = Path(abeja_module.__file__).resolve().parent.parent / "data" / "abeja"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
HUB_ID = "abeja/gpt-neox-japanese-2.7b"
BYTE0 = 31741  # id of <|byte0|>

# ----------------------------------------------------------------------------------------------------------
# Fixtures: ours on both paths, and the reference, for do_clean_text False and True


def ours(clean: bool, native: bool) -> GPTNeoXJapaneseTokenizer:
    return GPTNeoXJapaneseTokenizer(DATA / "vocab.txt", DATA / "emoji.json", do_clean_text=clean, use_native=native)


def reference(clean: bool) -> transformers.GPTNeoXJapaneseTokenizer:
    return transformers.GPTNeoXJapaneseTokenizer(str(DATA / "vocab.txt"), str(DATA / "emoji.json"), do_clean_text=clean)


@pytest.fixture(scope="module")
def pairs():
    """{clean: (native, pure, reference)}."""
    assert abeja_module._abeja_native is not None, "build the C extension (see README) to test both paths"
    return {clean: (ours(clean, True), ours(clean, False), reference(clean)) for clean in (False, True)}


@pytest.fixture(scope="module")
def tok(pairs):
    return pairs[False][0]


@pytest.fixture(scope="module")
def ref(pairs):
    return pairs[False][2]


def assert_same_ids(pairs, texts, clean=None):
    for c in (False, True) if clean is None else (clean,):
        native, pure, ref = pairs[c]
        for text in texts:
            want = ref.encode(text)
            assert native.encode(text) == want, (c, text)
            assert pure.encode(text) == want, (c, text)
            assert pure.tokenize(text) == ref.tokenize(text), (c, text)


def reference_text(ref, ids: list[int], skip_special_tokens: bool = False) -> str:
    """The reference's decode with runs of <|byteN|> decoded together as UTF-8 (the one intended difference).

    Every other id is rendered by the reference's own convert_ids_to_tokens; joined and stripped as it does."""
    if skip_special_tokens:
        ids = [i for i in ids if i not in ref.all_special_ids]
    pieces, run = [], bytearray()
    for i in ids:
        word = ref.ids_to_tokens[i][0]
        if word.startswith("<|byte") and word.endswith("|>"):
            run.append(int(word[6:-2]))
            continue
        pieces.append(run.decode("utf-8", errors="replace"))
        run.clear()
        pieces.append(ref.convert_ids_to_tokens(i))
    pieces.append(run.decode("utf-8", errors="replace"))
    text = "".join(pieces).strip()
    if not any(i - BYTE0 in range(255) for i in ids):
        assert text == ref.decode(ids, skip_special_tokens=skip_special_tokens)  # the definition agrees with it
    return text


# ----------------------------------------------------------------------------------------------------------
# Golden data (reference-spec §4.10, §4.11)

DOC_TEXT = "吾輩は猫である🐯。実は慶応(慶應)大学出身"
DOC_IDS = [30014, 26883, 26638, 27228, 25, 26650, 31732, 31679, 27809, 26638, 17749, 31592, 17749, 31593, 321, 1281]

GOLDEN = [
    ("人とAIが協調するためには、", [28579, 26632, 31616, 31624, 26653, 21242, 5, 80, 36, 31678]),
    ("人とAIが協調するためには、\n", [28579, 26632, 31616, 31624, 26653, 21242, 5, 80, 36, 31678, 31718]),
    ("日本語のGPT-neoxがHugging Faceで使えます😀", [77, 28459, 26637, 31622, 31631, 31635, 31597, 31661, 31652,
     31662, 31671, 26653, 31623, 31668, 31654, 31654, 31656, 31661, 31654, 31719, 31621, 31648, 31650, 31652,
     26666, 28779, 656, 26625, 31729]),
    ("ありがとう。", [30, 465, 26615, 31679]),
    ("どういたしまして。", [208, 15, 17, 0, 31679]),
    ("データサイエンティストとは、", [352, 14016, 1533, 26759, 26707, 26773, 50, 96, 31678]),
    ("100年後に必要とされる会社は、", [31601, 31600, 31600, 3604, 26634, 290, 960, 28, 113, 26638, 31678]),
    ("フルリモートの環境で働くために必要なことは、", [1007, 3651, 26760, 26708, 26637, 770, 26666, 26962, 4157, 334,
     290, 1061, 96, 31678]),
    ("国境の長いトンネルを抜けると", [8653, 26637, 28755, 26614, 771, 777, 26682, 28569, 148, 26632]),
    ("美味しい日本食といえば、", [1298, 74, 77, 28723, 33, 592, 31678]),
    ("国境の長いトンネルを抜けると、そこは雪国だった。", [8653, 26637, 28755, 26614, 771, 777, 26682, 28569, 148, 26632,
     31678, 542, 26638, 27160, 27045, 171, 26628, 31679]),
    ("a  b", [31648, 31719, 31719, 31649]),
    (" 先頭と末尾 ", [31719, 8470, 26632, 21098, 31719]),
    ("改行\n\nタブ\tCR\r\nX", [21014, 31718, 31718, 2965, 31720, 31618, 31633, 31718, 31639]),
    ("1,000円", [31601, 31785, 31600, 31600, 31600, 27991]),
    ("𝔘", [31981, 31898, 31889, 31893]),
    ("é", [31936, 31910]),
    ("Ω", [31947, 31910]),
    ("¡", [31727]),
    ("ǀ", [31727]),
    ("―", [31728]),
    ("\u2000", [31728]),
    ("⯿", [31728]),
    ("Ⰰ", [31967, 31917, 31869]),
    ("😀😃🤕", [31729, 31729, 31730]),
    ("©2024", [31738, 31602, 31600, 31602, 31604]),
    ("<unk>", [31612, 31668, 31661, 31658, 31554]),
    ("hello world", [31655, 31652, 31659, 31659, 31662, 31719, 31670, 31662, 31665, 31659, 31651]),
    ("東京都", [188, 28530]),
    ("   ", [31719, 31719, 31719]),
    ("文<|endoftext|>文", [26865, 31999, 26865]),
    ("<|startoftext|>こんにちは", [31996, 469, 1957, 26638]),
    ("<|byte65|>", [31806]),
    ("", []),
]

GOLDEN_DECODE = [
    (DOC_IDS, False, "吾輩は猫である🐯。実は慶応(慶応)大学出身"),
    ([31648, 31719, 31719, 31649], False, "a  b"),
    ([31719, 8470, 26632, 21098, 31719], False, "先頭と末尾"),
    ([21014, 31718, 31718, 2965, 31720, 31618, 31633, 31718, 31639], False, "改行\n\nタブ\tCR\nX"),
    ([31727], False, "ǀ"),
    ([31728], False, "‖"),
    ([31738, 31602, 31600, 31602, 31604], False, "🟥2024"),
    ([31719, 31719, 31719], False, ""),
    ([100, 31999, 100], False, "うに<|endoftext|>うに"),
    ([100, 31999, 100], True, "うにうに"),
    ([100, 31719, 31999], False, "うに <|endoftext|>"),
    ([100, 31719, 31999], True, "うに"),
    ([31719, 100, 31719], False, "うに"),
    ([31999, 31999], False, "<|endoftext|><|endoftext|>"),
    ([31999, 31999], True, ""),
    ([31596], False, ""),
    # The intended improvement: byte runs decode together (the reference gives "����" and "��").
    ([31981, 31898, 31889, 31893], False, "𝔘"),
    ([31936, 31910], False, "é"),
]


def test_documented_example(tok):
    assert tok(DOC_TEXT)["input_ids"] == DOC_IDS
    assert tok.decode(tok(DOC_TEXT)["input_ids"]) == "吾輩は猫である🐯。実は慶応(慶応)大学出身"
    assert tok.encode("慶応") == tok.encode("慶應") == [17749]


@pytest.mark.parametrize("native", [True, False])
def test_golden_ids(pairs, native):
    tok = pairs[False][0 if native else 1]
    for text, ids in GOLDEN:
        assert tok.encode(text) == ids, text


def test_golden_decode(tok):
    for ids, skip, text in GOLDEN_DECODE:
        assert tok.decode(ids, skip_special_tokens=skip) == text, ids


def test_golden_clean_text(pairs):
    examples = {
        "詳細はhttps://example.com/a?b=1をご覧ください": "詳細は<URL>をご覧ください",
        "電話は03-1234-5678です": "電話は<TEL>です",
        "(090)1234-5678": "<TEL>",
        "2023年12月25日(月)に": "<DATE>に",
        "12/25": "<DATE>",
        "5月": "<DATE>",
        "第1-2章": "第<DATE>章",
        "価格は1,980円(税込)": "価格は<PRICE>",
        "3万円": "<PRICE>",
        "100ドル": "<PRICE>",
        "──━━│": "<BLOCK>",
        "1234567": "<TEL>",
        "１２３": "１２３",
        "令和5年4月1日10時": "令和5年<DATE>時",
    }
    tok = pairs[True][0]
    for text, cleaned in examples.items():
        assert tok.normalize(text) == cleaned, text
        assert tok.encode(text) == pairs[False][0].encode(cleaned)


def test_reference_test_file_toy_vocabulary(tmp_path):
    """transformers' own tokenizer test (§4.11): min-id rule, variant folding, unk fallback for missing bytes."""
    lines = ["こん", "こんに", "にちは", "ばんは", "世界,㔺界", "、", "。", "<BR>", "<SP>", "<TAB>", "<URL>", "<EMAIL>",
             "<TEL>", "<DATE>", "<PRICE>", "<BLOCK>", "<KIGOU>", "<U2000U2BFF>", "<|emoji1|>", "<unk>",
             "<|startoftext|>", "<|endoftext|>"]  # fmt: skip
    (tmp_path / "vocab.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "emoji.json").write_text(json.dumps({"emoji": {"😀": "<|emoji1|>"}, "emoji_inv": {"<|emoji1|>": "😀"}}))
    for native in (True, False):
        tok = GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path, unk_token="<unk>", use_native=native)
        text = "こんにちは、世界。　こんばんは、㔺界。"
        assert tok.tokenize(text) == ["こん", "にちは", "、", "世界", "。", "<SP>", "こん", "ばんは", "、", "㔺界", "。"]
        assert tok.encode(text) == [0, 2, 5, 4, 6, 8, 0, 3, 5, 4, 6]
        assert tok.convert_tokens_to_ids(tok.tokenize(text) + ["<unk>"])[-1] == 19
        output = "こんにちは、世界。 \nこんばんは、世界。😀"
        assert tok.encode(output) == [0, 2, 5, 4, 6, 8, 7, 0, 3, 5, 4, 6, 18]
        assert tok.decode(tok.encode("こんにちは、世界。 \nこんばんは、㔺界。😀")) == output
        assert tok.encode("xyz") == [19, 19, 19]
        ids_1, ids_2 = tok.encode("こん"), tok.encode("、")
        assert tok.build_inputs_with_special_tokens(ids_1) == ids_1
        assert tok.build_inputs_with_special_tokens(ids_1, ids_2) == ids_1 + ids_2


# ----------------------------------------------------------------------------------------------------------
# Equality with the reference: corpus, hard cases, random text


SMALL_CORPUS = ("valid.txt", "test.txt")  # 1 M characters


def corpus_text() -> str:
    return "".join((CORPUS / name).read_text(encoding="utf-8") for name in SMALL_CORPUS)


@pytest.mark.slow
@pytest.mark.parametrize("clean", [False, True])
def test_corpus_line_by_line(pairs, clean):
    """Every line on its own. The default (do_clean_text=False) on every file of the shared corpus, 7.4 M
    characters; do_clean_text=True and the pure-Python path on valid.txt and test.txt."""
    native, pure, ref = pairs[clean]
    files = sorted(CORPUS.glob("*.txt")) if not clean else [CORPUS / name for name in SMALL_CORPUS]
    assert len(files) >= (2 if clean else 6)
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        want = [ref.encode(line) for line in lines]
        assert native(lines, add_special_tokens=False)["input_ids"] == want, path.name
        if path.name in SMALL_CORPUS:
            assert [pure.encode(line) for line in lines] == want, path.name


@pytest.mark.parametrize("clean", [False, True])
def test_corpus_in_large_chunks(pairs, clean):
    native, pure, ref = pairs[clean]
    text = corpus_text()
    rng = random.Random(clean)
    cuts = sorted(rng.sample(range(len(text)), 8))  # ragged chunks, cut anywhere (also inside a CRLF or a tag)
    for chunk in (text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])):
        want = ref.encode(chunk)
        assert native.encode(chunk) == want
        assert pure.encode(chunk) == want


HARD_CASES = [
    # emoji: ZWJ sequences, skin tones, flags, keycaps, text-style variants, emoticons, sequences mixed in text
    "👨‍👩‍👧‍👦", "🏴‍☠️", "👩🏽‍💻", "👍🏻👍🏿👍", "🧑🏾‍🤝‍🧑🏻", "🇯🇵🇺🇸🇬🇧🇦", "🇯", "1️⃣#️⃣*️⃣0⃣", "©®™ℹ️☺️❤️‍🔥",
    "(^_^)(^^)f^_^;m(_ _)m o(>_<)o", "猫😺と犬🐶🐕‍🦺が🏳️‍🌈", "😀" * 5 + "😃🤕⚽🐯🇯🇵🍙🥁🤚❤🟥🌏", "\U0001f9ff\U0001faf6\u200d",
    # tags produced by an earlier emoji key next to characters that start later keys
    "😀1️⃣", "(😀)", "m😀m", "<😀>", "😀|*￣ー￣|",
    # kana and kanji: half-width, rare, surrogate-pair, variation selectors, heterographs
    "ｱｲｳｴｵ ｶﾞｷﾞｸﾞ ﾊﾟﾋﾟ ｰ｡｢｣､･", "𠮷野家の𩸽と𪚲", "𡈽𠀋𦹀𧃴", "葛󠄀城市と辻󠄀", "弁󠄀護士の辯護", "齋藤と斎藤と齊藤",
    "き゛ゃ", "ゔヴヷヺ", "〆〻〳〵ゝゞヽヾ",
    # box drawing, block elements, symbols, dashes
    "┌─┬─┐\n│あ│い│\n└─┴─┘", "▀▄█░▒▓▔▕▖▟", "━━━ 見出し ━━━", "—−–‐‑‒―ー～〜", "…‥・※〒♪♭★☆→⇒∀∃",
    # control and invisible characters, unusual whitespace
    "\x00\x01\x07\x1b[0m\x7f", "\u200b\u200c\u200d\u2060\ufeff", "a\u2028b\u2029c\x85d\x0be\x0cf", "\u00a0\u3000\u2003",
    "\r\n\r\n\n\r\r", "\t\t a \t", "  先頭 ", "\r", "\n", "\u3000",
    # URLs, e-mails, phone numbers, dates, prices
    "詳細はhttps://example.com/a?b=1&c=%20#frag と http://x.jp/ と ftp://f.org/p", "mailto:foo.bar+baz@example.co.jp",
    "連絡先: taro_yamada@mail.example.com まで", "@only and a@b", "TEL 03-1234-5678 / (090)1234-5678 / 0120-123-456",
    "2023年12月25日(月)10時30分", "令和5年4月1日10時", "平成31年4月30日(火)", "1999/12/31 23:59", "12/25", "5月",
    "第1-2章", "1,980円(税込)", "3万円", "100ドル", "1億2千万円", "12,345,678ユーロ(税抜)", "500円+tax", "¥1,000",
    "１２３４５６７８円", "1234567", "٣٤٥ ١٢٣", "2024-01-15",
    # literal tags and partial tags
    "<SP><BR><TAB><|byte65|><|emoji1|><KIGOU><U2000U2BFF><|separator|><|nottoken|><BLOCK><URL>",
    "<|byte255|><|byte256|><|byte-1|><|emoji13|><|emoji0|>", "<", "<<", "<>", "<|", "<|>", "<S", "<SP", "a<b>c",
    "<|endoftext|>", "<|startoftext|>x<|endoftext|>", "<|endoftext", "<|endoftext|><|endoftext|>",
    "x <|endoftext|> y", "<|startoftext|><|startoftext|>", ",", ",,", "a,b",
    # mixed scripts and ranges around the fallback classes
    "Привет мир", "مرحبا بالعالم", "שלום", "हिन्दी", "ภาษาไทย", "한국어", "Ελληνικά", "ǀǁǂǃǄ", "¡¿¤¥§¨",
    "ʹʺ˿̀ͣ͢", "Ⰰ⯿\u2000\u2bff\u2c00", "ＡＢＣ１２３ａｂｃ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010ffff\U000e0001",
    "日本語のGPT-neoxがHugging Faceで使えます😀", DOC_TEXT,
]  # fmt: skip


def test_hard_cases(pairs):
    assert_same_ids(pairs, HARD_CASES)
    assert_same_ids(pairs, ["".join(HARD_CASES), " ".join(HARD_CASES)])


def test_hard_cases_decode(tok, ref):
    for text in HARD_CASES:
        ids = tok.encode(text)
        assert tok.decode(ids) == reference_text(ref, ids)
        assert tok.decode(ids, skip_special_tokens=True) == reference_text(ref, ids, skip_special_tokens=True)


def test_lone_surrogate_is_an_input_error(pairs):
    with pytest.raises(UnicodeEncodeError):
        pairs[False][2].encode("a\ud800b")
    for tok in pairs[False][:2]:
        with pytest.raises(InputError, match=r"surrogate U\+D800"):
            tok.encode("a\ud800b")


def _fragments() -> list[str]:
    """Pieces that make the interesting paths likely: emoji keys, tags, whitespace, clean_text material."""
    emoji_keys = list(json.loads((DATA / "emoji.json").read_text(encoding="utf-8"))["emoji"])
    pieces = ["<", ">", "|", "<SP>", "<BR>", "<|byte65|>", "<|byte227|>", "<|emoji", "<|emoji1|>", "<|endoftext|>",
              "<|startoftext|>", "<BLOCK>", "<KIGOU>", " ", "\u3000", "\r", "\n", "\r\n", "\t", "—", "−", "ー",
              "\u200d", "\ufe0f", "\U0001f3fb", "\U0001f1ef", "\U0001f1f5", "https://", "a.b", "@", "-", "(", ")",
              ",", "/", ":", "年", "月", "日", "時", "円", "万", "千", "億", "ドル", "(税込)", "令和", "─", "▀",
              "¡", "\u02b9", "\u2000", "…", "①", "𠮷", "ｶﾞ", "慶應", "であ", "る", "こんにちは", "東京都"]  # fmt: skip
    return pieces + [str(d) for d in range(10)] + random.Random(0).sample(emoji_keys, 300)


TEXTS = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(_fragments()) | st.text(max_size=3), max_size=25).map("".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS)
def test_random_text_same_ids_as_reference(pairs, text):
    assert_same_ids(pairs, [text])


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_random_text_round_trip(pairs, text):
    """decode(encode(x)) is the reference's normalisation of x: its decode of its ids, byte runs joined."""
    tok, _, ref = pairs[False]
    ids = tok.encode(text)
    assert tok.decode(ids) == reference_text(ref, ref.encode(text))
    if not any(i - BYTE0 in range(255) for i in ids):
        assert tok.decode(ids) == ref.decode(ids)


# ----------------------------------------------------------------------------------------------------------
# Decoding and streaming


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode(DOC_TEXT)
    want = tok.decode(ids)
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == want
    assert tok.decode(tok.encode(DOC_TEXT, return_tensors="pt")[0]) == want
    assert tok.batch_decode(torch.tensor([ids, ids])) == [want, want]
    assert tok.decode(26613) == "あ"
    assert tok.decode([np.int64(26613)]) == "あ"


def test_decode_matches_reference_per_token_views(tok, ref):
    ids = list(range(0, 32000, 7)) + list(range(31700, 32000))
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    skipped = ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == skipped
    assert tok.convert_tokens_to_string(["a", " ", "b", "\n"]) == ref.convert_tokens_to_string(["a", " ", "b", "\n"])
    text = "I 'm here . Yes , no !"
    assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=True) == "I'm here. Yes, no!"


def stream(tok, ids, skip, chunks):
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    out, i = [], 0
    for size in chunks:
        piece = decoder.add(ids[i : i + size] if size > 1 else ids[i])
        assert "\ufffd" not in piece or "\ufffd" in tok.decode(ids, skip_special_tokens=skip)
        out.append(piece)
        i += size
    out.append(decoder.add(ids[i:]))
    out.append(decoder.finish())
    return out


def test_stream_decoder_examples(tok):
    ids = tok.encode(" 𝔘は😀、\n改行 <|endoftext|> 終わり 𠮷 ")
    pieces = stream(tok, ids, False, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    # A four-byte character arrives byte by byte and comes out once, whole.
    decoder = tok.stream_decoder()
    assert [decoder.add(i) for i in tok.encode("𝔘")] == ["", "", "", "𝔘"]
    assert decoder.finish() == ""
    # Trailing whitespace waits: decode strips it if nothing follows.
    decoder = tok.stream_decoder()
    assert decoder.add(tok.encode("あ ")) == "あ"
    assert decoder.add(tok.encode(" い")) == "  い"
    assert decoder.add(tok.encode("\n")) == ""
    assert decoder.finish() == ""


ID_POOL = [BYTE0 + b for b in (0x41, 0xE3, 0x81, 0x82, 0xF0, 0x9D, 0x94, 0x98, 0x80, 0xC3, 0xA9, 0xFE)] + [
    31719, 31718, 31720, 31999, 31996, 31729, 26613, 17749, 31596, 31612, 31727]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ID_POOL) | st.integers(0, 31999), max_size=30), st.booleans(), st.randoms())
def test_stream_decoder_contract(tok, ids, skip, rng):
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(rng.randint(1, 3))
    assert "".join(stream(tok, ids, skip, chunks)) == tok.decode(ids, skip_special_tokens=skip)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer surface, compared with the reference where it has one


CALLS = [
    (("あいうえおかきくけこ",), dict(max_length=4)),
    (("あいうえおかきくけこ", "さしすせそ"), dict(max_length=6, truncation=True)),
    (("あいうえおかきくけこ", "さしすせそ"), dict(max_length=6, truncation="only_first")),
    (("あいうえおかきくけこ", "さしすせそ"), dict(max_length=6, truncation="only_second")),
    ((["あ", "あいう"],), dict(padding=True)),
    ((["あ", "あいう"],), dict(padding=True, padding_side="left")),
    ((["あ", "あいう"],), dict(padding="max_length", max_length=5)),
    ((["あ", "あいう"],), dict(padding="max_length", max_length=2, truncation=True)),
    ((["あ", "あいう"],), dict(padding=True, pad_to_multiple_of=4)),
    ((["あいうえおかきくけこ", "さしすせそ"], ["か", "き"]), dict(max_length=3, truncation="longest_first")),
    ((["あ", "あいう"],), dict(padding=True, return_attention_mask=False)),
    (("",), {}),
    ((DOC_TEXT,), dict(add_special_tokens=False)),
]


def test_call_matches_reference(tok, ref):
    for args, kwargs in CALLS:
        assert dict(tok(*args, **kwargs)) == dict(ref(*args, **kwargs)), (args, kwargs)
    for kind, cls in (("pt", torch.Tensor), ("np", np.ndarray)):
        mine = tok(["あ", "あいう"], padding=True, return_tensors=kind)
        theirs = ref(["あ", "あいう"], padding=True, return_tensors=kind)
        assert isinstance(mine.input_ids, cls)
        assert all((mine[k] == theirs[k]).all() for k in theirs)
        assert mine.input_ids.dtype == theirs["input_ids"].dtype
    long = "あいうえおかきくけこ"
    assert tok.encode("あいう", return_tensors="pt").tolist() == ref.encode("あいう", return_tensors="pt").tolist()
    assert tok.encode(long, max_length=3, truncation=True) == ref.encode(long, max_length=3, truncation=True)
    left = GPTNeoXJapaneseTokenizer.from_pretrained(HUB_ID, truncation_side="left")
    ref_left = reference(False)
    ref_left.truncation_side = "left"
    assert left(long, max_length=3, truncation=True) == dict(ref_left(long, max_length=3, truncation=True))
    batch = tok(["あ", "あいう"], padding=True, return_tensors="pt")
    assert batch.to("cpu") is batch and batch.attention_mask.tolist() == [[1, 0], [1, 1]]
    padded = tok.pad([{"input_ids": [1, 2]}, {"input_ids": [3]}], return_tensors="pt")
    assert padded["input_ids"].tolist() == [[1, 2], [3, 31999]]


def test_vocabulary_and_special_tokens(tok, ref):
    assert len(tok) == len(ref) == tok.vocab_size == 31998
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.all_special_tokens == ref.all_special_tokens
    assert tok.all_special_ids == ref.all_special_ids == [31996, 31999]
    assert tok.special_tokens_map == ref.special_tokens_map
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(tok, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    tokens = ["<SP>", "慶應", "foo", "<|endoftext|>", "<|byte44|>", ","]
    assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert tok.convert_tokens_to_ids("<BR>") == 31718
    assert tok.model_input_names == ["input_ids", "attention_mask"]


def test_special_tokens_can_be_reassigned():
    tok = GPTNeoXJapaneseTokenizer.from_pretrained(HUB_ID)
    tok.pad_token = "<|separator|>"
    assert tok.pad_token_id == 31997
    assert tok.encode("あ<|separator|>") == [26613, 31997]
    assert tok(["あ", "あいう"], padding=True)["input_ids"][0] == [26613, 31997]
    tok.pad_token_id = 31999
    assert tok.pad_token == "<|endoftext|>"
    with pytest.raises(InputError, match="no token text"):
        tok.pad_token_id = 31719  # renders as " ", which does not encode back to <SP>
    tok.bos_token = tok.eos_token = tok.unk_token = tok.pad_token = None
    assert tok.all_special_ids == [] and tok.encode("<|endoftext|>") == [31999]


def test_pickle(pairs):
    for tok in pairs[True][:2]:
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.uses_native == tok.uses_native and copy.do_clean_text
        assert copy.encode(DOC_TEXT + " https://x.jp") == tok.encode(DOC_TEXT + " https://x.jp")


# ----------------------------------------------------------------------------------------------------------
# Files: bundled data, save/load, AutoTokenizer, errors


def test_bundled_hub_id_needs_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for tok in (GPTNeoXJapaneseTokenizer.from_pretrained(HUB_ID), AutoTokenizer.from_pretrained(HUB_ID, use_fast=False),
                neoxja.AutoTokenizer.from_pretrained(HUB_ID)):  # fmt: skip
        assert type(tok) is GPTNeoXJapaneseTokenizer and tok.encode(DOC_TEXT) == DOC_IDS
    assert (DATA / "LICENSE").read_text().startswith("MIT License")


def test_save_and_load_round_trip(tok, ref, tmp_path):
    clean = GPTNeoXJapaneseTokenizer.from_pretrained(
        HUB_ID, do_clean_text=True, model_max_length=2048, padding_side="left"
    )
    written = sorted(Path(p).name for p in clean.save_pretrained(tmp_path / "ours"))
    assert written == ["emoji.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPTNeoXJapaneseTokenizer" and config["do_clean_text"] is True
    for loaded in (GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path / "ours"),
                   AutoTokenizer.from_pretrained(tmp_path / "ours")):  # fmt: skip
        assert loaded.do_clean_text and loaded.model_max_length == 2048 and loaded.padding_side == "left"
        assert loaded.encode("見てhttps://x.jp") == clean.encode("見てhttps://x.jp")
        assert loaded.spellings == clean.spellings and loaded.emoji == clean.emoji
    # The files are the reference's save_vocabulary output, byte for byte, and each side loads the other's.
    ref.save_pretrained(tmp_path / "theirs")
    for name in ("vocab.txt", "emoji.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(tmp_path / "theirs").encode(DOC_TEXT) == DOC_IDS
    theirs = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path / "ours")
    assert theirs.encode("見てhttps://x.jp") == clean.encode("見てhttps://x.jp")


def test_auto_tokenizer_picks_by_config_or_files(tmp_path):
    for name in ("vocab.txt", "emoji.json"):
        shutil.copy(DATA / name, tmp_path / name)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is GPTNeoXJapaneseTokenizer  # by files
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox_japanese"}))
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is GPTNeoXJapaneseTokenizer  # by model_type
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(CheckpointError, match="BertTokenizer"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cannot tell"):
        AutoTokenizer.from_pretrained(tmp_path / "..")


def test_errors(tok, tmp_path):
    with pytest.raises(CheckpointError, match="vocab.txt"):
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="vocabulary file not found"):
        GPTNeoXJapaneseTokenizer(tmp_path / "missing.txt", DATA / "emoji.json")
    shutil.copy(DATA / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "emoji.json").write_text('{"emoji": {"x": ')
    with pytest.raises(CheckpointError, match="corrupt ABEJA emoji file"):
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    (tmp_path / "emoji.json").write_text('{"emoji": []}')
    with pytest.raises(CheckpointError, match="corrupt ABEJA emoji file"):
        GPTNeoXJapaneseTokenizer.from_pretrained(tmp_path)
    for bad in ([32000], [-1], [1, 2, 10**9]):
        with pytest.raises(InputError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(InputError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(InputError, match="nested"):
        tok.decode([[1, 2]])
    with pytest.raises(InputError, match="return_tensors"):
        tok("あ", return_tensors="tf")
    with pytest.raises(InputError, match="padding"):
        tok(["あ", "あいう"], return_tensors="pt")
    with pytest.raises(InputError, match="padding"):
        tok("あ", padding="sometimes")
    with pytest.raises(InputError, match="string"):
        tok(123)


def test_pure_python_is_forced_by_environment(monkeypatch):
    monkeypatch.setenv("NEOXJA_PURE_PYTHON", "1")
    assert not GPTNeoXJapaneseTokenizer.from_pretrained(HUB_ID).uses_native
    monkeypatch.delenv("NEOXJA_PURE_PYTHON")
    assert GPTNeoXJapaneseTokenizer.from_pretrained(HUB_ID).uses_native
