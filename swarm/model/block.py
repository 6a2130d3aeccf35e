"""The Llama-family transformer block, a span of blocks and its KV cache.

In the spirit of gpt-fast's model.py: plain tensors, shapes in comments, state
passed in explicitly. A span runs blocks [start, end) over *ragged* batches: the
tokens of several sessions are concatenated into one [N, D] matrix so every
weight matmul runs once per step for all of them, and only attention, which
reads each session's own cache, is done per session (a `Segment`).

Layout notes:
- Q, K, V are fused into one weight (and gate/up into another) at load time:
  one matmul instead of three per step, which matters when decode is bound by
  streaming weights and by per-op overhead.
- Every projection is a `Linear` that stores its weight in the form that
  reads fastest on its device. Decode is bound by streaming weights, and on
  CPU the plain [out, in] gemv of `F.linear` is not split across threads for
  this model's narrow matrices: it reads 11 GB/s where a large one reads 22
  (2-core CI box). oneDNN's pre-packed weights run the same step in 640 us a
  block instead of 800 us, and a batch of 8 tokens costs what one does (the
  `x @ w` and `F.linear` gemms take 2.5x longer at 8 rows). So on CPU the
  weights are reordered once, at load, for oneDNN; elsewhere `F.linear`.
- RoPE uses the HF "rotate half" layout; GGUF's interleaved Q/K rows are
  un-permuted by the weights module before they get here.
- Grouped-query attention groups the query heads that share a KV head
  (q [kv, group*T, hd] against k [kv, L, hd]) instead of repeating K and V.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swarm.errors import LengthExceeded, PositionError, UnsupportedModel
from swarm.model.config import ModelConfig
from swarm.model.quant import QUANTS, Int4Linear, Int8Linear, equalize_inputs, release_freed_memory

# The projections `--quant int8` stores as int8 (swarm/model/quant.py); norms and biases stay in the compute dtype.
PROJECTIONS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with llama3 scaling or llama.cpp's stored factors."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if freq_factors is not None:  # GGUF llama3: precomputed divisors per frequency
        return inv_freq / freq_factors.float()
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for token positions [N] (computed in float32, like HF)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N, hd/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd]; cos/sin [N, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@functools.lru_cache(maxsize=None)
def onednn_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's packed linear for `dtype` on the CPU (probed once)."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight, x = torch.randn(8, 4), torch.randn(2, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, weight), atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


class Linear(nn.Module):
    """y = x W^T (+ b) for x [N, in]; W given as [out, in], stored as reads fastest (see the notes)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.packed = weight.device.type == "cpu" and onednn_linear_available(weight.dtype)
        weight = weight.contiguous()
        if self.packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 8)  # tuned for batches of ~8 rows
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of one session in one span: [num_blocks, kv_heads, max_length, head_dim] each.

    `length` is how many positions hold valid entries. A step may start at any
    position <= length (rewinding overwrites, as a replay after failover does),
    never beyond it, and never run past `max_length`.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, max_length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, config.num_kv_heads, max_length, config.head_dim)
        # never read before written: attention only looks at positions [0, length)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    @staticmethod
    def nbytes_for(config: ModelConfig, num_blocks: int, max_length: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return config.kv_bytes_per_token(num_blocks, element) * max_length

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_step(self, start: int, count: int) -> None:
        """Refuse a step of `count` tokens at `start` that the cache cannot take."""
        if count < 1:
            raise PositionError("a step needs at least one token")
        if start < 0 or start > self.length:
            raise PositionError(f"step starts at position {start}, but the cache holds positions [0, {self.length})")
        if start + count > self.max_length:
            raise LengthExceeded(f"step would reach position {start + count}, past max_length {self.max_length}")


@dataclass
class Segment:
    """One session's tokens in a ragged batch: `length` tokens from position `start`."""

    cache: KVCache
    start: int
    length: int


class Block(nn.Module):
    """RMSNorm -> GQA attention -> residual -> RMSNorm -> SwiGLU MLP -> residual.

    `quant` "int8": the projections become `Int8Linear`s, quantized from `weights` (give them in
    float32: quantizing from bfloat16 would round twice), computing in the norms' dtype."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], quant: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant = None if quant in (None, "none") else quant
        if self.quant not in (None, "int8", "q4_1"):
            raise ValueError(f"unknown quantization {quant!r} (one of {', '.join(QUANTS)})")
        dtype = weights["attn_norm"].dtype
        linear = {None: Linear, "int8": functools.partial(Int8Linear, dtype=dtype), "q4_1": Int4Linear}[self.quant]
        bqkv = torch.cat([weights["bq"], weights["bk"], weights["bv"]]) if config.qkv_bias else None
        self.wqkv = linear(_cat([weights["wq"], weights["wk"], weights["wv"]]), bqkv)  # D -> q + 2kv
        self.wo = linear(weights["wo"])  # q -> D
        self.w_gate_up = linear(_cat([weights["w_gate"], weights["w_up"]]))  # D -> 2I
        self.w_down = linear(weights["w_down"])  # I -> D
        self.register_buffer("attn_norm", weights["attn_norm"].contiguous(), persistent=False)
        self.register_buffer("mlp_norm", weights["mlp_norm"].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Sequence[Segment], layer: int) -> torch.Tensor:
        """x [N, D] -> [N, D]; `layer` indexes this block's slot in each segment's cache."""
        c = self.config
        h = F.rms_norm(x, (c.hidden_size,), self.attn_norm, c.rms_eps)
        qkv = self.wqkv(h)  # [N, q + 2kv]
        v = qkv[:, c.q_size + c.kv_size :]
        qk = apply_rope(qkv[:, : c.q_size + c.kv_size].view(-1, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]  # [N, H, hd], [N, KV, hd]
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if len(segments) == 1:
            attn = self._attend(q, k, v, segments[0], layer)
        else:
            outs, offset = [], 0
            for seg in segments:
                span = slice(offset, offset + seg.length)
                outs.append(self._attend(q[span], k[span], v[span], seg, layer))
                offset += seg.length
            attn = torch.cat(outs)
        x = x + self.wo(attn)
        h = F.rms_norm(x, (c.hidden_size,), self.mlp_norm, c.rms_eps)
        gate, up = self.w_gate_up(h).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segment, layer: int) -> torch.Tensor:
        """q [T, H, hd], k/v [T, KV, hd] of one session -> [T, H*hd], through its cache."""
        c = self.config
        t, end = seg.length, seg.start + seg.length
        k_cache, v_cache = seg.cache.k[layer], seg.cache.v[layer]  # [KV, max_len, hd]
        k_cache[:, seg.start : end] = k.transpose(0, 1)
        v_cache[:, seg.start : end] = v.transpose(0, 1)
        keys, values = k_cache[:, :end], v_cache[:, :end]  # [KV, L, hd]
        group = c.num_heads // c.num_kv_heads
        # Query heads sharing a KV head become rows of one matrix: [KV, group*T, hd].
        qg = q.view(t, c.num_kv_heads, group, c.head_dim).permute(1, 2, 0, 3).reshape(c.num_kv_heads, group * t, c.head_dim)
        if t == 1:
            # One query row per head needs no mask; plain matmuls beat SDPA's
            # dispatch on CPU for these tiny shapes (~20 vs ~90 us a layer).
            scores = (qg @ keys.transpose(1, 2)) * (c.head_dim**-0.5)  # [KV, group, L]
            out = scores.softmax(-1) @ values
        else:
            query_pos = torch.arange(seg.start, end, device=q.device)
            mask = query_pos[:, None] >= torch.arange(end, device=q.device)[None, :]  # [T, L]
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask.repeat(group, 1))
        # [KV, group*T, hd] -> [T, H*hd] with heads in their original order
        return out.view(c.num_kv_heads, group, t, c.head_dim).permute(2, 0, 1, 3).reshape(t, c.q_size)


def _cat(weights: list) -> torch.Tensor | tuple:
    """Stack projections' output rows: tensors, or the parts of q4_1 weights part by part."""
    if isinstance(weights[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*weights))
    return torch.cat(weights)


class Span(nn.Module):
    """Blocks [start, end) of one model, run over hidden states with explicit positions."""

    def __init__(self, config: ModelConfig, start: int, end: int, blocks: list[Block], inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.start, self.end = start, end
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held, which one step through the whole span reads (int8: values and scales)."""
        return sum(b.nbytes for b in self.buffers() if b is not self.inv_freq)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: hidden states, norms, KV cache (also of an int8 span)."""
        return self.blocks[0].attn_norm.dtype

    @property
    def quant(self) -> str | None:
        return self.blocks[0].quant

    @property
    def precision(self) -> str:
        """What this span computes with: "int8" (weight-only, per-channel scales), "q4_1" (the GGUF's
        own 4-bit blocks), or the dtype's name."""
        return self.quant or str(self.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return self.blocks[0].attn_norm.device

    def new_cache(self, max_length: int, blocks: tuple[int, int] | None = None) -> KVCache:
        """A cache for the whole span, or for the sub-span `blocks` [i, j) only."""
        first, last = blocks or (self.start, self.end)
        return KVCache(self.config, last - first, max_length, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, segments: Sequence[Segment], blocks: tuple[int, int] | None = None) -> torch.Tensor:
        """x [N, D] (the tokens of all segments, in order) -> [N, D].

        `blocks` picks a sub-span [i, j) (absolute block numbers) of this span, and
        every segment's cache holds exactly those j - i blocks. Each cache's
        `length` becomes its segment's end.
        """
        first, last = blocks or (self.start, self.end)
        assert self.start <= first < last <= self.end, "sub-span checked by the caller"
        for seg in segments:
            assert seg.cache.k.shape[0] == last - first, "cache made for another sub-span"
            seg.cache.check_step(seg.start, seg.length)
        positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(x.device)
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        for layer, index in enumerate(range(first - self.start, last - self.start)):
            x = self.blocks[index](x, cos, sin, segments, layer)
        for seg in segments:
            seg.cache.length = seg.start + seg.length
        return x


def load_span(
    checkpoint,  # swarm.model.weights.Checkpoint
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    quant: str | None = None,
) -> Span:
    """Read blocks [start, end) from `checkpoint` (only their tensors) into a Span.

    `quant` "int8": weight-only int8 projections (swarm/model/quant.py), quantized one block at a
    time from the checkpoint's float32 values, so only one block is ever held in float32."""
    checkpoint.check_span(start, end)
    config = checkpoint.config
    quant = None if quant in (None, "none") else quant
    blocks = []
    if quant == "q4_1" and torch.device(device).type != "cpu":
        raise UnsupportedModel("q4_1 weights run on the CPU only: use --quant int8 on a GPU")
    for number, index in enumerate(range(start, end), 1):
        if quant == "q4_1":  # the file's own blocks; the norms (and biases) as float tensors
            stored = checkpoint.block_q4_1(index)
            if stored is None:
                raise UnsupportedModel(f"{checkpoint.path.name}: block {index}'s projections are not all Q4_1, so --quant q4_1 cannot serve them")
            raw = checkpoint.block_weights(index, dtype, skip=PROJECTIONS) | stored
        else:
            raw = checkpoint.block_weights(index, torch.float32 if quant else dtype)
            if quant == "int8":
                raw = equalize_inputs(raw)
        weights = {k: t if isinstance(t, tuple) else t.to(device) if quant and k in PROJECTIONS else t.to(device, dtype) for k, t in raw.items()}
        del raw
        blocks.append(Block(config, weights, quant))
        del weights
        # Hand the block's float32 scratch back to the OS now: glibc would keep it, and the scraps
        # of 30 blocks add up (int8, the default model: a loading peak of 1045 MB instead of 859).
        release_freed_memory()
        if progress:
            progress(number, end - start)
    inv_freq = rope_inv_freq(config, checkpoint.rope_freq_factors()).to(device)
    return Span(config, start, end, blocks, inv_freq)
