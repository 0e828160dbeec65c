"""Perplexity (`neoxja perplexity`): how well a causal LM predicts held-out text, per token and per character.

Sliding window, as in Hugging Face's "perplexity of fixed-length models": each file is tokenized whole and
preceded by the end-of-text token (the document boundary the models were trained with), so every token of the
text is scored. Windows of n_ctx tokens start every `stride` tokens; each window scores only the tokens the previous
one did not, so every token is scored exactly once and, after the first window, with at least n_ctx - stride
tokens of context. stride = n_ctx gives independent chunks; smaller strides cost more and approach the model's
full-context perplexity. Windows never cross files.

    token perplexity = exp(total NLL / scored tokens)
    char perplexity  = exp(total NLL / characters of the files)

Token perplexity is only comparable between models that share a tokenizer; per-character perplexity is
comparable across the two families. The ± figure is the standard error of the mean token NLL carried through
exp (as llama.cpp reports it).

`--unigram TRAIN…` replaces the model by add-one-smoothed unigram token frequencies fitted on TRAIN, scored
through the same windows and the same loss: the no-context baseline a trained model has to beat."""
from __future__ import annotations

import argparse
import math
from itertools import groupby
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .modeling import CausalLMOutputWithPast
from .training import DEFAULT_TOKENIZER, DTYPES, read_text_file, tokenize_files


@dataclass
class Perplexity:
    """Totals over some text; `token`, `char` and `token_error` are derived."""

    name: str
    tokens: int = 0
    chars: int = 0
    nll: float = 0.0  # summed over scored tokens, nats
    nll_sq: float = 0.0  # sum of squared per-token NLLs, for the standard error

    def add(self, other: "Perplexity") -> None:
        self.tokens += other.tokens
        self.chars += other.chars
        self.nll += other.nll
        self.nll_sq += other.nll_sq

    @property
    def token(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def char(self) -> float:
        return math.exp(self.nll / self.chars)

    @property
    def token_error(self) -> float:
        mean = self.nll / self.tokens
        variance = max(self.nll_sq / self.tokens - mean * mean, 0.0)
        return self.token * math.sqrt(variance / max(self.tokens - 1, 1))


class UnigramLM(nn.Module):
    """Add-one-smoothed unigram token frequencies, shaped like a causal LM: the same log-probabilities at every
    position, whatever the context."""

    def __init__(self, tokens: Tensor, vocab_size: int) -> None:
        super().__init__()
        counts = torch.bincount(tokens, minlength=vocab_size)[:vocab_size].double() + 1.0
        self.register_buffer("log_probs", (counts / counts.sum()).log().float())

    def forward(self, input_ids: Tensor, logits_to_keep: int = 0, **unused: Any) -> Any:
        length = logits_to_keep or input_ids.shape[1]
        return CausalLMOutputWithPast(logits=self.log_probs.expand(input_ids.shape[0], length, -1))


def windows(length: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for `length` ids whose first id is context only: each window covers ids[begin:end]
    and scores its last `scored` ids. The first window scores all it can; each later one moves `stride` ids on."""
    if not 0 < stride < n_ctx:
        raise ConfigError(f"need 0 < stride < n_ctx (a window needs one token of context), got n_ctx={n_ctx}, "
                          f"stride={stride}")
    if length < 2:
        return []
    end = min(n_ctx, length)
    spans = [(0, end, end - 1)]
    while end < length:
        new_end = min(end + stride, length)
        spans.append((max(0, new_end - n_ctx), new_end, new_end - end))
        end = new_end
    return spans


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, files: Sequence[str], n_ctx: int, stride: int, batch_size: int = 4,
               dtype: str = "float32", progress: bool = False) -> tuple[Perplexity, list[Perplexity]]:
    """Sliding-window perplexity of `model` on each file and on all of them together."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch-size must be positive, got {batch_size}")
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise InputError("the tokenizer has neither an end-of-text nor a beginning-of-text token to start "
                         "documents with")
    model.eval()
    per_file, jobs = [], []
    for index, path in enumerate(files):
        text = read_text_file(path)
        ids = torch.tensor([start] + tokenizer.encode(text, add_special_tokens=False), dtype=torch.int64)
        per_file.append(Perplexity(str(path), chars=len(text)))
        jobs += [(index, ids[begin:end], scored) for begin, end, scored in windows(len(ids), n_ctx, stride)]
    batches = []  # windows of equal length batch without padding
    for _, same in groupby(sorted(jobs, key=lambda job: len(job[1])), key=lambda job: len(job[1])):
        same = list(same)
        batches += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "float32")
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=None if progress else True):
        ids = torch.stack([job[1] for job in batch])
        keep = max(job[2] for job in batch) + 1  # logits at the positions before the scored ids
        with autocast:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        targets = ids[:, -keep + 1:]
        logits = logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view(targets.shape)
        for row, (index, _, scored) in enumerate(batch):
            losses = nll[row, -scored:].double()
            per_file[index].add(Perplexity("", tokens=scored, nll=float(losses.sum()),
                                           nll_sq=float((losses * losses).sum())))
    total = Perplexity("total")
    for result in per_file:
        total.add(result)
    if not total.tokens:
        raise InputError("the text gives no tokens to score")
    return total, per_file


# ---------------------------------------------------------------------------------------------------------------
# CLI
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files to score")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", "-m", help="checkpoint directory or hub id (default: the bundled demo model)")
    which.add_argument("--unigram", action="append", metavar="TRAIN", help="score a unigram model fitted on "
                       "the TRAIN text file (add-one smoothing; repeatable) instead: the baseline")
    parser.add_argument("--tokenizer", help="tokenizer (default: the model's; with --unigram, "
                        f"{DEFAULT_TOKENIZER})")
    parser.add_argument("--n-ctx", type=int, help="window length in tokens (default: the model's "
                        "max_position_embeddings, at most 2048)")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: n_ctx / 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype the model is loaded "
                        "and run in")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def cli_main(args: argparse.Namespace, name: str) -> int:
    from .tokenization import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.unigram:
        tokenizer_name = args.tokenizer or DEFAULT_TOKENIZER
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        model: nn.Module = UnigramLM(tokenize_files(args.unigram, tokenizer), len(tokenizer))
        label, default_ctx = f"unigram({', '.join(args.unigram)})", 2048
    else:
        from .modeling import AutoModelForCausalLM
        from .pipelines import default_model_path

        source = args.model or default_model_path()
        tokenizer_name = args.tokenizer or source
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[args.dtype])
        label, default_ctx = str(source), min(model.config.max_position_embeddings, 2048)
    n_ctx = args.n_ctx or default_ctx
    stride = args.stride or max(n_ctx // 2, 1)
    total, per_file = perplexity(model, tokenizer, args.files, n_ctx, stride, args.batch_size, args.dtype,
                                 progress=True)
    print(f"model {label}; tokenizer {tokenizer_name}; n_ctx {n_ctx}, stride {stride}; dtype {args.dtype}")
    print(f"{'file':<40} {'tokens':>9} {'chars':>9} {'nll/token':>9} {'token ppl':>17} {'char ppl':>9}")
    for result in per_file + ([total] if len(per_file) > 1 else []):
        print(f"{result.name:<40} {result.tokens:>9} {result.chars:>9} {result.nll / result.tokens:>9.4f} "
              f"{result.token:>9.3f} ± {result.token_error:<5.3f} {result.char:>9.3f}")
    return 0
