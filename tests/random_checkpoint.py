"""Random-weight Llama-shaped checkpoints, written by transformers as safetensors.

For machines that cannot carry a real model (the accelerator box) and for shapes
the default model does not have. transformers is the reference on these too.
"""

from __future__ import annotations

from pathlib import Path


def build(directory: Path, *, layers: int = 8, hidden: int = 2048, heads: int = 32, kv_heads: int = 8, intermediate: int = 5632, vocab: int = 32000, seed: int = 0):
    """Write a random LlamaForCausalLM (TinyLlama's block shape by default) to `directory`; returns the model."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size="1GB")
    return model
