"""The per-block functions of the decode engine (swarm/model/engine.py), written for its static
buffers: weights come in as arguments, so one compiled function serves every block of a span.

`decode_block`: one token for each of slots [0, B), each at its own position, attending over
its slot's first Lb positions (a batch of sessions). `verify_block`: T tokens of one session in
one slot at consecutive positions, attending causally (a speculative step). Both write their keys
and values into the pool before attending, so a row sees its own key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swarm.model.block import Block, Linear, apply_rope
from swarm.model.quant import Int8Linear, int8_linear


def verify_block(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
    wqkv, wo, w_gate_up, w_down, bqkv: torch.Tensor | None, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float,
) -> torch.Tensor:
    """One block for T rows of the session in `slot` ([1]): x [T, D] at positions `pos` [T];
    `visible` [T, Lb]. The slot is a tensor, so one graph serves a session wherever it sits."""
    rows, hidden, length = x.shape[0], x.shape[1], visible.shape[-1]
    q_size, kv_size, group = heads * head_dim, kv_heads * head_dim, heads // kv_heads
    h = F.rms_norm(x, (hidden,), attn_norm, eps)
    qkv = _linear(h, wqkv, bqkv)
    qk = apply_rope(qkv[:, : q_size + kv_size].view(rows, heads + kv_heads, head_dim), cos, sin)
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, q_size + kv_size :].view(rows, kv_heads, head_dim)
    at = slot.expand(rows)
    k_pool[at, :, pos] = k  # [T, KV, hd] into the slot at each row's position
    v_pool[at, :, pos] = v
    keys, values = k_pool[slot, :, :length][0], v_pool[slot, :, :length][0]  # [KV, Lb, hd]: a copy of Lb positions
    qg = q.view(rows, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(kv_heads, group * rows, head_dim)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible.repeat(group, 1))  # [KV, group*T, hd]
    out = out.view(kv_heads, group, rows, head_dim).permute(2, 0, 1, 3).reshape(rows, q_size)
    x = x + _linear(out, wo)
    h = F.rms_norm(x, (hidden,), mlp_norm, eps)
    gate, up = _linear(h, w_gate_up).chunk(2, dim=-1)
    return x + _linear(F.silu(gate) * up, w_down)


def block_tensors(block: Block) -> tuple:
    """The weights `decode_block` takes, as plain tensors (one compiled function serves every block)."""
    return (*(_weight(m) for m in (block.wqkv, block.wo, block.w_gate_up, block.w_down)), block.wqkv.bias, block.attn_norm, block.mlp_norm)


def _weight(linear: Linear | Int8Linear):
    """What `_linear` takes for one projection: a tensor, an int8 (values, scales) pair (cast inside
    the compiled function, where the cast fuses into the matmul), or the module itself where only it
    can read its weights (oneDNN-packed or int8pack CPU weights; the engine is not compiled there)."""
    if isinstance(linear, Int8Linear):
        return linear if linear.cpu_kernel else (linear.q, linear.scale)
    return linear if linear.packed else linear.weight


def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A weight tensor, an int8 (values, scales) pair, or a module holding packed CPU weights (which applies its own bias)."""
    if isinstance(weight, tuple):
        y = int8_linear(x, *weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else weight(x)


def decode_block(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
    wqkv, wo, w_gate_up, w_down, bqkv: torch.Tensor | None, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float, attention: str,
) -> torch.Tensor:
    """One block for one token in each of slots [0, B): x [B, D]; k_pool/v_pool [slots, KV, L+1, hd];
    `visible` [B, 1, 1, Lb] the positions each row attends to."""
    batch, hidden, length = x.shape[0], x.shape[1], visible.shape[-1]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    h = F.rms_norm(x, (hidden,), attn_norm, eps)
    qkv = _linear(h, wqkv, bqkv)  # [B, q + 2kv]
    qk = apply_rope(qkv[:, : q_size + kv_size].view(batch, heads + kv_heads, head_dim), cos, sin)
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, q_size + kv_size :].view(batch, kv_heads, head_dim)
    k_pool[rows, :, pos] = k  # [B, KV, hd] into each slot at its position
    v_pool[rows, :, pos] = v
    keys, values = k_pool[:batch, :, :length], v_pool[:batch, :, :length]  # views: [B, KV, Lb, hd]
    # The query heads sharing a KV head act as that head's query rows: [B, KV, group, hd].
    qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    if attention == "sdpa":
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible)
    else:
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (head_dim**-0.5)
        out = torch.matmul(scores.masked_fill(~visible, float("-inf")).softmax(-1).to(x.dtype), values)
    x = x + _linear(out.reshape(batch, q_size), wo)
    h = F.rms_norm(x, (hidden,), mlp_norm, eps)
    gate, up = _linear(h, w_gate_up).chunk(2, dim=-1)
    return x + _linear(F.silu(gate) * up, w_down)
