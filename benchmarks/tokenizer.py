"""Encoding speed (characters per second) of the ABEJA tokenizer: neoxja's C path, neoxja's pure-Python path and
the reference (transformers' GPTNeoXJapaneseTokenizer), on the shared corpus, in one run, single thread.

    python benchmarks/tokenizer.py                        # valid.txt + the first 1 M characters of train.txt
    python benchmarks/tokenizer.py --train-chars 0 --clean

Two workloads: "lines" encodes every line on its own (preprocessing a training set), "chunks" encodes 64 K
character blocks (a perplexity run). Each timing is the best of --repeat passes, each with a freshly loaded
tokenizer (so neoxja's pure-Python decision cache starts cold); loading is not timed. The run fails if any
engine's ids differ from the reference's."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import transformers

from neoxja.tokenization import GPTNeoXJapaneseTokenizer
from neoxja.tokenization import abeja

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
DATA = ROOT / "src" / "neoxja" / "data" / "abeja"
CHUNK = 65536


def load_text(train_chars: int) -> str:
    text = (CORPUS / "valid.txt").read_text(encoding="utf-8")
    if train_chars:
        with open(CORPUS / "train.txt", encoding="utf-8") as f:
            text += f.read(train_chars)
    return text


def engines(clean: bool) -> dict:
    """name -> a function that loads a fresh tokenizer."""
    vocab, emoji = DATA / "vocab.txt", DATA / "emoji.json"
    out = {}
    if abeja._abeja_native is not None:
        out["neoxja (C)"] = lambda: GPTNeoXJapaneseTokenizer(vocab, emoji, do_clean_text=clean, use_native=True)
    else:
        print("note: the C extension is not built; only the pure-Python path is measured")
    out["neoxja (pure Python)"] = lambda: GPTNeoXJapaneseTokenizer(vocab, emoji, do_clean_text=clean, use_native=False)
    out["transformers"] = lambda: transformers.GPTNeoXJapaneseTokenizer(str(vocab), str(emoji), do_clean_text=clean)
    return out


def run(load, pieces: list[str], repeat: int) -> tuple[float, list[list[int]]]:
    best = float("inf")
    for _ in range(repeat):
        tokenizer = load()
        start = time.perf_counter()
        ids = [tokenizer.encode(p) for p in pieces]
        best = min(best, time.perf_counter() - start)
    return best, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-chars", type=int, default=1_000_000, help="characters of train.txt to add")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clean", action="store_true", help="do_clean_text=True")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    text = load_text(args.train_chars)
    workloads = {
        "lines": text.splitlines(keepends=True),
        "chunks": [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)],
    }
    print(f"corpus: valid.txt + {args.train_chars:,} characters of train.txt = {len(text):,} characters; "
          f"do_clean_text={args.clean}; best of {args.repeat}")  # fmt: skip
    print(f"{'workload':<8} {'engine':<22} {'chars/s':>12} {'vs reference':>13}")
    for workload, pieces in workloads.items():
        results = {name: run(load, pieces, args.repeat) for name, load in engines(args.clean).items()}
        ref_time, ref_ids = results["transformers"]
        for name, (seconds, ids) in results.items():
            if ids != ref_ids:
                raise SystemExit(f"{name}: ids differ from the reference on the {workload} workload")
            print(f"{workload:<8} {name:<22} {len(text) / seconds / 1e6:>10.2f} M {ref_time / seconds:>12.1f}x")
    print("ids identical to the reference: yes")


if __name__ == "__main__":
    main()
