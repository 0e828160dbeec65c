"""Loading a checkpoint with the 2.7B model's width from safetensors in bfloat16 costs no more than 1.2x the weight
bytes of resident memory (the weights are memory-mapped, not copied), measured in a fresh process."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load import measure, write_checkpoint  # noqa: E402


def test_bf16_safetensors_load_peak_memory(tmp_path):
    weight_bytes = write_checkpoint(tmp_path / "ckpt", layers=4)
    result = measure("neoxja", tmp_path / "ckpt", "bfloat16")
    ratio = result["peak_extra_bytes"] / weight_bytes
    assert ratio <= 1.2, f"peak memory {ratio:.2f}x the weights"
