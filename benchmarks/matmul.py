"""Per-layer GEMV speed (decoding: a few activation rows times a weight matrix) for the ABEJA 2.7B shapes, in weight
bytes read per second and as a fraction of the memory read bandwidth measured in the same run.

    python benchmarks/matmul.py                  # batch 1, all shapes, every kernel
    python benchmarks/matmul.py --rows 4 --pool-mib 512 --reps 5

Kernels: PyTorch's bf16 F.linear, int8 (_weight_int8pack_mm) and affine int4 (_weight_int4pack_mm_for_cpu,
group 64: not NF4, shown for scale), torchao's NF4 (dequantize + F.linear) when torchao is installed, and
neoxja's bf16, int8 and nf4 kernels (neoxja.kernels). torchao's int8/int4 weight-only CPU paths call the same two
PyTorch ops. Each kernel cycles through copies of its weights adding up to --pool-mib, so the weights come from
memory and not from the caches; kernels take turns, so machine noise hits all alike. Reported: the best and the
median pass. Bytes count everything a kernel reads per call (weights, scales, absmax).

With --threads 1 the clock is the thread's CPU time, which other processes on a shared machine cannot stretch by
descheduling it; with more threads it is wall time (best of --reps).

Bandwidth: the best of summing a 1 GiB fp32 tensor with PyTorch (same threads, same clock). The decode limit of a
format is bandwidth / bytes per weight; the issue's goals compare tokens/s with the bf16 limit (bf16 >= 0.8,
int8 >= 1.5, nf4 >= 2.5): for one GEMV that is weights/s divided by (bandwidth / 2)."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from neoxja import kernels
from neoxja.quantization import Linear4bit, quantize_int8

SHAPES = {  # [out, in] of GPT-NeoX-Japanese 2.7B
    "query_key_value": (7680, 2560),
    "attention.dense": (2560, 2560),
    "dense_h_to_4h": (10240, 2560),
    "dense_4h_to_h": (2560, 10240),
    "embed_out (head)": (32000, 2560),
}


def read_bandwidth(reps: int, clock: Callable[[], float]) -> float:
    data = torch.ones(256 * 1024 * 1024)  # 1 GiB
    best = float("inf")
    for _ in range(reps):
        start = clock()
        data.sum()
        best = min(best, clock() - start)
    return data.numel() * 4 / best / 1e9


def pool(make: Callable[[], tuple], nbytes: int, pool_bytes: int) -> list[tuple]:
    """Copies of one set of weight tensors, at least pool_bytes in all (at least 2)."""
    first = make()
    return [first] + [tuple(t.clone() for t in first) for _ in range(max(1, pool_bytes // nbytes - 1))]


def kernels_for(n: int, k: int, rows: int, pool_bytes: int) -> dict[str, tuple[int, list[Callable[[], object]]]]:
    """name -> (bytes read per call, one call per pooled weight copy)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    out: dict[str, tuple[int, list[Callable[[], object]]]] = {}

    bf16 = pool(lambda: (w,), n * k * 2, pool_bytes)
    out["torch bf16 F.linear"] = (n * k * 2, [lambda t=t: F.linear(x, t[0]) for t in bf16])
    out["neoxja bf16"] = (n * k * 2, [lambda t=t: kernels.linear_bf16(x, t[0]) for t in bf16])

    q, scb = quantize_int8(w)
    int8_bytes = n * k + n * 4
    int8 = pool(lambda: (q, scb, scb.bfloat16()), int8_bytes, pool_bytes)
    out["torch int8 _weight_int8pack_mm"] = (n * k + n * 2,
                                             [lambda t=t: torch._weight_int8pack_mm(x, t[0], t[2]) for t in int8])
    out["neoxja int8"] = (int8_bytes, [lambda t=t: kernels.linear_int8(x, t[0], t[1]) for t in int8])

    int4_bytes = n * k // 2 + n * (k // 64) * 4
    int4 = pool(lambda: (torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1),
        torch.rand(k // 64, n, 2, generator=gen).to(torch.bfloat16)), int4_bytes, pool_bytes)
    out["torch int4 _weight_int4pack_mm (affine)"] = (int4_bytes, [
        lambda t=t: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t[0], 64, t[1]) for t in int4])

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
        nf4_ao = to_nf4(w, 64, 256)
        out["torchao nf4 (dequantize + F.linear)"] = (n * k // 2 + n * k // 64, [lambda: linear_nf4(x, nf4_ao)] * 2)
    except ImportError:
        pass

    for name, double_quant in (("neoxja nf4", False), ("neoxja nf4, double quant", True)):
        # from bf16 weights the absmax values are bf16 (kept in 16 bits); double quantization's are not (fp32)
        layer = Linear4bit.from_linear(_with_weight(w), "nf4", compress_statistics=double_quant)
        nf4_bytes = layer.qweight.numel() + layer.absmax.numel() * layer.absmax.element_size()
        nf4 = pool(lambda: (layer.qweight, layer.absmax), nf4_bytes, pool_bytes)
        out[name] = (nf4_bytes, [lambda t=t, c=layer.code: kernels.linear_4bit(x, t[0], t[1], c, k) for t in nf4])
    return out


def _with_weight(w: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    return linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1, help="activation rows (batch size of decoding)")
    parser.add_argument("--reps", type=int, default=7, help="passes over each weight pool")
    parser.add_argument("--pool-mib", type=int, default=1024, help="weight copies per kernel, MiB (beat the caches)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    bandwidth = read_bandwidth(args.reps, clock)
    print(f"threads {args.threads}, rows {args.rows}, native kernels {kernels.HAVE_NATIVE}; "
          f"read bandwidth {bandwidth:.1f} GB/s (bf16 limit {bandwidth / 2:.1f} G weights/s)\n")
    print(f"{'layer':18} {'kernel':42} {'GB/s best':>9} {'median':>7} {'of BW':>6} {'x bf16 limit':>12}")
    with torch.no_grad():
        for layer, (n, k) in SHAPES.items():
            calls = kernels_for(n, k, args.rows, args.pool_mib * 2**20)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.reps):
                for name, (_, fns) in calls.items():
                    start = clock()
                    for fn in fns:
                        fn()
                    times[name].append((clock() - start) / len(fns))
            for name, (nbytes, _) in calls.items():
                best, median = min(times[name]), statistics.median(times[name])
                rate = nbytes / best / 1e9
                speedup = n * k / best / 1e9 / (bandwidth / 2)
                print(f"{layer:18} {name:42} {rate:9.1f} {nbytes / median / 1e9:7.1f} {rate / bandwidth:6.2f} "
                      f"{speedup:12.2f}")
            print()


if __name__ == "__main__":
    main()
