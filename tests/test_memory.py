"""Loading a checkpoint with the 2.7B model's width from safetensors in bfloat16 costs about one byte of resident
memory per weight byte (the weights are memory-mapped, not copied). Measured in fresh processes as the slope
between two depths, so the process's fixed start-up memory (which varies with the machine's state) cancels out."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load import measure, write_checkpoint  # noqa: E402


def test_bf16_safetensors_load_costs_no_second_copy(tmp_path):
    small = write_checkpoint(tmp_path / "small", layers=2)
    large = write_checkpoint(tmp_path / "large", layers=6)
    peak_small = measure("neoxja", tmp_path / "small", "bfloat16")["peak_extra_bytes"]
    peak_large = measure("neoxja", tmp_path / "large", "bfloat16")["peak_extra_bytes"]
    per_weight_byte = (peak_large - peak_small) / (large - small)
    assert per_weight_byte <= 1.2, f"{per_weight_byte:.2f} bytes of memory per weight byte"
