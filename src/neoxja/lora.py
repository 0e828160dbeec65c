"""LoRA adapters: low-rank updates W + (alpha/r)·B·A on named nn.Linear layers, trained while the base weights
stay frozen, saved on their own, and merged back into plain weights.

Files follow PEFT's layout (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r]) so adapters move between the two.
GPT-NeoX names its layers query_key_value, dense, dense_h_to_4h and dense_4h_to_h — not q_proj/v_proj — and a
target list that matches nothing is an error rather than a silent no-op."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import atomic_path, write_atomic
from .errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_KEY_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. B starts at zero, so wrapping changes nothing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init, so runs are comparable
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_B(self.lora_A(F.dropout(x, self.dropout, self.training)))
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in (computed in float32, stored in the base dtype)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        with torch.no_grad():
            self.base.weight.copy_(self.base.weight.float() + delta)
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of `model` and wrap the nn.Linear layers whose last name is in `targets`.
    Returns the wrapped module names."""
    if not (isinstance(rank, int) and rank > 0):
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    model.requires_grad_(False)
    wrapped = {id(m) for lora in lora_modules(model).values() for m in lora.modules()}  # never wrap twice
    linear = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and id(module) not in wrapped}
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ConfigError(f"LoRA target modules {', '.join(targets)} not found in the model; its linear layers "
                          f"are named {', '.join(names)}")
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(linear[name], rank, alpha, dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; the result is a plain model."""
    for name, module in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    return model


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (the LoRA weights only), each written atomically."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ConfigError("the model has no LoRA adapters to save")
    first = next(iter(modules.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
        "r": first.lora_A.out_features, "lora_alpha": first.scaling * first.lora_A.out_features,
        "lora_dropout": first.dropout, "base_model_name_or_path": base_model,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
    }
    tensors = {f"{_KEY_PREFIX}{name}.{part}.weight": getattr(module, part).weight.detach().contiguous()
               for name, module in modules.items() for part in ("lora_A", "lora_B")}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_atomic(path / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Wrap `model` as the adapter in `directory` describes and load its weights. Returns the wrapped names."""
    from safetensors.torch import load_file

    path = Path(directory)
    try:
        config: dict[str, Any] = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the LoRA adapter in {path}: {err}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: peft_type {config['peft_type']!r} is not LORA")
    names = add_lora(model, int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                     config["target_modules"])
    expected = {f"{_KEY_PREFIX}{name}.{part}.weight": getattr(module, part).weight
                for name, module in lora_modules(model).items() for part in ("lora_A", "lora_B")}
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointError(f"LoRA adapter in {path} does not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise CheckpointError(f"LoRA adapter in {path}: {key} has shape {list(tensors[key].shape)}, "
                                      f"the model needs {list(param.shape)}")
            param.copy_(tensors[key])
    return names
