"""The `neoxja` command line. Each subcommand lives in the module that owns its concept and exposes
`add_cli_arguments(parser)` and `cli_main(args) -> int`; this file only routes, and turns neoxja's errors into one
readable line with exit code 2."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from . import __version__

# name → (module, one-line help)
COMMANDS = {
    "run": ("neoxja.commands", "run a pipeline task on prompts read from stdin, one per line"),
    "generate": ("neoxja.commands", "generate a continuation of a prompt, streamed as it is produced"),
    "chat": ("neoxja.commands", "chat interactively with an instruction model (rinna's ユーザー/システム format)"),
    "train": ("neoxja.training", "train or fine-tune (full or LoRA) a model on text files"),
    "perplexity": ("neoxja.evaluation", "token- and character-level perplexity of a model on text files"),
    "serve": ("neoxja.server", "serve a model over an OpenAI-compatible HTTP API"),
    "convert": ("neoxja.convert", "convert a checkpoint to standard GPT-NeoX or GGUF"),
    "visualize-mask": ("neoxja.visualization", "show which tokens each token can attend to"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neoxja",
        description="Run, serve, evaluate and fine-tune the Japanese GPT-NeoX models (ABEJA, rinna) on CPU.",
    )
    parser.add_argument("--version", action="version", version=f"neoxja {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # a command whose module is not part of this installation
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module of the command being run: --help stays fast
            module = importlib.import_module(module_name)
            module.add_cli_arguments(command, name)
            command.set_defaults(handler=(module, name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import NeoxjaError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module, name = args.handler
    try:
        return int(module.cli_main(args, name) or 0)
    except NeoxjaError as err:
        print(f"neoxja {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
