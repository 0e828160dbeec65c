"""The `neoxja run`, `neoxja generate` and `neoxja chat` commands (routed here by neoxja.cli).

All three load a model through the text-generation pipeline (neoxja.pipelines: the same defaults, the same device
fallback, a progress bar while the model downloads or loads) and share the model and generation flags.
- run: the documentation's `transformers run` (4.x semantics). Every input line, its "\\n" included, is one
  prompt; the results are printed at the end as one JSON list, `[{"generated_text": ...}, ...]` (the reference
  prints the same list as a Python repr).
- generate: one prompt, its continuation printed as it is generated.
- chat: a conversation with rinna's instruction models (ユーザー/システム format, neoxja.chat), one user message
  per input line, history kept; `/reset` forgets it, `/exit` or end of input ends the session.
Prompts are encoded as text only, with no "</s>" appended (4.x's pipeline did the same): the model continues them."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from typing import Any, Iterator, TextIO

import torch

from .chat import NEXT_TURN, NL, parse_reply
from .errors import InputError, NeoxjaError

# (flag, type, help); the destination is the generate() argument of the same name.
GENERATION_FLAGS = [
    ("--max-new-tokens", int, "number of tokens to generate (default 256, unless the model's generation config "
                              "or --max-length says otherwise)"),
    ("--max-length", int, "total length, prompt included (instead of --max-new-tokens)"),
    ("--min-new-tokens", int, "generate at least this many tokens before an end-of-sequence token"),
    ("--temperature", float, "sampling temperature, > 0 (default 0.7)"),
    ("--top-k", int, "sample from the k most likely tokens (default 50; 0 disables)"),
    ("--top-p", float, "sample from the smallest set of tokens whose probability reaches p (default 1.0)"),
    ("--repetition-penalty", float, "penalty > 1 makes tokens already present less likely (default 1.0)"),
    ("--no-repeat-ngram-size", int, "never repeat an n-gram of this size"),
    ("--seed", int, "random seed, for reproducible sampling"),
]
RUN_EPILOG = """\
input: every line of --input (default: stdin), its trailing newline included, is one prompt.
output: one JSON list on stdout once all prompts are done, with one {"generated_text": prompt + continuation}
object per generated sequence, in input order.
example: echo -e "人とAIが協調するためには、" | neoxja run --task text-generation --model DIR --device 0"""
GENERATE_EPILOG = "The continuation (without the prompt) is printed as it is generated, then a newline."
CHAT_EPILOG = """\
Each input line is one user message; the reply is printed as it is generated. Commands: /reset forgets the
conversation, /exit (or end of input) quits. Works with piped input too: one reply line per message."""
EXIT_COMMANDS = ("/exit", "/quit")


def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The flags of `neoxja run|generate|chat`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = {"run": RUN_EPILOG, "generate": GENERATE_EPILOG, "chat": CHAT_EPILOG}[name]
    if name == "run":
        parser.add_argument("--task", default="text-generation", help="pipeline task (only text-generation)")
        parser.add_argument("--input", default="-", metavar="FILE", help="read prompts from FILE (default: stdin)")
    elif name == "generate":
        parser.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or none reads it from stdin "
                                                                     "(a final newline is dropped)")
    add_model_arguments(parser)
    generation = parser.add_argument_group("generation")
    sampling = generation.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                          help="sample the next token (the default)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="always take the most "
                                                                                   "likely token")
    for flag, kind, help_text in GENERATION_FLAGS:
        generation.add_argument(flag, type=kind, help=help_text)
    generation.add_argument("--stop", action="append", metavar="TEXT", help="stop once the generated text "
                                                                           "contains TEXT (repeatable)")


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" flags every command that loads a model shares (load_pipeline reads them); returns the group."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", "-m", help="checkpoint directory or hub id (default: the bundled demo model)")
    model.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    model.add_argument("--device", help="cpu, cuda, cuda:N, auto, or a GPU index (-1 = CPU); without CUDA a GPU "
                                        "falls back to the CPU with a warning (default: cpu)")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight dtype (default: the checkpoint's)")
    model.add_argument("--quantize", choices=["int8", "nf4", "int8+head", "nf4+head"],
                       help="quantize the weights while loading; +head: the output head too (llm_int8_skip_modules=[]; "
                            "by default it stays in float, as with bitsandbytes)")
    model.add_argument("--revision", help="hub revision (branch, tag or commit)")
    model.add_argument("--quiet", "-q", action="store_true", help="no progress bars (shown on a terminal while the "
                                                                  "model downloads or loads)")
    return model


def cli_main(args: argparse.Namespace, name: str) -> int:
    with warnings_as_lines(name):
        decoding = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                    for flag, _, _ in GENERATION_FLAGS}
        decoding.update(do_sample=args.do_sample, stop_strings=args.stop)
        decoding = {k: v for k, v in decoding.items() if v is not None}
        pipe = load_pipeline(args, decoding)
        if name == "run":
            return _run(pipe, args.input)
        if name == "generate":
            return _generate(pipe, args.prompt)
        return _chat(pipe)


@contextlib.contextmanager
def warnings_as_lines(name: str) -> Iterator[None]:
    """Print warnings as "neoxja NAME: warning: ..." lines instead of Python's file:line format."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(f"neoxja {name}: warning: {message}", file=sys.stderr)
        yield


def load_pipeline(args: argparse.Namespace, decoding: dict[str, Any]) -> Any:
    from .pipelines import pipeline

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    # The loading bar is for people watching a terminal; in a pipe it would only litter stderr.
    model_kwargs: dict[str, Any] = {"progress": not args.quiet and sys.stderr.isatty()}
    if args.quantize:
        model_kwargs["quantization_config"] = _quantization_config(args.quantize)
    device = args.device
    if device is not None and device.lstrip("-").isdigit():  # a GPU index, as the reference's --device takes
        device = int(device)
    return pipeline(getattr(args, "task", "text-generation"), model=args.model, tokenizer=args.tokenizer,
                    dtype=args.dtype, device=device, revision=args.revision, model_kwargs=model_kwargs,
                    add_special_tokens=False, **decoding)


def _quantization_config(kind: str) -> Any:
    try:
        from .quantization import BitsAndBytesConfig
    except ModuleNotFoundError:
        raise InputError("--quantize needs neoxja.quantization, which this installation lacks") from None
    skip = [] if kind.endswith("+head") else None
    if kind.startswith("int8"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              llm_int8_skip_modules=skip)


def _stdin(what: str) -> TextIO:
    if sys.stdin.isatty():
        print(f"reading {what} from stdin; end with Ctrl-D", file=sys.stderr)
    return sys.stdin


def _run(pipe: Any, source: str) -> int:
    if source == "-":
        prompts = _stdin("prompts, one per line").readlines()
    else:
        try:
            with open(source, encoding="utf-8") as f:
                prompts = f.readlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read prompts from {source}: {err}") from None
    if not prompts:
        raise InputError("no prompts: the input is empty (give one prompt per line)")
    outputs = []
    for prompt in prompts:  # one at a time, in order, as the reference does
        outputs += pipe(prompt)
    print(json.dumps(outputs, ensure_ascii=False))
    return 0


def _generate(pipe: Any, prompt: str) -> int:
    from .generation import stream_generate

    if prompt == "-":
        prompt = _stdin("the prompt").read().removesuffix("\n")
    if not prompt:
        raise InputError("the prompt is empty: give the text to continue")
    ids = pipe.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(pipe.device)
    for piece in stream_generate(pipe.model, pipe.tokenizer, ids, **pipe.decoding_kwargs()):
        print(piece, end="", flush=True)
    print()
    return 0


def _chat(pipe: Any) -> int:
    """The chat loop over stdin; returns 2 if some turn failed (its message is dropped and the chat goes on)."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset forgets the conversation, /exit quits.", file=sys.stderr)
    decoding = pipe.decoding_kwargs()
    decoding["stop_strings"] = [*decoding.get("stop_strings", []), NEXT_TURN]
    messages: list[dict[str, str]] = []
    status = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        command = line.strip()
        if command in EXIT_COMMANDS:
            break
        if command == "/reset":
            messages.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = stream_reply(pipe, messages, decoding, sys.stdout)
        except NeoxjaError as err:
            messages.pop()
            print(f"neoxja chat: error: {err} (/reset starts a new conversation)", file=sys.stderr)
            status = 2
            continue
        messages.append({"role": "assistant", "content": reply})
    return status


def stream_reply(pipe: Any, messages: list[dict[str, str]], decoding: dict[str, Any], out: TextIO) -> str:
    """Generate the assistant's reply to `messages`, writing it to `out` as it comes; returns the reply text."""
    from .generation import stream_generate
    from .pipelines import chat_input_ids

    ids = torch.tensor([chat_input_ids(pipe.tokenizer, messages)], device=pipe.device)
    text = shown = ""
    for piece in stream_generate(pipe.model, pipe.tokenizer, ids, **decoding):
        text += piece
        visible = _settled(text).replace(NL, "\n").lstrip()
        out.write(visible[len(shown):])
        out.flush()
        shown = visible
    reply = parse_reply(text, eos_token=pipe.tokenizer.eos_token or "")
    out.write(reply[len(shown):] + "\n")
    out.flush()
    return reply


def _settled(text: str) -> str:
    """`text` up to the next user turn, less a tail that more text could still turn into one."""
    cut = text.find(NEXT_TURN)
    if cut >= 0:
        return text[:cut]
    for k in range(min(len(NEXT_TURN) - 1, len(text)), 0, -1):
        if NEXT_TURN.startswith(text[-k:]):
            return text[:-k]
    return text
