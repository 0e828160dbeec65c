"""Load time and peak memory of a checkpoint shaped like ABEJA's 2.7B model (random weights, bfloat16
safetensors), for neoxja and the reference (transformers), each measured in a fresh process in the same run.

    python benchmarks/load.py                 # the full 32 layers (writes a 5.4 GB checkpoint to a temp dir)
    python benchmarks/load.py --layers 4      # quicker

Peak memory is the process's peak resident set size minus what it held before loading, after one forward pass
(so every weight has been touched), shown as a multiple of the weight bytes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
engine, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if engine == "neoxja":
    import neoxja as lib
    import neoxja.loading, neoxja.generation, safetensors.torch  # imports are not the model's memory
else:
    import transformers as lib
    lib.logging.set_verbosity_error()
    from transformers import GPTNeoXJapaneseForCausalLM  # noqa: F401  (loads the modeling code)
with torch.device("meta"):  # torch imports its meta-tensor machinery (sympy...) on first use
    torch.nn.Embedding(4, 4)
with torch.no_grad():  # one-time runtime set-up of the matmul kernels
    torch.nn.functional.linear(torch.ones(4, 2560, dtype=dtype), torch.ones(64, 2560, dtype=dtype))
before = rss_kib()
start = time.perf_counter()
model = lib.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
load_seconds = time.perf_counter() - start
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_seconds": load_seconds, "before_kib": before, "peak_kib": peak}))
"""


def write_checkpoint(path: Path, layers: int, hidden: int = 2560, vocab: int = 32000, dtype=torch.bfloat16) -> int:
    """A GPT-NeoX-Japanese checkpoint with the 2.7B model's width; returns the weight bytes."""
    from safetensors.torch import save_file

    config = {"model_type": "gpt_neox_japanese", "vocab_size": vocab, "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": 32, "intermediate_multiple_size": 4,
              "max_position_embeddings": 2048, "bos_token_id": 31999, "eos_token_id": 31999,
              "rotary_pct": 1.0, "rotary_emb_base": 10000, "architectures": ["GPTNeoXJapaneseForCausalLM"]}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    tensors = {"gpt_neox_japanese.embed_in.weight": rand(vocab, hidden),
               "gpt_neox_japanese.final_layer_norm.weight": torch.ones(hidden, dtype=dtype),
               "gpt_neox_japanese.final_layer_norm.bias": torch.zeros(hidden, dtype=dtype)}
    for i in range(layers):
        p = f"gpt_neox_japanese.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "input_layernorm.bias": torch.zeros(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.bias": torch.zeros(hidden, dtype=dtype),
            p + "attention.query_key_value.weight": rand(3 * hidden, hidden),
            p + "attention.dense.weight": rand(hidden, hidden),
            p + "mlp.dense_h_to_4h.weight": rand(4 * hidden, hidden),
            p + "mlp.dense_4h_to_h.weight": rand(hidden, 4 * hidden),
        })
    tensors[f"gpt_neox_japanese.layers.{layers - 1}.attention.dense_bias"] = torch.zeros(hidden, dtype=dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(engine: str, path: Path, dtype: str = "bfloat16") -> dict:
    """Load in a fresh process; returns load_seconds and peak_extra_bytes (peak RSS minus RSS before loading)."""
    result = subprocess.run([sys.executable, "-c", CHILD, engine, str(path), dtype], capture_output=True, text=True,
                            check=False, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if result.returncode != 0:
        raise RuntimeError(f"{engine} failed to load:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["peak_extra_bytes"] = (data["peak_kib"] - data["before_kib"]) * 1024
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ckpt"
        start = time.perf_counter()
        weight_bytes = write_checkpoint(path, args.layers)
        print(f"checkpoint: hidden 2560, {args.layers} layers, vocab 32000, bfloat16 safetensors, "
              f"{weight_bytes / 1e9:.2f} GB (written in {time.perf_counter() - start:.0f} s)")
        print(f"{'engine':<14}{'load s':>9}{'peak extra GB':>15}{'x weights':>11}")
        for engine in ("neoxja", "transformers"):
            data = measure(engine, path)
            print(f"{engine:<14}{data['load_seconds']:>9.2f}{data['peak_extra_bytes'] / 1e9:>15.2f}"
                  f"{data['peak_extra_bytes'] / weight_bytes:>11.2f}")


if __name__ == "__main__":
    main()
