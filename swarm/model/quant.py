"""Compressed weights for edge nodes: weight-only int8 with per-output-channel symmetric scales
(`swarm-node --quant int8`), and a GGUF's own Q4_1 blocks served as stored (`--quant q4_1`).

int8: each row of a projection's [out, in] weight becomes int8 values q and one float32 scale
s = max|row| / 127, so W ~= q * s[:, None]. Activations are not quantized: the hidden states
between projections stay in the span's compute dtype (float32 on CPU, bfloat16 on CUDA), so the
error is the weights' rounding (half a step, <= 0.4% of a row's largest weight) plus, on CPU, the
kernel's bfloat16 activations (below). Quantization happens one block at a time while loading
(load_span), from whatever the checkpoint holds (GGUF Q4_1/Q8_0 blocks are dequantized per block
first), so the whole model never sits in float32 at once.

q4_1: the default model's blocks ARE Q4_1 (32 weights share a float16 scale and minimum, 4 bits
each); our float32 is their dequantization, and re-quantizing that to per-row int8 adds an error
of its own. torch's CPU int4 kernel computes w = (nibble - 8) * scale + zero per group of 32,
which is Q4_1 exactly with zero = minimum + 8 * scale: `Int4Linear` serves the file's blocks
with no re-quantization (only scale and zero round to bfloat16), in half int8's bytes.

Kernels, measured before choosing (benchmarks/int8_kernels.py; 2-core AMD EPYC with AVX512-VNNI,
torch 2.13, one thread, M=1 row, the default model's shapes; us a call, median):

    shape (in->out)  fp32 F.linear  fp32 oneDNN  int8pack(f32 x)  int8pack(bf16 x)  fbgemm dyn.  dequant+mm  int4pack(bf16 x)
    576->576                16.9         26.2          209.6             11.2           11.0         35.4         10.2
    576->960 (qkv)          29.8         36.2          352.6             16.4           13.6         57.8         16.1
    576->3072 (gate,up)     97.6         87.7         1204.4             47.3           29.0        161.5         47.4
    1536->576 (down)        42.0         48.7          557.3             23.1           17.8         84.5         24.1

- `torch.ops.aten._weight_int8pack_mm` takes float32, bfloat16 and float16 activations on CPU
  (scales in the activation's dtype), but only its bfloat16/float16 paths are vectorized: with
  float32 activations it is 10x slower than float32 weights. So the CPU kernel casts the (one-row)
  activation to bfloat16 and back, with unit scales, and applies the float32 per-channel scale to
  its output. On the default model this costs no top-1 agreement beyond the weights' rounding
  (measured: 97.25% with exact float32 activations, 97.5% with bfloat16, 400 positions).
- fbgemm's dynamic linear (`torch.ops.quantized.linear_dynamic`) is ~1.5x faster per call here,
  but it quantizes each step's activations per tensor to 7 bits (twice the error per projection
  on random data, worse on real activations with outlier channels), and its packed weight keeps a
  second copy of the int8 weight (RSS). Not chosen: weight-only is what the issue asks, and int8
  already misses the accuracy aim on this model by its weight rounding alone.
- dequantize-then-matmul is the floor: slower than float32.
- `_weight_int4pack_mm_for_cpu` (bfloat16 activations; float32 ones take its slow path, like
  int8pack) runs at int8pack's speed per call in cache, and reads half the bytes from memory:
  whole-model decode is the fastest of all (benchmarks/edge.py).

On CUDA the lead measured `_weight_int8pack_mm` at 9x slower than bfloat16 F.linear, and eager
dequantize-then-matmul at 10x; `F.linear(x, q.to(x.dtype)) * s` compiled is on par with bfloat16.
So on CUDA the weight is cast inside the linear (`int8_linear`): correct everywhere, and inside
the decode engine's compiled block functions (swarm/model/engine_blocks.py takes the (q, scale)
pair as the weight) the cast can fuse into the matmul; it buys memory, not speed. q4_1 is CPU only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUANTS = ("none", "int8", "q4_1")  # what `--quant` takes; "none": the compute dtype's own weights
Q4_GROUP = 32  # inputs per Q4_1 block (GGUF)


def quantize_int8(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (q int8 [out, in], scale float32 [out]), W ~= q * scale[:, None].

    Symmetric per output channel: q in [-127, 127]; an all-zero row gets scale 1 (q = 0). Rows go
    `chunk` at a time, so the float32 scratch stays small beside a large matrix (an LM head)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for first in range(0, weight.shape[0], chunk):
        w = weight[first : first + chunk].float()
        s = w.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[first : first + chunk] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[first : first + chunk] = s
    return q, scale


# How far `equalize_inputs` flattens input channels: s_j = max|W[:, j]| ** alpha. Measured on the
# default model (int8 against float32, top-1 agreement over 1,784 teacher-forced positions of two
# texts): alpha 0 (off) 95.96%, 0.2 96.97%, 0.3 96.69%; on one text 0.5 gave 94.1% and 0.8 93.2%.
EQUALIZE_ALPHA = 0.2


def equalize_inputs(weights: dict[str, torch.Tensor], alpha: float = EQUALIZE_ALPHA) -> dict[str, torch.Tensor]:
    """Block weights (float, canonical names) rescaled per input channel so per-row int8 rounds them
    more finely, computing the same function in exact arithmetic.

    A row's int8 step is set by its largest weight, so a few input channels with large weights make
    every other weight of the row round coarsely. Dividing column j of the projections that read a
    norm's output by s_j, and multiplying the norm's weight by s_j, leaves x W^T unchanged (the norm
    output is x * norm_weight); likewise w_down's columns against w_up's rows (the MLP's inner
    activation is silu(gate) * up, linear in up; per-row int8 is blind to row scaling, so w_up loses
    nothing). The output projection wo is left alone: its inputs come from v through grouped heads.
    Weights only, no calibration data: a node holding a middle span has no activations to measure.
    """
    w = dict(weights)

    def scales(*names: str) -> torch.Tensor:
        peak = torch.stack([w[n].abs().amax(0) for n in names]).amax(0).clamp_min(1e-8)
        s = peak**alpha
        return s / s.log().mean().exp()  # geometric mean 1: the norm weights keep their magnitude

    s = scales("wq", "wk", "wv")
    for name in ("wq", "wk", "wv"):
        w[name] = w[name] / s
    w["attn_norm"] = w["attn_norm"] * s
    s = scales("w_gate", "w_up")
    for name in ("w_gate", "w_up"):
        w[name] = w[name] / s
    w["mlp_norm"] = w["mlp_norm"] * s
    s = scales("w_down")
    w["w_down"] = w["w_down"] / s
    w["w_up"] = w["w_up"] * s[:, None]
    return w


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@functools.cache
def int8pack_available() -> bool:
    """Whether this torch build has the CPU weight-only int8 kernel (probed once)."""
    try:
        q, x = torch.ones(8, 32, dtype=torch.int8), torch.ones(1, 32, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16))
        return bool(torch.allclose(out.float(), torch.full((1, 8), 32.0)))
    except (RuntimeError, AttributeError):
        return False


class Int8Linear(nn.Module):
    """y = x (q s)^T (+ b) for x [N, in]: an int8 [out, in] weight with float32 per-row scales.

    `weight` comes as a float [out, in] tensor (quantized here) or as a ready (q, scale) pair;
    `dtype` is the compute dtype: on CPU the scales stay float32 (applied to the kernel's output),
    elsewhere they are kept in `dtype`, the weight's cast (gpt-fast)."""

    def __init__(self, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        q, scale = quantize_int8(weight) if isinstance(weight, torch.Tensor) else weight
        self.cpu_kernel = q.device.type == "cpu" and int8pack_available()
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32 if self.cpu_kernel else dtype).contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        # int8pack_mm scales by a vector of the activation's dtype: ones, so the real float32
        # scale is applied after, exactly (bfloat16 scales would round each row's by up to 0.4%).
        self.register_buffer("unit", torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device) if self.cpu_kernel else None, persistent=False)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            y = (torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.unit) * self.scale).to(x.dtype)
        else:
            y = int8_linear(x, self.q, self.scale)
        return y if self.bias is None else y + self.bias

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.q, self.scale, dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (q s)^T with the weight cast to x's dtype inside the matmul: on CUDA, under torch.compile,
    the cast fuses into the matmul's load (gpt-fast)."""
    return (F.linear(x, q.to(x.dtype)) * scale).to(x.dtype)


def block_bytes(config, dtype: torch.dtype, quant: str | None = None, device: torch.device | str = "cpu") -> int:
    """Bytes one block's weights take once loaded (`Span.weight_bytes` per block), before loading it:
    what `--max-memory` sizes a span by. `config` is a swarm.model.config.ModelConfig."""
    element = torch.empty((), dtype=dtype).element_size()
    if quant in (None, "none"):
        return config.block_params() * element
    c = config
    rows = (c.q_size + 2 * c.kv_size) + c.hidden_size + 2 * c.intermediate_size + c.hidden_size  # qkv, o, gate+up, down
    kept = 2 * c.hidden_size + ((c.q_size + 2 * c.kv_size) if c.qkv_bias else 0)  # norms, biases: compute dtype
    if quant == "q4_1":  # half a byte a weight, a bfloat16 (scale, zero) pair per group of 32
        weights = c.block_params() - kept
        return weights // 2 + weights // Q4_GROUP * 4 + kept * element
    per_row = 4 + 2 if torch.device(device).type == "cpu" and int8pack_available() else element  # scale (+ bfloat16 ones)
    return (c.block_params() - kept) + rows * per_row + kept * element


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Loading dequantizes each block through float32 temporaries several times its int8 size;
    glibc keeps what they freed in its arenas, so an int8 node would otherwise sit at the
    RSS of its loading peak (the default model: 610 MB instead of 350)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc; musl and others have no such call
    except (OSError, AttributeError):
        return None


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in a GGUF's own Q4_1 blocks (`--quant q4_1`): 4-bit values, a scale and
    a minimum per group of 32 inputs, w = nibble * scale + minimum. torch's CPU int4 kernel
    (`_weight_int4pack_mm_for_cpu`, fast with bfloat16 activations) computes with exactly that,
    as (nibble - 8) * scale + zero with zero = minimum + 8 * scale: the file's weights, not a
    re-quantization of them; only scale and zero round to bfloat16 (the kernel's dtype).
    CPU only (the kernel is)."""

    def __init__(self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        nibbles, scale, minimum = parts  # [out, in] int32; [out, in/32] float32 twice
        if nibbles.device.type != "cpu":
            raise ValueError("q4_1 weights run on the CPU only (torch's int4 kernel there)")
        self.out_features, self.in_features = nibbles.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.contiguous(), 1), persistent=False)
        zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1)  # [in/32, out, 2]
        self.register_buffer("scale_zero", zeros.to(torch.bfloat16).contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, Q4_GROUP, self.scale_zero).to(x.dtype)
        return y if self.bias is None else y + self.bias
