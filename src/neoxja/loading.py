"""Checkpoints in and out: finding the weight files (local directory or hub id), reading them without a second copy
in memory, mapping their key names onto the model, dtype and device placement, quantization at load time, and
writing checkpoints atomically.

Weight files read: model.safetensors (memory-mapped: parameters are views of the file's pages until a dtype
conversion needs new memory), pytorch_model.bin (torch.load with weights_only, memory-mapped when the file allows),
and sharded variants with their *.index.json. The head follows the current reference's tying rule: a checkpoint
with only `embed_in`, or with an `embed_out` equal to it, gets one shared matrix; an `embed_out` that differs is
used as a separate head, with a warning."""
from __future__ import annotations

import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .config import AutoConfig, NeoXConfig, config_class_for
from .errors import CheckpointError, ConfigError, InputError
from .files import atomic_path, write_atomic
from .hub import pop_hub_args, resolve_file
from .modeling import CAUSAL_LM_CLASSES, MODEL_CLASSES, NeoXForCausalLM, PreTrainedModel

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers that older checkpoints saved and that carry nothing the model needs.
LEGACY_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq", ".weight_format")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading weight files
class SafetensorsFile:
    """A safetensors file mapped into memory; `tensor(name)` returns a view of the mapped bytes (no copy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
                header_len = int.from_bytes(handle.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise CheckpointError(f"{path} is corrupt: its header length {header_len} does not fit "
                                          f"the file ({size} bytes)")
                header = json.loads(handle.read(header_len))
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON") from None
        except OSError as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            begin, end = entry.get("data_offsets", (0, -1))
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            numel = 1
            for dim in entry.get("shape", ()):
                numel *= dim
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            if not (0 <= begin <= end and self.data_start + end <= size) or end - begin != numel * dtype.itemsize:
                raise CheckpointError(f"{path} is corrupt or truncated: tensor {name} lies outside the file")

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about buffer ownership; the map outlives the views
            flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=self.data_start + begin)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the pages of `name` from this process once it has been copied elsewhere, so converting dtypes
        tensor by tensor never holds both copies of the whole model."""
        begin, end = self.entries[name]["data_offsets"]
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self.data_start + end
        if hasattr(self.map, "madvise") and stop > start:
            self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)


class WeightSource:
    """All tensors of a checkpoint (one or several files), by name, read lazily."""

    def __init__(self) -> None:
        self.getters: dict[str, Callable[[], Tensor]] = {}
        self.releasers: dict[str, Callable[[], None]] = {}
        self.files: list[Path] = []

    def add_safetensors(self, path: Path) -> None:
        file = SafetensorsFile(path)
        self.files.append(path)
        for name in file.keys():
            self.getters[name] = lambda n=name, f=file: f.tensor(n)
            self.releasers[name] = lambda n=name, f=file: f.release(n)

    def add_bin(self, path: Path) -> None:
        state = load_bin(path)
        self.files.append(path)
        for name, value in state.items():
            if isinstance(value, Tensor):
                self.getters[name] = lambda v=value: v

    def keys(self) -> list[str]:
        return list(self.getters)

    def get(self, name: str) -> Tensor:
        return self.getters[name]()

    def release(self, name: str) -> None:
        release = self.releasers.get(name)
        if release is not None:
            release()


def load_bin(path: Path) -> dict[str, Any]:
    """A pytorch_model.bin, read with weights_only (no arbitrary pickled code runs)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as err:  # pickle/zip failures come in many types
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'corrupt'})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state.get("state_dict", state) if "state_dict" in state else state


def find_weights(name_or_path: Any, hub_args: dict[str, Any], use_safetensors: bool | None = None) -> WeightSource:
    """Locate and open the checkpoint's weights, preferring safetensors."""
    order = [(SAFE_WEIGHTS, False), (SAFE_INDEX, True), (BIN_WEIGHTS, False), (BIN_INDEX, True)]
    if use_safetensors is True:
        order = order[:2]
    elif use_safetensors is False:
        order = order[2:]
    source = WeightSource()
    for filename, is_index in order:
        path = resolve_file(name_or_path, filename, required=False, **hub_args)
        if path is None:
            continue
        if not is_index:
            (source.add_safetensors if filename.endswith(".safetensors") else source.add_bin)(path)
            return source
        for shard in _shards(path):
            shard_path = resolve_file(name_or_path, shard, **hub_args)
            (source.add_safetensors if shard.endswith(".safetensors") else source.add_bin)(shard_path)
        return source
    wanted = ", ".join(name for name, _ in order)
    raise CheckpointError(f"no weights found for {name_or_path}: expected one of {wanted}")


def _shards(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map' object)") from None
    return sorted(set(weight_map.values()))


# ---------------------------------------------------------------------------------------------------------------
# Loading a model
def load_pretrained(cls: type, name_or_path: Any, *model_args: Any, config: NeoXConfig | None = None,
                    dtype: Any = None, torch_dtype: Any = None, device_map: Any = None, device: Any = None,
                    quantization_config: Any = None, use_safetensors: bool | None = None, progress: bool = False,
                    low_cpu_mem_usage: Any = None, trust_remote_code: Any = None, attn_implementation: Any = None,
                    **kwargs: Any) -> PreTrainedModel:
    """`from_pretrained` of every model class. `cls` is a concrete class or an Auto class."""
    if model_args:
        raise InputError(f"from_pretrained takes the checkpoint and keyword arguments only, got extra "
                         f"positional arguments {model_args!r}")
    hub_args = pop_hub_args(kwargs)
    if isinstance(name_or_path, (str, os.PathLike)) and not str(name_or_path).strip():
        raise CheckpointError("the checkpoint name is empty: pass a directory or a hub id")
    if config is None:
        config = AutoConfig.from_pretrained(name_or_path, **hub_args, **kwargs)
    elif kwargs:
        config = type(config).from_dict(config.to_dict(), **kwargs)
    model_class = _concrete_class(cls, config)
    target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    target_device = resolve_device(device_map if device_map is not None else device)

    weights = find_weights(name_or_path, hub_args, use_safetensors)
    if target_dtype is None:  # "auto" with no dtype in config.json: the checkpoint's own floating dtype
        target_dtype = next((t.dtype for t in map(weights.get, weights.keys()) if t.is_floating_point()),
                            torch.float32)
    saved_quantization = config.extra.get("quantization_config")
    with torch.device("meta"):
        model = model_class(config, init=False)
    if saved_quantization is not None or quantization_config is not None:
        from .quantization import prepare_quantized_model

        prepare_quantized_model(model, saved_quantization, quantization_config, target_dtype)
    fill_weights(model, weights, target_dtype, progress=progress, name=str(name_or_path))
    if quantization_config is not None and saved_quantization is None:
        from .quantization import quantize_loaded_model

        quantize_loaded_model(model, quantization_config)
    model = model.to(target_device)
    model.name_or_path = str(name_or_path)
    if isinstance(model, NeoXForCausalLM):
        model.generation_config = _generation_config(name_or_path, hub_args, config)
    model.eval()
    return model


def _generation_config(name_or_path: Any, hub_args: dict[str, Any], config: NeoXConfig) -> Any:
    """generation_config.json when the checkpoint has one, else the defaults the model config implies."""
    from .generation import GENERATION_CONFIG_NAME, GenerationConfig

    path = resolve_file(name_or_path, GENERATION_CONFIG_NAME, required=False, **hub_args)
    return GenerationConfig.from_file(path) if path is not None else GenerationConfig.from_model_config(config)


def _concrete_class(cls: type, config: NeoXConfig) -> type[PreTrainedModel]:
    registry = getattr(cls, "registry", None)
    if registry is not None:  # an Auto class
        config_class_for(config.model_type)
        return registry[config.model_type]
    if not isinstance(config, cls.config_class):
        family = {**MODEL_CLASSES, **CAUSAL_LM_CLASSES}
        hint = f"; use {family[config.model_type].__name__} or AutoModelForCausalLM" if config.model_type in family \
            else ""
        raise CheckpointError(f"the checkpoint is a {config.model_type!r} model, which {cls.__name__} cannot "
                              f"load{hint}")
    return cls


def resolve_dtype(dtype: Any, config: NeoXConfig) -> torch.dtype | None:
    """A torch dtype, or None for "auto" when config.json names none (then the checkpoint decides)."""
    if dtype is None or dtype == "auto":
        named = config.dtype if config.dtype not in (None, "auto") else None
        return DTYPES[named] if named else None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"dtype {dtype!r} is not supported: use 'auto', float32, bfloat16 or float16")


def resolve_device(device_map: Any) -> torch.device:
    """device_map / device → one torch device. "auto" takes CUDA when present; neoxja does not split a model."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError("device_map splitting a model over several devices is not supported; "
                              "pass one device, or 'auto'")
        device_map = devices.pop()
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) and device_map >= 0
                              else "cpu" if device_map == -1 else device_map)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device_map!r}: use 'cpu', 'cuda', 'cuda:N', a GPU index, "
                          f"or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device_map!r} asks for CUDA, but no CUDA GPU is available here; "
                          f"use 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"unknown device {device_map!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


def fill_weights(model: PreTrainedModel, weights: WeightSource, dtype: torch.dtype, progress: bool = False,
                 name: str = "") -> None:
    """Give every parameter of a meta-device model its tensor from the checkpoint."""
    wanted = model.state_dict(keep_vars=True)
    mapping = map_checkpoint_keys(model, weights.keys())
    is_lm = isinstance(model, NeoXForCausalLM)
    head_key = "embed_out.weight"
    embed_key = f"{model.base_model_prefix}.embed_in.weight" if is_lm else "embed_in.weight"
    untie = False
    # a quantized head (llm_int8_skip_modules without it) has its own tensors: it cannot share embed_in's
    tied = is_lm and model.config.tie_word_embeddings and isinstance(model.embed_out, torch.nn.Linear)
    if tied:
        untie = _head_differs(weights, mapping, head_key, embed_key)
        if head_key not in mapping and embed_key in mapping:
            wanted.pop(head_key, None)
        elif embed_key not in mapping and head_key in mapping:  # only the head saved: it feeds both
            mapping[embed_key] = mapping[head_key]
            wanted.pop(head_key, None)
        elif not untie:
            wanted.pop(head_key, None)
    missing = sorted(set(wanted) - set(mapping))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {name} lacks weights the model needs: {', '.join(missing[:5])}{more}")

    as_stored = set()  # quantized layers' tensors keep their own dtypes
    if "quantization_config" in model.config.extra:
        from .quantization import quantized_state_keys

        as_stored = quantized_state_keys(model)
    state: dict[str, Tensor] = {}
    items = sorted(wanted)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="Loading weights", unit="tensor", leave=False)
    for key in items:
        source_key = mapping[key]
        tensor = weights.get(source_key)
        expected = wanted[key]
        if key not in as_stored and tuple(tensor.shape) != tuple(expected.shape):  # quantized layers check their own
            raise CheckpointError(f"checkpoint {name}: {source_key} has shape {list(tensor.shape)}, but the config "
                                  f"implies {list(expected.shape)} (config.json and weights disagree)")
        target = expected.dtype if key in as_stored else dtype
        if expected.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
            weights.release(source_key)
        elif not expected.is_floating_point() and tensor.dtype != expected.dtype:
            raise CheckpointError(f"checkpoint {name}: {source_key} has dtype {tensor.dtype}, expected "
                                  f"{expected.dtype}")
        state[key] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        if untie:
            warnings.warn(f"{name}: embed_out.weight differs from embed_in.weight, so the head is NOT tied: "
                          f"the checkpoint's embed_out is used as the output head (as transformers 5.x does; "
                          f"4.x would have used embed_in)", stacklevel=3)
        else:
            model.tie_weights()
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())


def map_checkpoint_keys(model: PreTrainedModel, keys: list[str]) -> dict[str, str]:
    """model key → checkpoint key, accepting checkpoints of the bare model and of the LM, either way round."""
    prefix = model.base_model_prefix
    is_lm = isinstance(model, NeoXForCausalLM)
    wanted = set(model.state_dict().keys())
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key in keys:
        if key.endswith(LEGACY_SUFFIXES):
            continue
        target = key
        if key == "lm_head.weight":  # the reference's in-memory name for embed_out
            target = "embed_out.weight"
        if is_lm and not target.startswith((prefix + ".", "embed_out.")):  # embed_out.*: a quantized head's too
            target = f"{prefix}.{target}"
        elif not is_lm:
            if target.startswith("embed_out."):
                continue  # the bare model has no head
            if target.startswith(prefix + "."):
                target = target[len(prefix) + 1:]
        if target in wanted:
            mapping[target] = key
        else:
            unexpected.append(key)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint holds weights this {type(model).__name__} does not have: "
                              f"{', '.join(sorted(unexpected)[:5])}{more} (wrong model type or config?)")
    return mapping


def _head_differs(weights: WeightSource, mapping: dict[str, str], head_key: str, embed_key: str) -> bool:
    if head_key not in mapping or embed_key not in mapping:
        return False
    head, embed = weights.get(mapping[head_key]), weights.get(mapping[embed_key])
    return head.shape != embed.shape or not torch.equal(head, embed)


# ---------------------------------------------------------------------------------------------------------------
# Saving
def save_pretrained(model: PreTrainedModel, save_directory: Any, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True, **unused: Any) -> None:
    """config.json + model.safetensors (sharded with an index above max_shard_size), each written atomically.
    A tied head is stored once, as embed_in."""
    if not safe_serialization:
        raise InputError("neoxja writes safetensors only (safe_serialization=False is not supported)")
    if unused:
        raise InputError(f"unexpected argument(s) to save_pretrained: {', '.join(sorted(unused))}")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    limit = _parse_size(max_shard_size)
    shards = list(_split_shards(tensors, limit))
    if len(shards) == 1:
        _write_safetensors(directory / SAFE_WEIGHTS, shards[0])
        (directory / SAFE_INDEX).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(directory / filename, shard)
            weight_map.update({key: filename for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(directory / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        (directory / SAFE_WEIGHTS).unlink(missing_ok=True)
    config = model.config
    saved = type(config).from_dict(config.to_dict())
    saved.architectures = [type(model).__name__]
    saved.dtype = str(model.dtype).replace("torch.", "")
    saved.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


def _tensors_to_save(model: PreTrainedModel) -> dict[str, Tensor]:
    state = model.state_dict()
    if isinstance(model, NeoXForCausalLM) and model.heads_tied:
        state.pop("embed_out.weight", None)
    return {key: t.detach().to("cpu").contiguous() for key, t in state.items()}


def _split_shards(tensors: dict[str, Tensor], limit: int) -> Iterator[dict[str, Tensor]]:
    shard: dict[str, Tensor] = {}
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    yield shard


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise InputError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
