"""Causal-LM training and fine-tuning (`neoxja train`): text files → tokens → packed sequences → AdamW.

One loop serves three jobs: training a model from a config (how the bundled demo model was made), full
fine-tuning of a checkpoint, and LoRA fine-tuning (adapters saved alone or merged into the weights).

Reproducibility is by construction: the seed fixes the initial weights, the order of sequences in every epoch is a
function of (seed, epoch), the learning rate a function of the step, and a checkpoint holds everything else that
changes (trainable weights in float32, optimizer moments, the torch RNG used by dropout). So a run resumed from a
checkpoint after an interruption continues exactly as the uninterrupted run would have.

The output directory is always a usable model (config.json, model.safetensors or the LoRA adapter, tokenizer
files) plus `trainer_state.pt` (what resuming needs, written in one atomic rename so it is never half-written) and
`loss.png` (the loss curve).

Several processes (`torchrun --nproc_per_node N -m neoxja.cli train ...`) train one model with
DistributedDataParallel over gloo. batch_size × grad_accum is per process: each step's global batch is N times
that, each process takes its own slice of it, and DDP averages the gradients, so N processes compute what one
process computes with N times the batch size (the same losses and weights, up to float rounding). Only rank 0
evaluates and writes (model, checkpoints, plot, log); all ranks draw from one RNG stream (the same dropout masks,
on different data), so rank 0's checkpoint resumes every rank exactly."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .errors import CheckpointError, ConfigError, InputError
from .files import atomic_path
from .lora import DEFAULT_TARGETS

STATE_FILE = "trainer_state.pt"
PLOT_FILE = "loss.png"
DEFAULT_TOKENIZER = "abeja/gpt-neox-japanese-2.7b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that may change when a run is resumed; every other one must match the interrupted run.
_RESUMABLE_CHANGES = {"resume", "threads", "log_every"}


@dataclass
class TrainConfig:
    """Everything that defines a training run. The CLI fills it from its options; tests build it directly."""

    train_files: list[str]
    output: str
    model: str | None = None  # checkpoint to fine-tune; None trains a new model from `model_config`
    model_type: str = "gpt_neox_japanese"
    model_config: dict[str, Any] = field(default_factory=dict)  # config.json fields for a new model
    tokenizer: str | None = None  # default: the checkpoint's own, or ABEJA's for a new model
    eval_files: list[str] = field(default_factory=list)
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "float32"  # compute dtype; bfloat16 autocasts matmuls while master weights stay float32
    save_dtype: str = "float32"
    seed: int = 0
    eval_every: int = 100
    eval_sequences: int = 64  # held-out sequences per evaluation (0 = all)
    save_every: int = 100
    log_every: int = 10
    lora_rank: int = 0  # 0 = train all weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge_lora: bool = False
    resume: bool = False
    threads: int | None = None

    def validate(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.train_files:
            raise InputError("give at least one training text file")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 < lr and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"warmup-steps must be in [0, max-steps), got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eval_sequences < 0:
            raise ConfigError("weight-decay, grad-clip and eval-sequences cannot be negative")
        for name in ("dtype", "save_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name.replace('_', '-')} must be one of {', '.join(DTYPES)}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora-rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.model is None:
            raise ConfigError("LoRA fine-tunes an existing model: pass --model with --lora-rank")
        if self.merge_lora and not self.lora_rank:
            raise ConfigError("--merge-lora needs --lora-rank")
        if self.model is not None and self.model_config:
            raise ConfigError("--config describes a new model; it cannot be combined with --model")

    def signature(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one."""
        values = dataclasses.asdict(self)
        values["betas"] = list(values["betas"])
        return {k: v for k, v in values.items() if k not in _RESUMABLE_CHANGES}


# ---------------------------------------------------------------------------------------------------------------
# Data
def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, or an InputError naming what is wrong with it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{p} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise InputError(f"cannot read {p}: {err.strerror or err}") from None
    if not text.strip():
        raise InputError(f"{p} is empty")
    return text


def tokenize_files(paths: Sequence[str], tokenizer: Any) -> Tensor:
    """All files as one token stream, each file followed by the end-of-text token, so that packed sequences
    which cross a file boundary see the boundary."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for path in paths:
        ids.extend(tokenizer.encode(read_text_file(path), add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def pack(tokens: Tensor, seq_len: int) -> Tensor:
    """[N, seq_len] non-overlapping sequences; the tail shorter than seq_len is dropped."""
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def batch_indices(step: int, num_sequences: int, per_step: int, seed: int) -> Tensor:
    """Which sequences step `step` trains on: a fresh permutation per epoch, a function of (seed, epoch) only."""
    steps_per_epoch = num_sequences // per_step
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * per_step:(offset + 1) * per_step]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer
def build_model(cfg: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    """The model to train, float32: a checkpoint (LoRA-wrapped if asked) or a new one initialised from the seed."""
    from .config import AutoConfig
    from .modeling import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.model is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        if cfg.lora_rank:
            from .lora import add_lora

            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        config = AutoConfig.for_model(cfg.model_type, **cfg.model_config)
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms, biases and LoRA's zero-initialised B toward
    zero is not regularisation."""
    params = [p for p in dict(model.named_parameters()).values() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)


def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and checkpoints
@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, sequences: Tensor, batch_size: int, dtype: str) -> float:
    """Mean next-token loss over packed held-out sequences (every token but each sequence's first is scored)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(sequences), batch_size):
        x = sequences[start:start + batch_size]
        with torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "float32"):
            out = model(input_ids=x, labels=x, use_cache=False, num_items_in_batch=1)
        total += float(out.loss)
    model.train(was_training)
    return total / (len(sequences) * (sequences.shape[1] - 1))


def export_model(model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> None:
    """Write the usable model into cfg.output: full weights in save_dtype, or the LoRA adapter (and, with
    merge_lora, the merged weights as well)."""
    from .lora import lora_modules, merge_lora, save_adapter

    out = Path(cfg.output)
    lora = bool(lora_modules(model))
    if lora:
        save_adapter(model, out, base_model=cfg.model)
    if not lora or cfg.merge_lora:
        plain = model
        if lora or cfg.save_dtype != "float32":  # never touch the float32 weights being trained
            plain = copy.deepcopy(model)
            merge_lora(plain)
            plain.to(DTYPES[cfg.save_dtype])
        plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any, cfg: TrainConfig,
                    step: int, history: list[dict[str, Any]], world_size: int = 1) -> None:
    export_model(model, tokenizer, cfg)
    state = {
        "format": 1, "step": step, "config": cfg.signature(), "model": trainable_state(model),
        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": history,
        "world_size": world_size,
    }
    path = Path(cfg.output) / STATE_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    plot_losses(history, Path(cfg.output) / PLOT_FILE)


def load_checkpoint(cfg: TrainConfig) -> dict[str, Any]:
    path = Path(cfg.output) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises assorted types for a damaged pickle/zip
        raise CheckpointError(f"cannot read {path}: {err}") from None
    changed = sorted(k for k, v in cfg.signature().items() if state["config"].get(k) != v)
    if changed:
        details = ", ".join(f"{k}: {state['config'].get(k)!r} → {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(f"--resume needs the interrupted run's settings; these differ: {details}")
    return state


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training and held-out loss against tokens seen, as a PNG. Needs matplotlib (`pip install neoxja[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [(h["tokens"], h["loss"]) for h in history if "loss" in h]
    held_out = [(h["tokens"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if held_out:
        ax.plot(*zip(*held_out), "o-", ms=3, label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Several processes
@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process: a process group the caller set up, else torchrun's (RANK, WORLD_SIZE)
    joined here over gloo (training runs on the CPU) and left at the end, else (0, 1) for an ordinary run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ConfigError(f"WORLD_SIZE must be a positive integer, got {world!r}")
    if int(world) == 1:
        yield 0, 1
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: run neoxja train in one process")
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True except in the processes of a torchrun launch other than rank 0."""
    return os.environ.get("RANK", "0") == "0"


def _mean_over_processes(value: float, world: int) -> float:
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total) / world


# ---------------------------------------------------------------------------------------------------------------
# The loop
def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) training as `cfg` says; returns the log history (one entry per step, plus eval losses).

    Under torchrun every process calls it and trains its share (see the module docstring); the history is
    rank 0's, the only one with the held-out losses."""
    cfg.validate()
    with process_group() as (rank, world):
        return _train(cfg, rank, world)


def _train(cfg: TrainConfig, rank: int, world: int) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from .tokenization import AutoTokenizer

    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} exists and is not a directory")
    if (out / STATE_FILE).exists() and not cfg.resume:
        raise InputError(f"{out} already holds a training run: pass --resume to continue it, or choose another "
                         f"--output")
    state = load_checkpoint(cfg) if cfg.resume else None
    if state is not None and state.get("world_size", 1) != world:  # the global batch, so every step, depends on it
        raise ConfigError(f"this run was trained by {state.get('world_size', 1)} process(es): resume it with as many "
                          f"(torchrun --nproc_per_node), not {world}")

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model or DEFAULT_TOKENIZER)
    train_seqs = pack(tokenize_files(cfg.train_files, tokenizer), cfg.seq_len)
    per_step = cfg.batch_size * cfg.grad_accum  # sequences per process and step
    if len(train_seqs) < per_step * world:
        processes = f" × {world} processes" if world > 1 else ""
        raise InputError(f"the training text gives {len(train_seqs)} sequences of {cfg.seq_len} tokens, but one "
                         f"step needs batch-size × grad-accum{processes} = {per_step * world}; add text or lower "
                         f"them")
    eval_seqs = pack(tokenize_files(cfg.eval_files, tokenizer), cfg.seq_len) if cfg.eval_files else None
    if eval_seqs is not None:
        if not len(eval_seqs):
            raise InputError(f"the held-out text is shorter than one sequence of {cfg.seq_len} tokens")
        eval_seqs = eval_seqs[: cfg.eval_sequences or None]

    model = build_model(cfg, tokenizer)
    if model.config.max_position_embeddings < cfg.seq_len:
        raise ConfigError(f"seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"({model.config.max_position_embeddings})")
    model.train()
    optimizer = build_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    step = 0
    if state is not None:
        missing = set(trainable_state(model)) ^ set(state["model"])
        if missing:
            raise CheckpointError(f"{out / STATE_FILE} does not fit this model (parameters {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["model"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)

    trainable = sum(p.numel() for p in dict(model.named_parameters()).values() if p.requires_grad)
    tokens_per_step = per_step * world * cfg.seq_len
    if main:
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained); data: "
              f"{len(train_seqs)} sequences of {cfg.seq_len} tokens ({len(train_seqs) * cfg.seq_len / 1e6:.2f}M "
              f"tokens); {tokens_per_step} tokens per step" + (f" ({world} processes)" if world > 1 else "")
              + (f"; resuming at step {step}" if step else ""), flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast("cpu", dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "float32")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=None if main else True)
    interval_start, interval_tokens = time.perf_counter(), 0
    while step < cfg.max_steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = batch_indices(step, len(train_seqs), per_step * world, cfg.seed)
        micro_batches = train_seqs[order[rank * per_step:(rank + 1) * per_step]].split(cfg.batch_size)
        loss = 0.0
        for i, micro in enumerate(micro_batches):
            # Each process's loss is its mean over its own tokens; DDP's gradient average over processes makes that
            # the mean over the global batch. It averages once per step, in the last micro-batch's backward.
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if world == 1 or last else net.no_sync():
                with autocast:
                    result = net(input_ids=micro, labels=micro, use_cache=False,
                                 num_items_in_batch=per_step * (cfg.seq_len - 1))
                result.loss.backward()
            loss += float(result.loss.detach())
        if world > 1:
            loss = _mean_over_processes(loss, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        entry: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
                                 "grad_norm": grad_norm}
        interval_tokens += tokens_per_step
        rate = interval_tokens / (time.perf_counter() - interval_start)
        if main and eval_seqs is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            entry["eval_loss"] = evaluate_loss(model, eval_seqs, cfg.batch_size, cfg.dtype)
        history.append(entry)
        if main and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save_checkpoint(model, optimizer, tokenizer, cfg, step, history, world_size=world)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update()
        if main and (step % cfg.log_every == 0 or "eval_loss" in entry or step == cfg.max_steps):
            held_out = f" held-out {entry['eval_loss']:.4f}" if "eval_loss" in entry else ""
            bar.write(f"step {step}/{cfg.max_steps} loss {loss:.4f}{held_out} lr {lr:.2e} "
                      f"grad-norm {grad_norm:.2f} {rate:.0f} tok/s")
            sys.stdout.flush()
            interval_start, interval_tokens = time.perf_counter(), 0  # eval and saving stay out of tok/s
    bar.close()
    return history


# ---------------------------------------------------------------------------------------------------------------
# CLI
def _config_value(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("train_files", nargs="+", metavar="FILE", help="UTF-8 training text files")
    parser.add_argument("--output", "-o", required=True, help="directory for the model, checkpoints and loss.png")
    what = parser.add_argument_group("model")
    what.add_argument("--model", help="checkpoint to fine-tune (default: train a new model from --config)")
    what.add_argument("--model-type", default="gpt_neox_japanese", choices=["gpt_neox_japanese", "gpt_neox"],
                      help="family of a new model")
    what.add_argument("--config", nargs="+", type=_config_value, default=[], metavar="KEY=VALUE",
                      help="config.json fields of a new model, e.g. hidden_size=256 num_hidden_layers=4")
    what.add_argument("--tokenizer", help=f"tokenizer (default: the model's, or {DEFAULT_TOKENIZER})")
    data = parser.add_argument_group("data")
    data.add_argument("--eval-file", dest="eval_files", action="append", default=[],
                      help="held-out text for periodic evaluation (repeatable)")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    data.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences per evaluation (0 = all)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--max-steps", type=int, default=1000)
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    opt.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 = no clipping)")
    opt.add_argument("--dtype", choices=list(DTYPES), default="float32",
                     help="compute dtype (bfloat16 autocasts; master weights stay float32)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    lora = parser.add_argument_group("LoRA (fine-tuning --model)")
    lora.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters instead of all weights")
    lora.add_argument("--lora-alpha", type=float, default=16.0)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME",
                      help="names of the linear layers to adapt")
    lora.add_argument("--merge-lora", action="store_true", help="also write the merged full weights")
    run = parser.add_argument_group("checkpoints and logging")
    run.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    run.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    run.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    run.add_argument("--save-dtype", choices=list(DTYPES), default="float32", help="dtype of the written weights")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")


def cli_main(args: argparse.Namespace, name: str) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and k != "model_config"}
    cfg = TrainConfig(model_config=dict(args.config), **values)
    history = train(cfg)
    if not is_main_process():
        return 0
    last_eval = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    summary = f"done: step {history[-1]['step']}, train loss {history[-1]['loss']:.4f}" if history else "done"
    print(summary + (f", held-out loss {last_eval:.4f}" if last_eval is not None else "") + f"; model in {cfg.output}")
    return 0
