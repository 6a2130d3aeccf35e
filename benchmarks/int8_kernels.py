"""Per-linear CPU kernels for weight-only int8 (and the GGUF's 4-bit layout) at decode shapes.

What `--quant int8` chose its kernel from (swarm/model/quant.py). For each shape of the
default model's block (the brief's per-projection shapes and the fused ones Block really
runs) and M rows, the median time of:

- fp32_linear: F.linear on the [out, in] float32 weight
- fp32_onednn: oneDNN's pre-packed float32 weight (what Block uses on CPU today)
- int8pack_fp32 / int8pack_bf16: torch.ops.aten._weight_int8pack_mm (weight-only, per-channel
  scales) with float32 activations, or bfloat16 ones (cast in and out, counted)
- fbgemm_dynamic: torch.ops.quantized.linear_dynamic (activations quantized per step too)
- dequant_fp32: q.float() then F.linear, the floor
- int4pack_fp32 / int4pack_bf16: torch.ops.aten._weight_int4pack_mm_for_cpu, group 32 (the
  layout Q4_1 maps onto)

    python -m benchmarks.int8_kernels [--rows 1 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import emit

# (in, out): the brief's projections, then Block's fused ones (qkv, gate+up)
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 960), (576, 3072)]


def timed(fn: Callable[[], torch.Tensor], seconds: float = 0.25) -> tuple[float, float]:
    """(median, fastest) seconds of one call: on a shared box the fastest is what the kernel can do."""
    for _ in range(20):
        fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 50:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), min(times)


def candidates(weight: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed_fp32 = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
    qweight = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    fbgemm = torch.ops.quantized.linear_prepack(qweight, None)
    xb, scale_b = x.bfloat16(), scale.bfloat16()
    out = {
        "fp32_linear": lambda: F.linear(x, weight),
        "fp32_onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed_fp32, None, "none", [], ""),
        "int8pack_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "int8pack_bf16": lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale_b).float(),
        "fbgemm_dynamic": lambda: torch.ops.quantized.linear_dynamic(x, fbgemm, True),
        "dequant_fp32": lambda: F.linear(x, q.float()) * scale,
    }
    n, k = weight.shape
    if k % 32 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        groups = weight.view(n, k // 32, 32)
        low, high = groups.amin(-1), groups.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-12)
        nibbles = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        # torch's int4 layout: w = (q - 8) * scale + zero, [k/group, n, 2]
        sz = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous()
        out["int4pack_fp32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        sz_b = sz.bfloat16()
        out["int4pack_bf16"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz_b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows M (default 1 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = __import__("os").getloadavg()[0]
    with torch.inference_mode():
        for rows in args.rows:
            for k, n in SHAPES:
                weight = torch.randn(n, k) * 0.05
                x = torch.randn(rows, k)
                reference = F.linear(x, weight)
                for name, fn in candidates(weight, x).items():
                    try:
                        error = ((fn() - reference).norm() / reference.norm()).item()
                        seconds, best = timed(fn)
                    except (RuntimeError, NotImplementedError) as exc:
                        print(f"{name} {k}->{n} M={rows}: unavailable ({str(exc)[:80]})", file=__import__("sys").stderr)
                        continue
                    params = {"kernel": name, "in": k, "out": n, "rows": rows, "threads": torch.get_num_threads(), "load_avg_1m": load, "rel_error": round(error, 5), "min_us": round(best * 1e6, 2)}
                    emit("linear_us", seconds * 1e6, "us", params, human=f"M={rows} {k:>4}->{n:<4} {name:<15} {seconds * 1e6:8.1f} us (min {best * 1e6:6.1f})  rel.err {error:.4f}")


if __name__ == "__main__":
    main()
