"""`neoxja train`: a tiny run learns, an interrupted run resumes to the uninterrupted result, LoRA adapters merge
exactly, and bad input fails with one clear error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoxja import training
from neoxja.cli import main
from neoxja.config import GPTNeoXJapaneseConfig
from neoxja.errors import CheckpointError, ConfigError, InputError
from neoxja.lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter
from neoxja.modeling import AutoModelForCausalLM, GPTNeoXJapaneseForCausalLM
from neoxja.training import STATE_FILE, TrainConfig, batch_indices, learning_rate, train

TEXT = ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
        "ニャーニャー泣いていた事だけは記憶している。\n") * 12
HELD_OUT = "名前はまだ無い。吾輩は猫である。何でも薄暗いじめじめした所で泣いていた事だけは記憶している。\n" * 3
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[str, str]:
    train_file, held_out = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(TEXT, encoding="utf-8")
    held_out.write_text(HELD_OUT, encoding="utf-8")
    return str(train_file), str(held_out)


def tiny_run(corpus: tuple[str, str], output: Path, **overrides) -> TrainConfig:
    settings = dict(train_files=[corpus[0]], eval_files=[corpus[1]], output=str(output), model_config=dict(TINY),
                    seq_len=32, batch_size=2, grad_accum=2, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=3,
                    save_every=3, log_every=3, threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def saved_state(output: Path) -> dict:
    return torch.load(output / STATE_FILE, weights_only=True)


def test_tiny_run_lowers_the_loss_and_writes_a_usable_model(corpus, tmp_path):
    history = train(tiny_run(corpus, tmp_path / "run", max_steps=16, eval_every=8, save_every=16, lr=2e-2))
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < 8.0  # far below the uniform guess, ln 32000 = 10.37
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.config.hidden_size == 16
    assert (tmp_path / "run" / "vocab.txt").is_file() and (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_interrupted_run_resumes_to_the_uninterrupted_result(corpus, tmp_path, monkeypatch):
    # attention dropout on, so the restored RNG matters as much as the weights and the optimizer
    settings = dict(model_config={**TINY, "attention_dropout": 0.1}, max_steps=6, save_every=3)
    train(tiny_run(corpus, tmp_path / "straight", **settings))

    save = training.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # as if killed right after the step-3 checkpoint

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(corpus, tmp_path / "resumed", **settings))
    monkeypatch.setattr(training, "save_checkpoint", save)
    assert saved_state(tmp_path / "resumed")["step"] == 3
    with pytest.raises(InputError, match="--resume"):
        train(tiny_run(corpus, tmp_path / "resumed", **settings))
    train(tiny_run(corpus, tmp_path / "resumed", resume=True, **settings))

    straight, resumed = saved_state(tmp_path / "straight"), saved_state(tmp_path / "resumed")
    assert resumed["step"] == straight["step"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_resume_refuses_changed_settings(corpus, tmp_path):
    train(tiny_run(corpus, tmp_path / "run", max_steps=3))
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_run(corpus, tmp_path / "run", max_steps=3, lr=1e-2, resume=True))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_run(corpus, tmp_path / "other", resume=True))


def test_schedule_and_data_order():
    cfg = TrainConfig(train_files=["x"], output="y", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx(5.5e-4)
    assert learning_rate(110, cfg) == pytest.approx(1e-4)
    epoch = torch.cat([batch_indices(step, 10, 3, seed=1) for step in range(3)])
    assert len(set(epoch.tolist())) == 9  # no sequence twice within an epoch
    assert torch.equal(batch_indices(4, 10, 3, seed=1), batch_indices(4, 10, 3, seed=1))
    assert not torch.equal(batch_indices(3, 10, 3, seed=1), batch_indices(0, 10, 3, seed=1))


def tiny_model(seed: int = 0) -> GPTNeoXJapaneseForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(vocab_size=64, **TINY, attention_dropout=0.0)).eval()


def perturb_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (the adapter is a no-op); give it values so that merging has something to merge."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.5)


def test_lora_merge_gives_the_unmerged_logits(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = model(ids).logits
    names = add_lora(model, rank=4, alpha=8, targets=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    assert len(names) == 2 * 4
    assert torch.allclose(model(ids).logits, plain)  # zero-initialised B: wrapping changes nothing
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{part}.weight" for n in names for part in ("lora_A", "lora_B")}
    perturb_adapters(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
    save_adapter(model, tmp_path / "adapter")

    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)

    reloaded = tiny_model()
    load_adapter(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)


def test_lora_targets_must_exist():
    with pytest.raises(ConfigError, match="query_key_value"):
        add_lora(tiny_model(), rank=4, alpha=8, targets=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="rank"):
        add_lora(tiny_model(), rank=0, alpha=8)


def test_lora_fine_tuning_keeps_the_base_and_merges(corpus, tmp_path):
    train(tiny_run(corpus, tmp_path / "base", max_steps=3))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    cfg = tiny_run(corpus, tmp_path / "lora", model=str(tmp_path / "base"), model_config={}, lora_rank=4,
                   lora_alpha=8, merge_lora=True, max_steps=4, lr=1e-2)
    history = train(cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    ids = torch.tensor([[31999, 100, 200, 300, 400]])
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    load_adapter(adapted, tmp_path / "lora")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)


def test_cli_trains_and_reports_errors(corpus, tmp_path, capsys):
    args = ["train", corpus[0], "--output", str(tmp_path / "run"), "--config", "hidden_size=16",
            "num_hidden_layers=1", "num_attention_heads=2", "max_position_embeddings=64", "--seq-len", "32",
            "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--threads", "1",
            "--save-dtype", "bfloat16"]
    assert main(args) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype="auto").dtype == torch.bfloat16

    def error(*argv: str) -> str:
        assert main(["train", *argv, "--output", str(tmp_path / "bad")]) == 2
        return capsys.readouterr().err

    assert "no such file" in error(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    assert "is empty" in error(str(tmp_path / "empty.txt"))
    assert "lr" in error(corpus[0], "--lr", "-1")
    assert "warmup-steps" in error(corpus[0], "--max-steps", "5", "--warmup-steps", "5")
    assert "--model" in error(corpus[0], "--lora-rank", "4")
    assert "sequences" in error(corpus[0], "--seq-len", "4096", "--config", "max_position_embeddings=8192")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one(corpus, tmp_path):
    """torchrun with 2 gloo processes, 1 sequence × 2 micro-batches each, against one process with 2 × 2: the same
    global batch, so the same per-step losses and the same final weights (up to float rounding)."""
    model_config = {**TINY, "attention_dropout": 0.0}  # dropout masks cannot match across process counts
    train(tiny_run(corpus, tmp_path / "one", model_config=model_config, batch_size=2, grad_accum=2, max_steps=4,
                   save_every=4, eval_every=2))
    config = [f"{k}={v}" for k, v in model_config.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "neoxja.cli", "train",
               corpus[0], "--eval-file", corpus[1], "--output", str(tmp_path / "two"), "--config", *config,
               "--seq-len", "32", "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--warmup-steps", "2",
               "--lr", "3e-3", "--eval-every", "2", "--save-every", "4", "--log-every", "1", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 4") == 1  # rank 0 alone reports (and writes)
    assert done.stdout.count("step 2/4 loss") == 1 and "(2 processes)" in done.stdout

    one, two = saved_state(tmp_path / "one"), saved_state(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [h["tokens"] for h in two["history"]] == [h["tokens"] for h in one["history"]]
    for key in ("loss", "eval_loss", "grad_norm"):
        expected = [h[key] for h in one["history"] if key in h]
        assert [h[key] for h in two["history"] if key in h] == pytest.approx(expected, rel=1e-5, abs=1e-5), key
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    assert not [p.name for p in (tmp_path / "two").iterdir() if ".tmp-" in p.name]

    with pytest.raises(ConfigError, match="2 process"):  # a different number of processes cannot resume it
        train(tiny_run(corpus, tmp_path / "two", model_config=model_config, batch_size=1, grad_accum=2,
                       max_steps=4, save_every=4, eval_every=2, log_every=1, resume=True))
