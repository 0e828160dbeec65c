"""The `neoxja run | generate | chat` commands: output equal to the pipeline's, streaming, the chat loop, help,
progress bars, and bad input as one error line with exit code 2. Most tests call neoxja.cli.main in-process;
a few drive the installed command as a subprocess with stdin, as users do."""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import neoxja.generation
from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)
from neoxja.cli import main
from neoxja.commands import stream_reply

PROMPT = "人とAIが協調するためには、"
NEOXJA = [str(Path(sys.executable).parent / "neoxja")]


def cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    # One thread: a tiny model runs faster without OpenMP's synchronisation, and CI's cores are shared.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(NEOXJA + args, input=stdin, capture_output=True, text=True, encoding="utf-8", env=env,
                          timeout=120)


def run_main(monkeypatch, capsys, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def continuation(checkpoint: Path, prompt: str, **kwargs) -> str:
    pipe = importlib.import_module("neoxja.pipelines").pipeline("text-generation", model=checkpoint)
    [result] = pipe(prompt, add_special_tokens=False, return_full_text=False, do_sample=False, **kwargs)
    return result["generated_text"]


@pytest.mark.parametrize("command, mentions", [
    ("run", ["--task", "--input", "JSON list", "trailing newline"]),
    ("generate", ["prompt", "stdin"]),
    ("chat", ["/reset", "/exit"]),
])
def test_help(capsys, command, mentions):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model", "--device", "--dtype", "--quantize", "--max-new-tokens", "--greedy", "--do-sample",
                 "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed", "--stop", *mentions]:
        assert flag in text


def test_run_prints_the_pipeline_results(monkeypatch, capsys, abeja_checkpoint):  # noqa: F811
    lines = ["人とAIが\n", PROMPT + "\n", "最後の行"]
    code, out, err = run_main(monkeypatch, capsys, ["run", "--model", str(abeja_checkpoint), "--greedy",
                                                    "--max-new-tokens", "3"], "".join(lines))
    assert code == 0, err
    assert json.loads(out) == [{"generated_text": line + continuation(abeja_checkpoint, line, max_new_tokens=3)}
                               for line in lines]


def test_run_reads_input_file(monkeypatch, capsys, abeja_checkpoint, tmp_path):  # noqa: F811
    (tmp_path / "prompts.txt").write_text("一\n二\n", encoding="utf-8")
    code, out, _ = run_main(monkeypatch, capsys, ["run", "-m", str(abeja_checkpoint), "--input",
                                                  str(tmp_path / "prompts.txt"), "--max-new-tokens", "2",
                                                  "--seed", "0"])
    assert code == 0 and [r["generated_text"][:2] for r in json.loads(out)] == ["一\n", "二\n"]


def test_generate_streams_the_continuation(abeja_checkpoint):  # noqa: F811
    done = cli(["generate", PROMPT, "--model", str(abeja_checkpoint), "--greedy", "--max-new-tokens", "8"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == continuation(abeja_checkpoint, PROMPT, max_new_tokens=8) + "\n"
    assert done.stderr == ""  # no progress bar when stderr is not a terminal


def test_generate_reads_stdin_and_warns_about_cuda(monkeypatch, capsys, abeja_checkpoint):  # noqa: F811
    args = ["generate", "--model", str(abeja_checkpoint), "--greedy", "--max-new-tokens", "4", "--device", "0"]
    code, out, err = run_main(monkeypatch, capsys, args, PROMPT + "\n")
    assert code == 0
    assert out == continuation(abeja_checkpoint, PROMPT, max_new_tokens=4) + "\n"  # the final newline dropped
    assert torch.cuda.is_available() or err == ("neoxja generate: warning: device 0 asks for CUDA, but no CUDA "
                                                "GPU is available here: running on the CPU\n")


def test_progress_bar_on_a_terminal(monkeypatch, capsys, abeja_checkpoint):  # noqa: F811
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # capsys's stderr poses as a terminal
    args = ["generate", "x", "--model", str(abeja_checkpoint), "--max-new-tokens", "1"]
    assert "Loading weights" in run_main(monkeypatch, capsys, args)[2]
    assert "Loading weights" not in run_main(monkeypatch, capsys, args + ["--quiet"])[2]


@pytest.mark.parametrize("kind", ["int8", "nf4", "int8+head"])
def test_quantize(monkeypatch, capsys, abeja_checkpoint, kind):  # noqa: F811
    args = ["generate", PROMPT, "-m", str(abeja_checkpoint), "--quantize", kind, "--greedy", "--max-new-tokens", "2"]
    code, out, err = run_main(monkeypatch, capsys, args)
    assert code == 0, err
    assert out.strip()


def test_chat_piped(rinna_model_checkpoint):  # noqa: F811
    done = cli(["chat", "--model", str(rinna_model_checkpoint), "--max-new-tokens", "6", "--seed", "1"],
                  "こんにちは\n/reset\n\nおはよう\n/exit\n無視される\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2  # one reply per message; nothing after /exit
    assert done.stderr == "(conversation reset)\n"


def test_chat_keeps_history_until_reset(monkeypatch, capsys, rinna_model_checkpoint):  # noqa: F811
    pipeline_module = importlib.import_module("neoxja.pipelines")
    conversations = []
    encode = pipeline_module.chat_input_ids

    def spy(tokenizer, messages, add_generation_prompt=True):
        conversations.append([dict(m) for m in messages])
        return encode(tokenizer, messages, add_generation_prompt)

    monkeypatch.setattr(pipeline_module, "chat_input_ids", spy)
    code, out, _ = run_main(monkeypatch, capsys, ["chat", "-m", str(rinna_model_checkpoint), "--greedy",
                                                  "--max-new-tokens", "3"], "一つ目\n二つ目\n/reset\n三つ目\n")
    assert code == 0
    first_reply = out.splitlines()[0]
    assert conversations == [
        [{"role": "user", "content": "一つ目"}],
        [{"role": "user", "content": "一つ目"}, {"role": "assistant", "content": first_reply},
         {"role": "user", "content": "二つ目"}],
        [{"role": "user", "content": "三つ目"}],
    ]


def test_chat_turn_error_keeps_the_session(monkeypatch, capsys, rinna_model_checkpoint):  # noqa: F811
    code, out, err = run_main(monkeypatch, capsys, ["chat", "-m", str(rinna_model_checkpoint), "--max-new-tokens",
                                                    "2"], "長い" * 300 + "\n短い\n")
    assert code == 2 and len(out.splitlines()) == 1
    assert err.startswith("neoxja chat: error: the prompt has") and err.count("\n") == 1


def test_stream_reply_stops_at_the_next_user_turn(monkeypatch):
    pieces = ["答え", "です<N", "L>続き<NL>ユー", "ザー: 次の質問"]
    monkeypatch.setattr(neoxja.generation, "stream_generate", lambda *args, **kwargs: iter(pieces))
    tokenizer = SimpleNamespace(apply_chat_template=lambda *args, **kwargs: [5, 6], eos_token="</s>")
    out = io.StringIO()
    reply = stream_reply(SimpleNamespace(model=None, tokenizer=tokenizer, device="cpu"),
                         [{"role": "user", "content": "質問"}], {}, out)
    assert reply == "答えです\n続き"
    assert out.getvalue() == "答えです\n続き\n"


def test_default_model(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, ["generate", "こんにちは", "--max-new-tokens", "3"])
    assert code == 0, err


LONG = PROMPT * 20  # 200 tokens, more than the tiny model's 128-token context


@pytest.mark.parametrize("args, stdin, message", [
    (["generate", ""], "", "the prompt is empty"),
    (["generate"], "", "the prompt is empty"),
    (["generate", LONG], "", "fills the model's context window of 128 tokens"),
    (["generate", "x", "--max-new-tokens", "0"], "", "max_new_tokens=0 is invalid"),
    (["generate", "x", "--do-sample", "--temperature", "0"], "", "temperature=0.0 is invalid"),
    (["generate", "x", "--top-p", "1.5"], "", "top_p=1.5 is invalid"),
    (["run", "--task", "summarization"], PROMPT, "unknown task 'summarization'"),
    (["run", "--device", "tpu9"], PROMPT, "unknown device 'tpu9'"),
    (["run"], "", "no prompts"),
    (["run", "--input", "/nonexistent/prompts.txt"], "", "cannot read prompts"),
])
def test_bad_input(monkeypatch, capsys, abeja_checkpoint, args, stdin, message):  # noqa: F811
    code, out, err = run_main(monkeypatch, capsys, args + ["--model", str(abeja_checkpoint)], stdin)
    assert code == 2 and out == ""
    assert err.startswith(f"neoxja {args[0]}: error: ") and message in err and err.count("\n") == 1


def test_bad_input_subprocess(tmp_path):
    done = cli(["run", "--task", "text-generation", "--model", str(tmp_path / "missing")], PROMPT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("neoxja run: error: ") and done.stderr.count("\n") == 1
