"""Checkpoint formats other than the default GGUF, built here as tiny random models.

transformers writes them (safetensors, one file or sharded with an index) and is
the reference for the logits; this covers Llama with llama3 rope scaling and
untied LM head, Qwen2 (q/k/v bias) and Mistral.
"""

from __future__ import annotations

import json

import pytest
import torch

from swarm.model import Segment, load_span, open_checkpoint
from swarm.model.block import rope_inv_freq
from swarm.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
CASES = {
    "llama3": (
        transformers.LlamaConfig,
        dict(
            TINY,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "qwen2": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(TINY, sliding_window=None)),
}


def _save(tmp_path, name: str, shard: bool):
    config_cls, kwargs = CASES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs)).eval()
    directory = tmp_path / name
    model.save_pretrained(directory, max_shard_size="100KB" if shard else "10GB")
    return model, directory


@pytest.mark.parametrize("name,shard", [("llama3", True), ("qwen2", False), ("mistral", True)])
def test_safetensors_logits_match_transformers(tmp_path, name, shard):
    model, directory = _save(tmp_path, name, shard)
    assert (directory / "model.safetensors.index.json").is_file() == shard
    ids = list(range(3, 40))
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    with open_checkpoint(directory) as ck:
        head = _head_without_tokenizer(ck)
        hidden = head.embed(ids)
        for start, end in [(0, 1), (1, 4)]:
            span = load_span(ck, start, end)
            hidden = span(hidden, [Segment(span.new_cache(len(ids)), 0, len(ids))])
    torch.testing.assert_close(head.logits(hidden), reference, atol=1e-4, rtol=1e-4)


def _head_without_tokenizer(ck):
    """These random checkpoints have no tokenizer; the head's tensors are what is under test."""
    from swarm.model.head import Head

    return Head(ck.config, ck.head_weights(torch.float32), tokenizer=None)


def test_llama3_inv_freq_matches_transformers():
    _, kwargs = CASES["llama3"]
    config = transformers.LlamaConfig(**kwargs)
    ours = rope_inv_freq(ModelConfig.from_hf_config(config.to_dict()))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(ours, reference.float())


def test_config_reads_qwen2_bias_and_ties():
    _, kwargs = CASES["qwen2"]
    config = ModelConfig.from_hf_config(transformers.Qwen2Config(**kwargs).to_dict())
    assert config.qkv_bias and config.tie_embeddings and config.num_kv_heads == 2


def test_fingerprint_tells_checkpoints_apart(tmp_path):
    _, a = _save(tmp_path / "a", "qwen2", shard=False)
    _, b = _save(tmp_path / "b", "qwen2", shard=False)
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert ca.fingerprint() == cb.fingerprint()  # same seed, same weights
    # Change one weight of b slightly: a different checkpoint.
    from safetensors.torch import load_file, save_file

    path = b / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert ca.fingerprint() != cb.fingerprint()
        assert ca.fingerprint().shape == cb.fingerprint().shape


def test_unsupported_hf_architecture(tmp_path):
    from swarm.errors import UnsupportedModel

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        open_checkpoint(tmp_path)


def test_shape_mismatch_is_a_checkpoint_error(tmp_path):
    from swarm.errors import CheckpointError

    _, directory = _save(tmp_path, "qwen2", shard=False)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96  # lie about the MLP width
    (directory / "config.json").write_text(json.dumps(config))
    with open_checkpoint(directory) as ck, pytest.raises(CheckpointError, match="w_gate"):
        load_span(ck, 0, 1)
