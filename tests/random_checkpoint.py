"""Random-weight Llama-shaped checkpoints, written by transformers as safetensors.

For machines that cannot carry a real model (the accelerator box) and for shapes
the default model does not have. transformers is the reference on these too.

`write_standin_tokenizer` gives such a directory a word-level tokenizer with a chat
template, so the client side (`checkpoint.tokenizer()`, SwarmModel, LocalModel)
loads it. It is a STAND-IN: its words are made up, fine for speed and for comparing
hidden states, meaningless as text.
"""

from __future__ import annotations

import json
from pathlib import Path

# Llama 3's special tokens, so Head.eos_token_ids finds <|eot_id|> as it would in the real model.
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>")
# Words of the benchmarks' prompts and some common ones, so prompts encode to words rather than <unk>.
_WORDS = (
    "the a an of to and in is was for on with as by at from it that this be are or not you i he she we they "
    "write long story about dragon who learns cook count tell me what capital france hello world please "
    "user assistant system one two three four five six seven eight nine ten . , ! ? : ; ' \""
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|> "
    "{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
)
STANDIN_NOTE = "stand-in word-level tokenizer (layerswarm tests/random_checkpoint.py): made-up words, for speed runs only"


def build(directory: Path, *, layers: int = 8, hidden: int = 2048, heads: int = 32, kv_heads: int = 8, intermediate: int = 5632, vocab: int = 32000, seed: int = 0, tokenizer: bool = False):
    """Write a random LlamaForCausalLM (TinyLlama's block shape by default) to `directory`; returns the model.

    `tokenizer`: also write the stand-in tokenizer (needed by SwarmModel / LocalModel, not by spans)."""
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
    if tokenizer:
        write_standin_tokenizer(directory, vocab, 4096)
    return model


def write_standin_tokenizer(directory: Path, vocab_size: int, max_length: int) -> None:
    """A word-level tokenizer of exactly `vocab_size` ids (specials, common words, then `w<n>` fillers)
    with a Llama-3-like chat template, saved so `AutoTokenizer.from_pretrained(directory)` loads it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(_WORDS)]
    if vocab_size < len(words):
        raise ValueError(f"a stand-in tokenizer needs a vocabulary of at least {len(words)}, not {vocab_size}")
    words += [f"w{n}" for n in range(vocab_size - len(words))]
    vocab = {word: index for index, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="<unk>",
        pad_token="<|end_of_text|>",
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(directory))
    (Path(directory) / "STANDIN_TOKENIZER.txt").write_text(STANDIN_NOTE + "\n")
    # transformers' generate reads the ids from here; we keep them beside the config's
    generation = {"bos_token_id": vocab["<|begin_of_text|>"], "eos_token_id": vocab["<|eot_id|>"], "pad_token_id": vocab["<|end_of_text|>"]}
    (Path(directory) / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
