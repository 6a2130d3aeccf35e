"""What the client holds: tokenizer and chat template, embeddings, final norm and LM head."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from swarm.errors import BadRequest
from swarm.model.config import ModelConfig
from swarm.model.quant import Int8Linear, dequantize_int8


class Head:
    """Token ids -> hidden states, and hidden states -> logits. Reads no block weights."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Any, quant: str | None = None) -> None:
        """The norm and LM head run where `weights["norm"]` is; the embeddings stay where
        `weights["embed"]` is (a swarm client keeps them on the CPU, where the wire wants them).

        `quant` "int8": the LM head is an `Int8Linear` (one scale per vocabulary row, so a tied
        embedding reads its rows back from it), quantized from `weights` (give them in float32);
        norm and logits stay in the norm's dtype / float32."""
        self.config = config
        self.norm_weight = weights["norm"]  # [D]
        self.quant = None if quant in (None, "none") else quant
        matrix = weights.get("lm_head", weights["embed"]).to(self.norm_weight.device)  # [V, D]
        self.lm_head_t: torch.Tensor | None = None
        self.lm_head_q: Int8Linear | None = None
        if self.quant == "int8":
            self.lm_head_q = Int8Linear(matrix, dtype=self.norm_weight.dtype)
        elif self.quant is None:
            # [D, V]: transposed for the same matrix-vector speed as the blocks (see block.py)
            self.lm_head_t = matrix.t().contiguous()
        else:
            raise ValueError(f"unknown quantization {quant!r}")
        del matrix
        embed = weights["embed"]  # [V, D]
        # With tied embeddings in one place the rows we embed are columns of lm_head_t: keep one copy.
        self.embed_weight = None if "lm_head" not in weights and embed.device == self.device else embed.to(self.norm_weight.dtype)
        self.tokenizer = tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.norm_weight.dtype if self.lm_head_t is None else self.lm_head_t.dtype

    @property
    def device(self) -> torch.device:
        """Where the final norm and LM head run, and the logits are."""
        return self.lm_head_q.q.device if self.lm_head_t is None else self.lm_head_t.device

    @property
    def embed_device(self) -> torch.device:
        """Where `embed` puts hidden states."""
        return self.device if self.embed_weight is None else self.embed_weight.device

    @property
    def weight_bytes(self) -> int:
        """Bytes of the norm, LM head and (untied) embeddings held."""
        head = self.lm_head_t.nbytes if self.lm_head_t is not None else sum(b.nbytes for b in self.lm_head_q.buffers())
        return self.norm_weight.nbytes + head + (0 if self.embed_weight is None else self.embed_weight.nbytes)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply: the tokenizer's EOS and, for chat, its end-of-turn token."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id and token_id >= 0:
                ids.add(token_id)
        return ids

    @torch.inference_mode()
    def embed(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, D] hidden states."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.embed_device)
        if self.embed_weight is not None:
            return F.embedding(ids, self.embed_weight)
        if self.lm_head_q is not None:
            return dequantize_int8(self.lm_head_q.q[ids], self.lm_head_q.scale[ids], self.dtype)
        return self.lm_head_t[:, ids].t().contiguous()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, D] last-block outputs (on any device) -> [T, V] logits, in float32 on the head's device.

        Rows are independent: a batcher (client/head_batch.py) stacks the last rows of several
        sessions into one call, so the weights are read once for all of them."""
        h = F.rms_norm(hidden.to(self.device, self.dtype, non_blocking=True), (self.config.hidden_size,), self.norm_weight, self.config.rms_eps)
        return (h @ self.lm_head_t if self.lm_head_q is None else self.lm_head_q(h)).float()

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids for `prompt`, wrapped in the model's chat template when `chat`."""
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model has no chat template: use --no-chat")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_head(
    checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    embed_device: torch.device | str | None = None,
    quant: str | None = None,
    tokenizer: bool = True,
) -> Head:
    """The client's part of `checkpoint`: tokenizer, embeddings, final norm, LM head.

    The norm and LM head go to `device`, the embeddings to `embed_device` (default: `device`).
    `quant` "int8": an int8 LM head (and tied embeddings), see `Head`. `tokenizer` False: none
    (a process that only sees token ids, such as benchmarks/edge.py's workers).

    `progress(done, 2)` after each part: the weights, then the tokenizer (from a GGUF file,
    transformers rebuilds it from the vocabulary, which can take seconds)."""
    if progress:
        progress(0, 2)
    quant = None if quant in (None, "none") else quant
    raw = checkpoint.head_weights(torch.float32 if quant else dtype)  # int8: quantized from float32, never from dtype
    weights = {k: t.to(embed_device if k == "embed" and embed_device is not None else device) for k, t in raw.items()}
    if quant:
        weights["norm"] = weights["norm"].to(dtype)  # Head casts embeddings it keeps apart to the norm's dtype
    del raw
    head = Head(checkpoint.config, weights, None, quant)
    del weights
    if progress:
        progress(1, 2)
    head.tokenizer = checkpoint.tokenizer() if tokenizer else None
    if progress:
        progress(2, 2)
    return head
