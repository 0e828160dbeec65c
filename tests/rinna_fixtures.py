"""A stand-in for rinna/japanese-gpt-neox-3.6b's checkpoint, built locally (no rinna file can be downloaded).

This module owns the rinna-layout test checkpoint: a small unigram SentencePiece model trained in about a
second with the 3.6b tokenizer's options (byte fallback, no dummy prefix, whitespace kept; see the model
card), saved next to the tokenizer_config.json / special_tokens_map.json that rinna's repos carry.

Special-id layout: [PAD]=0, <unk>=1, <s>=2, </s>=3. rinna's config.json fixes bos=2 and eos=3, which
leaves ids 0 and 1 for pad and unk; which is which is not published, and pad=0 / unk=1 is the natural
reading of a trainer run with --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3. Nothing in neoxja depends on
it: the tokenizer reads every special id from the .model file. `<NL>` (id 4) is a user-defined symbol so
that the chat format's newline marker is one piece (also an assumption about the real vocabulary); the
256 byte pieces and the learned pieces follow.

Use the `rinna_checkpoint` fixture (import it into the test module), or call `write_rinna_checkpoint` /
`write_rinna_tokenizer_files` on a directory of your own. PPO_* hold the instruction-ppo card's example
conversation, prompt and reply, verbatim.
"""
from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import pytest
import torch
import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3
VOCAB_SIZE = 4000
CORPUS_LINES = 2000  # of train.txt: ~0.5 M characters, enough for every kana and the common kanji

# rinna's documented options plus our small-vocabulary, deterministic training settings.
SPM_OPTIONS = dict(
    model_type="unigram",
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
    pad_piece="[PAD]", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    user_defined_symbols=["<NL>"],
    shuffle_input_sentence=False,
    num_threads=1,
    max_sentence_length=16384,
    minloglevel=2,
)

# The conversation and the prompt printed by the japanese-gpt-neox-3.6b-instruction-ppo model card, verbatim.
PPO_CONVERSATION = [
    ("ユーザー", "コンタクトレンズを慣れるにはどうすればよいですか？"),
    ("システム", "これについて具体的に説明していただけますか？何が難しいのでしょうか？"),
    ("ユーザー", "目が痛いのです。"),
    ("システム", "分かりました、コンタクトレンズをつけると目がかゆくなるということですね。思った以上にレンズを外す必要があるでしょうか？"),
    ("ユーザー", "いえ、レンズは外しませんが、目が赤くなるんです。"),
]
PPO_PROMPT = "ユーザー: コンタクトレンズを慣れるにはどうすればよいですか？<NL>システム: これについて具体的に説明していただけますか？何が難しいのでしょうか？<NL>ユーザー: 目が痛いのです。<NL>システム: 分かりました、コンタクトレンズをつけると目がかゆくなるということですね。思った以上にレンズを外す必要があるでしょうか？<NL>ユーザー: いえ、レンズは外しませんが、目が赤くなるんです。<NL>システム: "
PPO_REPLY = "それは、コンタクトレンズが目に合わないために起こることがあります。レンズが目の表面に長時間触れ続けることが原因となることがあります。また、コンタクトレンズが汚れている可能性もあります。コンタクトレンズケースを定期的に洗浄したり、コンタクトレンズを正しくフィットさせるようにしたりすることが役立ちます。</s>"

ROLES = {"ユーザー": "user", "システム": "assistant"}
PPO_MESSAGES = [{"role": ROLES[speaker], "content": text} for speaker, text in PPO_CONVERSATION]

TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",
    "do_lower_case": False,
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "[PAD]",
    "bos_token": "<s>",
    "extra_ids": 0,
    "additional_special_tokens": [],
    "sp_model_kwargs": {},
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}


def shared_data_dir() -> Path:
    """The project's shared data folder (corpus, reference tokenizer files); NEOXJA_SHARED_DATA overrides."""
    repo = Path(__file__).resolve().parent.parent
    candidates = [os.environ.get("NEOXJA_SHARED_DATA"), repo / "shared" / "data", repo.parent / "shared" / "data"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "corpus" / "train.txt").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"shared data (corpus/train.txt) not found in {[str(c) for c in candidates if c]}; "
        "set NEOXJA_SHARED_DATA to the folder that holds corpus/"
    )


@functools.cache
def train_rinna_spm() -> bytes:
    """The serialized SentencePiece model (trained once per process; deterministic)."""
    with open(shared_data_dir() / "corpus" / "train.txt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(CORPUS_LINES), f) if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **SPM_OPTIONS)
    return model.getvalue()


def write_rinna_tokenizer_files(directory: str | os.PathLike, model_proto: bytes | None = None) -> Path:
    """Write spiece.model (the trained model, or `model_proto`), tokenizer_config.json and
    special_tokens_map.json into `directory` (created if needed) as rinna's repos lay them out."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model_proto if model_proto is not None else train_rinna_spm())
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2), encoding="utf-8")
    return directory


def write_rinna_checkpoint(directory: str | os.PathLike) -> Path:
    """A full rinna-layout checkpoint in `directory`: the tokenizer files plus a small random GPT-NeoX with rinna's
    config choices (sequential residual, full rotary, untied head, bos 2 / eos 3), saved by the reference."""
    import transformers

    path = write_rinna_tokenizer_files(directory)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        rotary_pct=1.0, rotary_emb_base=10000, use_parallel_residual=False, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=3, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def rinna_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rinna-layout checkpoint directory, shared by the session's tests (treat it as read-only)."""
    return write_rinna_checkpoint(tmp_path_factory.mktemp("rinna-3.6b-like"))
