"""`pipeline(task="text-generation", ...)`: the reference's text-generation pipeline, and the default demo model.

This module owns what the pipeline adds on top of `generate` (transformers 5.23 semantics, see reference-spec §5.6):
- defaults max_new_tokens=256, do_sample=True, temperature=0.7 and pad_token_id=tokenizer.pad_token_id, each added
  only when neither the caller nor the model's generation config sets it (no max_new_tokens when max_length is set,
  the sampling ones only when sampling);
- the tokenizer pads on the left, so batched prompts line up at their last token;
- output `[{"generated_text": prompt + decode(new ids, skip_special_tokens=True)}]` per prompt, a list of such lists
  for a list of prompts; return_full_text=False gives the continuation only, return_tensors=True the token ids;
- chats (lists of {"role", "content"}) are encoded with the tokenizer's chat template (rinna's format, neoxja.chat)
  and answered with the conversation plus the new assistant message.
`device=0` means cuda:0 as in the reference; where there is no CUDA it falls back to the CPU with a warning, so the
documentation's examples run anywhere. The CLI (neoxja.commands) builds on the same pieces."""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .chat import build_prompt, parse_reply
from .errors import CheckpointError, ConfigError, InputError
from .generation import GenerationConfig, generation_config_for

TASKS = ("text-generation",)
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "data" / "demo-model"
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
# Applied by default only when sampling (the reference's list, restricted to what neoxja implements).
SAMPLING_PARAMS = {"temperature", "top_k", "top_p", "typical_p"}
# generate() arguments that are not GenerationConfig fields.
GENERATE_ONLY = {"generation_config", "seed", "generator", "streamer"}

Messages = Sequence[Mapping[str, str]]


def default_model_path() -> Path:
    """The demo model shipped inside the package: what `pipeline("text-generation")` and the CLI use by default."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(f"no default model installed (expected it in {DEMO_MODEL_DIR}); pass --model/model= "
                              f"with a checkpoint directory or hub id")
    return DEMO_MODEL_DIR


def pipeline_device(device: Any) -> torch.device:
    """The pipeline's `device`: a GPU index (-1 = CPU), a name or a torch.device. Asking for CUDA where there is
    none runs on the CPU with a warning (the documentation's examples say device=0); anything that is not a
    device at all is a ConfigError."""
    from .loading import resolve_device

    wants_cuda = (isinstance(device, int) and device >= 0) or \
        (isinstance(device, (str, torch.device)) and str(device).split(":")[0] == "cuda")
    if wants_cuda and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} asks for CUDA, but no CUDA GPU is available here: running on the CPU",
                      stacklevel=3)
        return torch.device("cpu")
    return resolve_device(device)


def generation_kwargs(model: Any, tokenizer: Any, user: Mapping[str, Any]) -> dict[str, Any]:
    """generate()'s keyword arguments for a pipeline call: the caller's, plus the pipeline defaults for what neither
    the caller nor the model's generation config sets. Raises InputError for unknown or invalid settings, so that
    bad arguments fail before any work is done."""
    user_config: GenerationConfig | None = user.get("generation_config")
    fields = {k: v for k, v in user.items() if k not in GENERATE_ONLY}
    model_config = generation_config_for(model)
    set_params = {**model_config.to_dict(), **(user_config.to_dict() if user_config else {}), **fields}
    defaults = {**PIPELINE_DEFAULTS, "pad_token_id": tokenizer.pad_token_id}
    added = {k: v for k, v in defaults.items() if k not in set_params and v is not None
             and not (k == "max_new_tokens" and "max_length" in set_params)}
    if not {**set_params, **added}.get("do_sample"):
        added = {k: v for k, v in added.items() if k not in SAMPLING_PARAMS}
    (user_config or model_config).updated(**fields, **added).validate()
    if user_config is None:
        return {**user, **added}
    return {**user, "generation_config": user_config.updated(**added)}


def is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(m, Mapping) and "role" in m for m in value)


def chat_input_ids(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation: the tokenizer's chat template, else rinna's format (neoxja.chat) as text."""
    template = getattr(tokenizer, "apply_chat_template", None)
    if template is not None:
        return list(template(messages, add_generation_prompt=add_generation_prompt, return_dict=False))
    return tokenizer(build_prompt(messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} is invalid: it must be a positive integer")
    return batch_size


def _return_type(kwargs: Mapping[str, Any]) -> str | None:
    """"full", "new" or "tensors" when `kwargs` choose what a call returns, else None."""
    full, tensors = kwargs.get("return_full_text"), kwargs.get("return_tensors")
    if full is not None and tensors:
        raise InputError("return_full_text and return_tensors are mutually exclusive")
    return "tensors" if tensors else None if full is None else "full" if full else "new"


class TextGenerationPipeline:
    """Continues text prompts (or answers chats) with a causal LM; call it with one input or a list of them."""

    task = "text-generation"
    # Arguments that shape the pipeline's input or output rather than the decoding.
    OUTPUT_PARAMS = {"return_full_text", "return_tensors", "clean_up_tokenization_spaces", "skip_special_tokens",
                     "add_special_tokens"}

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 1, **kwargs: Any) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, _check_batch_size(batch_size)
        if tokenizer.padding_side == "right":  # decoder-only batches must end at each prompt's last token
            tokenizer.padding_side = "left"
        self.call_kwargs: dict[str, Any] = {}
        self._settings(kwargs)  # fail fast on bad settings
        self.call_kwargs = kwargs

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={getattr(self.model, 'name_or_path', type(self.model).__name__)!r})"

    def decoding_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """generate()'s arguments for a call with `kwargs` (on top of those given at construction)."""
        return self._settings(kwargs)[1]

    def _settings(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(output settings, generate() arguments) of a call: its kwargs over the construction's, with the
        pipeline's decoding defaults added and everything checked."""
        merged = {**self.call_kwargs, **kwargs}
        output = {k: v for k, v in merged.items() if k in self.OUTPUT_PARAMS}
        output["return_type"] = _return_type(kwargs) or _return_type(self.call_kwargs) or "full"
        decoding = {k: v for k, v in merged.items() if k not in self.OUTPUT_PARAMS}
        stop = decoding.pop("stop_sequence", None)
        if stop is not None:
            decoding["stop_strings"] = stop
        return output, generation_kwargs(self.model, self.tokenizer, decoding)

    def __call__(self, inputs: str | Messages | Sequence[str | Messages], batch_size: int | None = None,
                 **kwargs: Any) -> list:
        """Generate for one prompt or chat (→ a list of result dicts) or a list of them (→ a list of such lists),
        `batch_size` prompts at a time (default: the pipeline's)."""
        single = isinstance(inputs, str) or is_chat(inputs)
        items = [inputs] if single else list(inputs) if isinstance(inputs, (list, tuple)) else None
        if not items or not all(isinstance(x, str) or is_chat(x) for x in items):
            raise InputError("the pipeline takes a prompt string, a chat (a list of {'role', 'content'} dicts), "
                             f"or a non-empty list of those; got {type(inputs).__name__}")
        output, decoding = self._settings(kwargs)
        step = _check_batch_size(self.batch_size if batch_size is None else batch_size)
        if not single:
            # The reference iterates over a list through a torch DataLoader, which draws its base seed from the
            # global RNG; drawing it here too keeps seeded sampling identical to the reference's.
            torch.empty((), dtype=torch.int64).random_()
        results = []
        for start in range(0, len(items), step):
            results += self._generate(items[start:start + step], output, decoding)
        return results[0] if single else results

    def _encode(self, item: str | Messages, add_special_tokens: bool | None) -> list[int]:
        if is_chat(item):
            return chat_input_ids(self.tokenizer, item, add_generation_prompt=item[-1]["role"] != "assistant")
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer(item, **options)["input_ids"]
        if ids:
            return ids
        # The reference generates from bos for an empty prompt; bos is a special token, so the decoded text is
        # the same as if it were not in the prompt.
        bos = generation_config_for(self.model).bos_token_id
        if bos is None:
            raise InputError("the prompt is empty and the model has no bos_token_id to start from: give some text")
        return [bos]

    def _generate(self, items: list, output: dict[str, Any], decoding: dict[str, Any]) -> list[list[dict]]:
        rows = [self._encode(item, output.get("add_special_tokens")) for item in items]
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(self.device)
        sequences = self.model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        tokenizer=self.tokenizer, **decoding)
        per_item = sequences.shape[0] // len(items)
        prompt_len = batch["input_ids"].shape[1]
        return [[self._record(item, seq, prompt_len, output) for seq in sequences[i * per_item:(i + 1) * per_item]]
                for i, item in enumerate(items)]

    def _record(self, item: str | Messages, sequence: torch.Tensor, prompt_len: int,
                output: dict[str, Any]) -> dict[str, Any]:
        if output["return_type"] == "tensors":
            return {"generated_token_ids": sequence.tolist()}
        skip = output.get("skip_special_tokens")
        text = self.tokenizer.decode(sequence[prompt_len:].tolist(), skip_special_tokens=True if skip is None else skip,
                                     clean_up_tokenization_spaces=output.get("clean_up_tokenization_spaces"))
        full = output["return_type"] == "full"
        if not is_chat(item):
            return {"generated_text": item + text if full else text}
        reply = parse_reply(text, eos_token=self.tokenizer.eos_token or "")
        if not full:
            return {"generated_text": reply}
        if item[-1]["role"] == "assistant":  # the model continued the last (assistant) message
            return {"generated_text": [*item[:-1], {"role": "assistant", "content": item[-1]["content"] + reply}]}
        return {"generated_text": [*item, {"role": "assistant", "content": reply}]}


def pipeline(task: str | None = None, model: str | os.PathLike | Any | None = None, *, tokenizer: Any = None,
             dtype: Any = None, torch_dtype: Any = None, device: Any = None, device_map: Any = None,
             revision: str | None = None, token: str | bool | None = None, model_kwargs: dict | None = None,
             batch_size: int = 1, use_fast: bool | None = None, trust_remote_code: bool | None = None,
             **kwargs: Any) -> TextGenerationPipeline:
    """A text-generation pipeline, as `transformers.pipeline` builds one.

    `model` is a checkpoint directory, a hub id or a loaded model (None: the bundled demo model); `tokenizer` the
    same (None: the model's). `torch_dtype` is the old name of `dtype`; `device` a GPU index (-1 = CPU) or device
    name (see pipeline_device); `model_kwargs` go to from_pretrained (quantization_config, progress, ...).
    Other keyword arguments become defaults of every call (max_new_tokens, return_full_text, ...).
    use_fast and trust_remote_code are accepted for compatibility and ignored."""
    from .modeling import AutoModelForCausalLM, NeoXForCausalLM
    from .tokenization import AutoTokenizer

    if task is None and model is None:
        raise ConfigError("pipeline() needs a task: use pipeline('text-generation', model=...)")
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: neoxja's pipeline supports {', '.join(TASKS)}")
    if device is not None and device_map is not None:
        raise ConfigError("pass either device or device_map, not both")
    if dtype is not None and torch_dtype is not None:
        raise ConfigError("pass either dtype or torch_dtype (its old name), not both")
    hub_args = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    target = pipeline_device(device) if device is not None else None
    if model is None:
        model = default_model_path()
    if isinstance(model, (str, os.PathLike)):
        load_args = {**hub_args, **(model_kwargs or {})}
        if dtype is not None or torch_dtype is not None:
            load_args["dtype"] = dtype if dtype is not None else torch_dtype
        placement = {"device": target} if target is not None else {"device_map": device_map}
        name = model
        model = AutoModelForCausalLM.from_pretrained(model, **placement, **load_args)
    else:
        if not isinstance(model, NeoXForCausalLM):
            raise ConfigError(f"model must be a checkpoint directory, a hub id or a causal LM, got "
                              f"{type(model).__name__}")
        if dtype is not None or torch_dtype is not None or model_kwargs:
            warnings.warn("dtype and model_kwargs are ignored for a model that is already loaded", stacklevel=2)
        if target is not None:
            model = model.to(target)
        name = getattr(model, "name_or_path", None)
    if tokenizer is None:
        if name is None:
            raise ConfigError("cannot tell which tokenizer this model needs: pass tokenizer=")
        tokenizer = name
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **hub_args)
    return TextGenerationPipeline(model, tokenizer, batch_size=batch_size, **kwargs)
