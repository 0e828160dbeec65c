"""`neoxja perplexity`: the sliding window scores every token once with the stated context, and the figures
match a direct computation with the model's own loss; the unigram baseline goes through the same path."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from neoxja.cli import main
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.errors import ConfigError
from neoxja.evaluation import UnigramLM, perplexity, windows
from neoxja.modeling import GPTNeoXJapaneseForCausalLM
from neoxja.tokenization import GPTNeoXJapaneseTokenizer

TEXT = ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
        "ニャーニャー泣いていた事だけは記憶している。吾輩はここで始めて人間というものを見た。\n") * 2


@pytest.fixture(scope="module")
def tokenizer() -> GPTNeoXJapaneseTokenizer:
    return GPTNeoXJapaneseTokenizer.from_pretrained("abeja/gpt-neox-japanese-2.7b")


@pytest.fixture(scope="module")
def model() -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXJapaneseConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=256)
    return GPTNeoXJapaneseForCausalLM(config).eval()


@pytest.fixture
def text_file(tmp_path: Path) -> str:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def document_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(TEXT)])


@pytest.mark.parametrize("length, n_ctx, stride", [(2, 8, 4), (50, 8, 4), (50, 8, 7), (50, 8, 1), (51, 64, 32),
                                                   (1000, 100, 30)])
def test_windows_score_every_token_once_with_enough_context(length, n_ctx, stride):
    scored: list[int] = []
    for begin, end, count in windows(length, n_ctx, stride):
        assert 0 <= begin and end - begin <= n_ctx and 0 < count < end - begin + 1
        first = end - count
        assert first - begin >= min(n_ctx - stride, first)  # context: n_ctx - stride, or all there is
        scored += range(first, end)
    assert scored == list(range(1, length))


def test_bad_window_settings():
    with pytest.raises(ConfigError, match="stride"):
        windows(10, 8, 8)
    with pytest.raises(ConfigError, match="stride"):
        windows(10, 8, 0)
    assert windows(1, 8, 4) == []  # only the leading end-of-text token: nothing to score


def test_one_window_matches_the_models_loss(model, tokenizer, text_file):
    ids = document_ids(tokenizer)
    assert ids.shape[1] < 256
    with torch.no_grad():
        expected = model(ids, labels=ids).loss  # mean NLL of every token after the leading end-of-text
    total, (per_file,) = perplexity(model, tokenizer, [text_file], n_ctx=256, stride=128)
    assert per_file.tokens == ids.shape[1] - 1 and per_file.chars == len(TEXT)
    assert total.token == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert total.char == pytest.approx(math.exp(float(expected) * total.tokens / len(TEXT)), rel=1e-5)
    assert 0 < total.token_error < total.token


def test_sliding_window_matches_masked_losses(model, tokenizer, text_file):
    """The Hugging Face recipe, written out: each window's model loss with the already-scored labels masked."""
    ids = document_ids(tokenizer)
    n_ctx, stride = 24, 10
    nll, count, prev_end = 0.0, 0, 1
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + n_ctx, ids.shape[1])
        if end <= prev_end:
            continue
        begin = max(0, end - n_ctx)
        labels = ids[:, begin:end].clone()
        labels[:, : prev_end - begin] = -100
        with torch.no_grad():
            nll += float(model(ids[:, begin:end], labels=labels, num_items_in_batch=1).loss)
        count += end - prev_end
        prev_end = end
    for batch_size in (1, 3):
        total, _ = perplexity(model, tokenizer, [text_file], n_ctx=n_ctx, stride=stride, batch_size=batch_size)
        assert total.tokens == count == ids.shape[1] - 1
        assert total.token == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_files_are_scored_separately_and_summed(model, tokenizer, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT[:40], encoding="utf-8")
    total, per_file = perplexity(model, tokenizer, [text_file, str(other)], n_ctx=32, stride=16)
    assert [r.tokens for r in per_file] == [len(tokenizer.encode(TEXT)), len(tokenizer.encode(TEXT[:40]))]
    assert total.nll == pytest.approx(sum(r.nll for r in per_file))
    assert total.chars == len(TEXT) + 40


def test_unigram_baseline_is_add_one_frequencies(tokenizer, text_file):
    train_ids = torch.tensor([5, 5, 5, 7, 9])
    unigram = UnigramLM(train_ids, vocab_size=10)
    probs = (torch.bincount(train_ids, minlength=10) + 1).double() / 15
    assert torch.allclose(unigram.log_probs.exp().double(), probs)
    text_ids = tokenizer.encode(TEXT)
    unigram = UnigramLM(torch.tensor(text_ids), vocab_size=len(tokenizer))
    counts = torch.bincount(torch.tensor(text_ids), minlength=len(tokenizer)).double() + 1
    expected = -float((counts / counts.sum()).log()[text_ids].mean())
    total, _ = perplexity(unigram, tokenizer, [text_file], n_ctx=16, stride=8, batch_size=2)
    assert total.token == pytest.approx(math.exp(expected), rel=1e-4)  # float32 log-softmax over 32k


def test_cli(model, tokenizer, text_file, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["perplexity", "--model", str(tmp_path / "model"), text_file, "--n-ctx", "32", "--stride", "16",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "n_ctx 32, stride 16" in out and "text.txt" in out
    assert main(["perplexity", "--unigram", text_file, text_file, "--n-ctx", "32"]) == 0
    assert "unigram(" in capsys.readouterr().out
    assert main(["perplexity", "--model", str(tmp_path / "model"), text_file, "--n-ctx", "32",
                 "--stride", "32"]) == 2
    assert "stride" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(tmp_path / "model"), str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
