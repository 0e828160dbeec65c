"""GPTNeoXJapaneseTokenizer: the ABEJA model's sub-word tokenizer (BPEEncoder-V2 vocabulary), id-exact with
transformers.

Encoding a plain piece of text has three steps, each matching the reference exactly:
  1. normalise: whitespace and dashes to tags/characters, emoji folded into their class tags (emoji.json, in
     file order), and with do_clean_text URLs, e-mails, phone numbers, dates, prices and box drawing to tags;
  2. segment: at each position take the vocabulary prefix of the 3-character window with the smallest id (a
     literal '<...>' tag of 3+ characters wins outright); characters not in the vocabulary become <KIGOU>,
     <U2000U2BFF> or one <|byteN|> per UTF-8 byte;
  3. ids come straight from the segmentation.
Step 2 runs in the optional C extension `_abeja_native` when it is built; `_segment` below is the pure-Python
definition it must match (set NEOXJA_PURE_PYTHON=1 or pass use_native=False to force it).

Decoding renders each id's first spelling (tags back to characters, emoji to their class representative), with
one improvement over the reference: consecutive <|byteN|> tokens are decoded as UTF-8 together, so characters
outside the vocabulary round-trip instead of becoming U+FFFD."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from ..errors import CheckpointError, InputError
from ..files import write_atomic
from .base import Tokenizer

try:
    from . import _abeja_native
except ImportError:  # the extension is optional: a failed compile at install time leaves the Python path
    _abeja_native = None

# Step 1a: applied in this order with str.replace semantics.
_REPLACEMENTS = [
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("\u2014", "\u30fc"),  # EM DASH -> KATAKANA-HIRAGANA PROLONGED SOUND MARK
    ("\u2212", "\u30fc"),  # MINUS SIGN -> the same
]

# Step 1c (do_clean_text): the reference's patterns (verbatim data), applied in order, each replacing all matches.
# With each, characters a text must contain for the pattern to match at all: one of every group. A cheap test
# that skips most patterns on most text (the patterns themselves then decide).
_DATE_TAIL = r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"
_DIGITS = list("0123456789")
_BOX = [chr(c) for c in range(0x2500, 0x25A0)]  # box drawing U+2500-257F and block elements U+2580-259F
_CLEAN_RULES = [
    (r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)", "<URL>", [[":"], ["/"]]),
    (r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*", "<EMAIL>", [["@"]]),
    (r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}", "<TEL>", [_DIGITS]),
    (r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*" + _DATE_TAIL, "<DATE>",
     [_DIGITS, ["/", "-", "月"]]),
    (r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日" + _DATE_TAIL,
     "<DATE>", [["年"], ["月"], ["日"]]),
    (r"(?:\d,\d{3}|[\d億])*+(?:\d,\d{3}|[\d万])*+(?:\d,\d{3}|[\d千])*+"
     r"(?:千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+(?:\(税込\)|\(税抜\)|\+tax)*",
     "<PRICE>", [["円", "ド", "ユ"]]),  # 円, ドル or ユーロ
    # The reference replaces each box/block character with <BLOCK> and then collapses "<BLOCK><BLOCK>" until
    # none is left; "<BLOCK>" cannot overlap itself, so that is exactly "a run of <BLOCK> tags (inserted or
    # already in the text) becomes one".
    ("(?:[\u2500-\u259f]|<BLOCK>)+", "<BLOCK>", [_BOX + ["K"]]),  # K: of the tag <BLOCK>
]  # fmt: skip

# Step 2 fallbacks for a character with no vocabulary entry.
_KIGOU_RANGES = ((0xA1, 0xBF), (0x1C0, 0x1C3), (0x2B9, 0x362))  # 2-byte UTF-8 symbols and combining marks
_U2000_RANGE = (0x2000, 0x2BFF)  # general punctuation .. miscellaneous symbols and arrows

# Decoding: what the structural tags render as.
_TAG_TEXT = {
    "<SP>": " ", "<BR>": "\n", "<TAB>": "\t", "<BLOCK>": "\u2580", "<KIGOU>": "\u01c0", "<U2000U2BFF>": "\u2016",
}  # fmt: skip
BYTE_TOKEN = re.compile(r"<\|byte(\d+)\|>")

_CACHE_LIMIT = 1 << 18  # decisions cached by the pure-Python segmenter before the cache is reset


def load_vocabulary(path: str | os.PathLike) -> list[list[str]]:
    """The spellings of each id: line i of vocab.txt, split on commas (a lone "," line is one spelling)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise CheckpointError(f"ABEJA vocabulary file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read ABEJA vocabulary file {path}: {err}") from None
    # The line is tested before its newline is removed: that is why ",\n" splits into two empty spellings.
    return [[line.rstrip("\n")] if line == "," or "," not in line else line.rstrip("\n").split(",") for line in lines]


def load_emoji(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """emoji.json: {"emoji": {sequence: tag}, "emoji_inv": {tag: representative}}, key order preserved."""
    try:
        with open(path, encoding="utf-8") as f:
            emoji = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"ABEJA emoji file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt ABEJA emoji file {path}: {err}") from None
    ok = isinstance(emoji, dict) and all(
        isinstance(emoji.get(k), dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in emoji[k].items())
        for k in ("emoji", "emoji_inv")
    )
    if not ok:
        raise CheckpointError(
            f"corrupt ABEJA emoji file {path}: expected {{'emoji': {{str: str}}, 'emoji_inv': {{str: str}}}}"
        )
    if "" in emoji["emoji"]:
        raise CheckpointError(f"corrupt ABEJA emoji file {path}: an emoji sequence is empty")
    return emoji


def char_scanner(chars: Iterable[str], native: bool) -> Any:
    """An object whose .intersection(text) gives the characters of `chars` that occur in text: a frozenset, or
    the C extension's CharSet, which does the same scan several times faster (it dominates steps 1b and 1c)."""
    return _abeja_native.CharSet("".join(chars)) if native else frozenset(chars)


class EmojiFolder:
    """Step 1b: for each emoji.json key in file order, replace all its occurrences by its class tag.

    This is sequential, not longest-match: an earlier key that is part of a later one wins, and tags inserted by
    earlier keys stay in the text for later keys to see. The reference tries all 4314 keys on every call; a key
    can only occur if its first character does, so only keys whose first character is in the text (or in a tag
    inserted meanwhile) are tried, still in file order."""

    def __init__(self, mapping: dict[str, str], native: bool):
        self.keys = list(mapping)
        self.tags = list(mapping.values())
        self.by_first: dict[str, list[int]] = {}
        for i, key in enumerate(self.keys):
            self.by_first.setdefault(key[0], []).append(i)
        self.first_chars = frozenset(self.by_first)
        self.scanner = char_scanner(self.first_chars, native)

    def __call__(self, text: str) -> str:
        present = self.scanner.intersection(text)
        if not present:
            return text
        todo = sorted(i for c in present for i in self.by_first[c])
        while todo:
            i = todo.pop(0)
            key = self.keys[i]
            if key in text:
                tag = self.tags[i]
                text = text.replace(key, tag)
                new = self.first_chars.intersection(tag) - present
                if new:
                    present |= new
                    todo = sorted(todo + [j for c in new for j in self.by_first[c] if j > i])
        return text


class TextCleaner:
    """Step 1c, do_clean_text: URLs, e-mails, phone numbers, dates, prices and box drawing become tags."""

    def __init__(self, native: bool):
        self.rules = [(re.compile(p), tag, [frozenset(g) for g in needs]) for p, tag, needs in _CLEAN_RULES]
        self.scanner = char_scanner({c for _, _, needs in _CLEAN_RULES for group in needs for c in group}, native)

    def __call__(self, text: str) -> str:
        present = self.scanner.intersection(text)  # stays a superset of the text's characters as tags go in
        if not present:
            return text
        for pattern, tag, groups in self.rules:
            if all(not present.isdisjoint(group) for group in groups):
                text, count = pattern.subn(tag, text)
                if count:
                    present |= set(tag)
        return text


class GPTNeoXJapaneseTokenizer(Tokenizer):
    """The ABEJA GPT-NeoX-Japanese tokenizer (vocab.txt + emoji.json).

    >>> tok = GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")
    >>> tok("吾輩は猫である🐯。実は慶応(慶應)大学出身")["input_ids"]
    [30014, 26883, 26638, 27228, 25, 26650, 31732, 31679, 27809, 26638, 17749, 31592, 17749, 31593, 321, 1281]
    """

    vocab_files = {"vocab_file": "vocab.txt", "emoji_file": "emoji.json"}

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        emoji_file: str | os.PathLike,
        unk_token: str | None = "<|endoftext|>",
        pad_token: str | None = "<|endoftext|>",
        bos_token: str | None = "<|startoftext|>",
        eos_token: str | None = "<|endoftext|>",
        do_clean_text: bool = False,
        *,
        use_native: bool | None = None,
        **kwargs: Any,
    ):
        """use_native: None = the C extension when built (unless NEOXJA_PURE_PYTHON=1); False = pure Python;
        True = the C extension or an error."""
        self.do_clean_text = bool(do_clean_text)
        self.spellings = load_vocabulary(vocab_file)
        self.emoji = load_emoji(emoji_file)
        self.raw_vocab = {",".join(s): i for i, s in enumerate(self.spellings)}
        self.vocab = {word: i for i, s in enumerate(self.spellings) for word in s}  # later lines win
        super().__init__(unk_token=unk_token, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, **kwargs)
        self._build_encoder(use_native)
        self._build_decoder()

    def __getstate__(self) -> dict[str, Any]:
        # The C objects do not pickle; they are rebuilt from the vocabulary (DataLoader workers pickle tokenizers).
        state = self.__dict__.copy()
        state["_native"] = None if self._native is not None else False  # None: native where that process has it
        del state["_fold_emoji"], state["_clean"]
        state["_decisions"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        use_native = state.pop("_native")
        self.__dict__.update(state)
        self._build_encoder(use_native)

    # ----------------------------------------------------------------------------------------------------
    # Step 1: normalisation

    def normalize(self, text: str) -> str:
        """The text the segmenter sees (tags in place of spaces, newlines, emoji, and with do_clean_text, URLs...)."""
        for old, new in _REPLACEMENTS:
            text = text.replace(old, new)
        text = self._fold_emoji(text)
        if self.do_clean_text:
            text = self._clean(text)
        return text

    # ----------------------------------------------------------------------------------------------------
    # Step 2: segmentation

    def _build_encoder(self, use_native: bool | None) -> None:
        vocab = {w: i for w, i in self.vocab.items() if w}  # the empty spelling can never be matched
        # At '<' the reference tries every window length down from (longest spelling + 1): only the lengths of
        # '<'-spellings of 3+ characters can win there, so those are all that is tried.
        self._angle_lengths = sorted({len(w) for w in vocab if w[0] == "<" and len(w) > 2}, reverse=True)
        self._unk_id = self.vocab.get(self.unk_token)  # for the fallbacks, fixed here like the C tables
        # Prefixes (1 or 2 characters) of longer spellings that can be matched (at most 3 characters).
        self._extends = {w[:k] for w in vocab if len(w) <= 3 for k in range(1, len(w))}
        self._decisions: dict[str, tuple[int, tuple[int, ...], tuple[str, ...]]] = {}
        if use_native is None:
            use_native = _abeja_native is not None and os.environ.get("NEOXJA_PURE_PYTHON", "") in ("", "0")
        if use_native and _abeja_native is None:
            raise InputError("use_native=True but the C extension neoxja.tokenization._abeja_native is not built")
        self._native = None
        if use_native:
            self._native = _abeja_native.Segmenter(
                vocab,
                self._fallback_id("<KIGOU>"),
                self._fallback_id("<U2000U2BFF>"),
                [self._fallback_id(f"<|byte{b}|>") for b in range(256)],
                InputError,
            )
        self._fold_emoji = EmojiFolder(self.emoji["emoji"], native=self.uses_native)
        self._clean = TextCleaner(native=self.uses_native)

    @property
    def uses_native(self) -> bool:
        return self._native is not None

    def _fallback_id(self, token: str) -> int:
        """Id of a fallback token; a custom vocabulary without it gets unk (-1 when there is no unk either)."""
        found = self.vocab.get(token, self._unk_id)
        return -1 if found is None else found

    def _decide(self, window: str) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
        """(characters consumed, ids, tokens) at a position whose next up-to-3 characters are `window`.

        The vocabulary prefix with the smallest id wins (on equal ids the longer, which is found first)."""
        best = None
        for end in range(len(window), 0, -1):
            word = window[:end]
            i = self.vocab.get(word)
            if i is not None and (best is None or i < best[0]):
                best = (i, word)
        if best is not None:
            return len(best[1]), (best[0],), (best[1],)
        char = window[0]
        code = ord(char)
        if any(lo <= code <= hi for lo, hi in _KIGOU_RANGES):
            tokens: tuple[str, ...] = ("<KIGOU>",)
        elif _U2000_RANGE[0] <= code <= _U2000_RANGE[1]:
            tokens = ("<U2000U2BFF>",)
        elif 0xD800 <= code <= 0xDFFF:
            raise InputError(f"text has a lone surrogate U+{code:04X}: not a character, it has no UTF-8 encoding")
        else:
            tokens = tuple(f"<|byte{b}|>" for b in char.encode("utf-8"))
        ids = tuple(self._fallback_id(t) for t in tokens)
        if -1 in ids:
            raise InputError(f"character U+{code:04X} has no token, and the vocabulary has no unk token")
        return 1, ids, tokens

    def _longest_angle(self, text: str, pos: int) -> str | None:
        for length in self._angle_lengths:
            word = text[pos : pos + length]
            if len(word) == length and word in self.vocab:
                return word
        return None

    def _segment(self, text: str) -> tuple[list[int], list[str]]:
        """Ids and tokens of normalised text: the pure-Python definition of step 2."""
        ids: list[int] = []
        tokens: list[str] = []
        decisions, extends = self._decisions, self._extends
        if len(decisions) > _CACHE_LIMIT:
            decisions.clear()
        pos, n = 0, len(text)
        while pos < n:
            if text[pos] == "<":  # a '<...>' spelling of 3+ characters wins outright, the longest first
                word = self._longest_angle(text, pos)
                if word is not None:
                    ids.append(self.vocab[word])
                    tokens.append(word)
                    pos += len(word)
                    continue
            # The decision depends on the 3-character window, but usually a shorter one already fixes it;
            # keying the cache by the shortest deciding window makes it hit far more often.
            window = text[pos]
            if window in extends:
                window = text[pos : pos + 2]
                if window in extends:
                    window = text[pos : pos + 3]
            decision = decisions.get(window)
            if decision is None:
                decision = decisions[window] = self._decide(window)
            step, found_ids, found_tokens = decision
            ids += found_ids
            tokens += found_tokens
            pos += step
        return ids, tokens

    def _tokenize(self, text: str) -> list[str]:
        return self._segment(self.normalize(text))[1]

    def _encode_plain(self, text: str) -> list[int]:
        text = self.normalize(text)
        return self._native.encode(text) if self._native is not None else self._segment(text)[0]

    # ----------------------------------------------------------------------------------------------------
    # Vocabulary

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.vocab.get(self.unk_token))

    @property
    def vocab_size(self) -> int:
        # Variant spellings share an id and two lines are duplicated, so this is less than the id count.
        return len(self.raw_vocab)

    @property
    def id_count(self) -> int:
        return len(self.spellings)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.raw_vocab, **{t: self._convert_token_to_id(t) for t in self.all_special_tokens})

    def init_kwargs(self) -> dict[str, Any]:
        return {"do_clean_text": self.do_clean_text}

    def save_vocabulary(self, directory: str | os.PathLike) -> tuple[str, ...]:
        vocab = "".join(",".join(s) + "\n" for s in self.spellings)
        return (
            str(write_atomic(os.path.join(directory, self.vocab_files["vocab_file"]), vocab)),
            str(write_atomic(os.path.join(directory, self.vocab_files["emoji_file"]), json.dumps(self.emoji))),
        )

    # ----------------------------------------------------------------------------------------------------
    # Decoding

    def _render(self, word: str) -> str | bytes:
        """What an id's first spelling decodes to: bytes for a byte token, else text."""
        byte = BYTE_TOKEN.fullmatch(word)
        if byte and int(byte.group(1)) < 256:
            return bytes([int(byte.group(1))])
        if word.startswith("<|emoji") and word.endswith("|>"):
            return self.emoji["emoji_inv"].get(word, word)
        return _TAG_TEXT.get(word, word)

    def _build_decoder(self) -> None:
        self._id_bytes: list[bytes] = []
        self._id_text: list[str] = []
        for spellings in self.spellings:
            rendered = self._render(spellings[0])
            if isinstance(rendered, bytes):
                self._id_bytes.append(rendered)
                self._id_text.append(rendered.decode("utf-8", errors="replace"))  # the reference's per-id view
            else:
                # surrogatepass: a lone surrogate from an odd emoji.json decodes to U+FFFD instead of failing
                self._id_bytes.append(rendered.encode("utf-8", errors="surrogatepass"))
                self._id_text.append(rendered)

    def _convert_id_to_token(self, index: int) -> str:
        """The rendered text of an id (the reference's convert_ids_to_tokens: `<SP>` gives " ", bytes alone)."""
        return self._id_text[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).strip()

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        # Every rendering but a byte token's is valid UTF-8, so decoding the joined bytes groups exactly the
        # runs of byte tokens, and an invalid run becomes U+FFFD without touching its neighbours.
        return b"".join([self._id_bytes[i] for i in ids]).decode("utf-8", errors="replace").strip()
