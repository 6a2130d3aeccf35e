"""A GGUF checkpoint: its header read by swarm/model/gguf_file.py, its tensors dequantized by `gguf.quants`.

The file is memory-mapped, so a tensor's bytes are touched only when it is dequantized.
llama.cpp stores the Q and K projections of `llama` checkpoints permuted for its
interleaved rotary layout; `_unpermute` turns them back into the HF layout our RoPE
expects. The tokenizer is built by transformers from the same file and kept
(swarm/model/tokenizer_cache.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from swarm.errors import CheckpointError, UnsupportedModel
from swarm.model.config import ModelConfig
from swarm.model.gguf_file import ArrayLength, GGUFFile
from swarm.model.weights import _BLOCK_TENSORS, Checkpoint, ModelFingerprint, _fingerprint, _unpermute


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path, tokenizer_cache: Path | None = None) -> None:
        import gguf  # imported here: only GGUF checkpoints need it

        self._gguf = gguf
        self.path = path
        self.tokenizer_cache = tokenizer_cache  # where its built tokenizer is kept (swarm/model/tokenizer_cache.py); None: not kept
        self._file = GGUFFile(path)
        self._tensors = {t.name: t for t in self._file.tensors}
        meta: dict = {}
        for key, value in self._file.metadata.items():
            if isinstance(value, ArrayLength):  # a tokenizer's vocabulary, merges, scores: only counted
                meta[f"{key}.count"] = value.length
                continue
            meta[key] = value
            if isinstance(value, list):
                meta[f"{key}.count"] = len(value)
        self.metadata = meta
        self.config = ModelConfig.from_gguf_metadata(meta, set(self._tensors))

    def _source_index(self) -> int:
        return 0

    def _has(self, source_name: str) -> bool:
        return source_name in self._tensors

    def _read(self, canonical: str, source_name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = self._tensors.get(source_name)
        if tensor is None:
            raise CheckpointError(f"{self.path.name} lacks tensor {source_name}")
        kind = tensor.tensor_type
        try:
            array = self._gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError:
            raise UnsupportedModel(f"tensor {source_name} has type {kind.name}, which we cannot dequantize") from None
        shape = tuple(reversed(tensor.shape))  # GGUF lists dims fastest-first
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
        if not array.flags.writeable:  # F32 tensors come straight from the read-only memory map
            array = array.copy()
        out = torch.from_numpy(array).to(dtype)
        if self.config.architecture == "llama" and canonical in ("wq", "bq"):
            out = _unpermute(out, self.config.num_heads)
        elif self.config.architecture == "llama" and canonical in ("wk", "bk"):
            out = _unpermute(out, self.config.num_kv_heads)
        return out

    def block_q4_1(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Block `index`'s projections as the file stores them, if all are Q4_1: for each, (nibbles
        int32 [out, in], scales and minimums float32 [out, in/32]) with w = nibble * scale + minimum
        per group of 32 inputs; None if any projection has another type (swarm/model/quant.py)."""
        self.check_span(index, index + 1)
        out = {}
        for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            tensor = self._tensors.get(_BLOCK_TENSORS[key][0].format(i=index))
            if tensor is None or tensor.tensor_type.name != "Q4_1":
                return None
            rows = tensor.shape[1]
            blocks = np.asarray(tensor.data).reshape(rows, -1, 20)  # per block of 32: d, m (float16), 16 bytes of nibbles
            scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
            minimum = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            packed = torch.from_numpy(blocks[..., 4:].copy())  # low nibbles: inputs 0-15 of the block, high: 16-31
            nibbles = torch.cat([packed & 15, packed >> 4], dim=-1).reshape(rows, -1).to(torch.int32)
            parts = (nibbles, scale, minimum)
            if self.config.architecture == "llama" and key in ("wq", "wk"):
                heads = self.config.num_heads if key == "wq" else self.config.num_kv_heads
                parts = tuple(_unpermute(part, heads) for part in parts)
            out[key] = parts
        return out

    def rope_freq_factors(self) -> torch.Tensor | None:
        if "rope_freqs.weight" not in self._tensors:
            return None
        return self._read("rope_freqs", "rope_freqs.weight", torch.float32)

    def fingerprint(self) -> ModelFingerprint:
        table = [(t.name, t.tensor_type.name, t.shape, self.path, t.data_offset, t.n_bytes) for t in self._file.tensors]
        return _fingerprint(self.config, table)

    def tokenizer(self):
        from transformers import AutoTokenizer

        from swarm.model.tokenizer_cache import cached_tokenizer

        def build():
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name, local_files_only=True)

        return cached_tokenizer(self.path, build, self.tokenizer_cache)

    def close(self) -> None:
        # Dropping the tensor table releases the memory map once no tensor view is alive.
        self._tensors = {}
        self._file.close()
