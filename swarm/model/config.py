"""The shape of a Llama-family model, read from GGUF metadata or an HF `config.json`.

One dataclass covers Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2
(q/k/v bias), SmolLM2 and TinyLlama: they differ only in sizes, rope settings,
biases and whether the LM head is tied to the embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from swarm.errors import CheckpointError, UnsupportedModel

# HF `model_type` / GGUF `general.architecture` values we can run with our block.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1+). Absent for plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position: int = 4096
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_params(self) -> int:
        """Parameters of one transformer block (weights only, biases included)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        bias = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + bias + mlp + 2 * self.hidden_size

    def kv_bytes_per_token(self, num_blocks: int, element_size: int) -> int:
        """KV cache bytes one token takes in `num_blocks` blocks."""
        return 2 * num_blocks * self.kv_size * element_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """From the dict in an HF `config.json`."""
        arch = raw.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        # transformers >= 5 moved rope settings into `rope_parameters`.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise UnsupportedModel(f"rope scaling {rope_type!r} is not supported")
        try:
            return cls(
                architecture=arch,
                num_layers=int(raw["num_hidden_layers"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_heads=int(raw["num_attention_heads"]),
                num_kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
                vocab_size=int(raw["vocab_size"]),
                head_dim=int(raw.get("head_dim") or 0),
                rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position=int(raw.get("max_position_embeddings", 4096)),
                qkv_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
                tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks {missing}") from None

    @classmethod
    def from_hf_dir(cls, directory: Path) -> ModelConfig:
        path = directory / "config.json"
        try:
            return cls.from_hf_config(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{directory} has no config.json") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """From GGUF key/value metadata (keys under `{arch}.`) and the names of its tensors."""
        arch = meta.get("general.architecture", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
            return value

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens.count")
        if vocab is None:
            raise CheckpointError("GGUF metadata gives no vocabulary size")
        scaling = None
        # llama.cpp stores llama3 scaling as precomputed per-frequency factors in a tensor;
        # the weights module applies it. Older files may carry linear scaling, which we refuse.
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            raise UnsupportedModel(f"GGUF rope scaling {scaling_type!r} is not supported")
        return cls(
            architecture=arch,
            num_layers=int(get("block_count")),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            vocab_size=int(vocab),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or 0),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position=int(get("context_length", 4096)),
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
        )
