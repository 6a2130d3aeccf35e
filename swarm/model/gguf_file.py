"""A GGUF file's metadata and tensor table, read in milliseconds.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array: for a
tokenizer of 49,152 tokens and as many merges that is about 3.5 s of a node's or client's
start (measured with py-spy on the default model), spent on arrays we only count. Here the
header is walked with `struct` over a memory map: scalars and strings are decoded, arrays
are decoded only when short (`MAX_DECODED_ARRAY`), longer ones are stepped over and kept as
their length. Tensor data stays in the memory map, as numpy views shaped as
`gguf.quants.dequantize` wants them (what GGUFReader gives). The tokenizer itself is built
by transformers from the same file (and cached: swarm/model/tokenizer_cache.py).

Only little-endian GGUF versions 2 and 3 are read; anything malformed (a truncation, a
length past the end, an unknown type) raises `CheckpointError`, never a numpy or struct
error.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from swarm.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DECODED_ARRAY = 1024  # longer metadata arrays (a tokenizer's vocabulary) are stepped over, kept as their length
MAX_DIMS = 8

# GGUF metadata value types -> struct format of one value (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_PLAIN = {  # tensor types stored as plain numbers: their numpy dtype (others are blocks of bytes)
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class ArrayLength:
    """A metadata array too long to decode: how many elements it has."""

    length: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as the file lists dims: fastest-varying first
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # read-only view into the memory map (bytes per row for block types)


class GGUFFile:
    """`metadata` (key -> value, `ArrayLength` for long arrays) and `tensors` of one GGUF file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from None
        self._offset = 0
        try:
            self.metadata, self.tensors = self._read()
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError) as exc:
            raise CheckpointError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from None
        finally:
            self._map.close()  # the header is read; tensors view the file through their own numpy map

    def _read(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        if self._bytes(4) != MAGIC:
            raise ValueError("no GGUF magic")
        version = self._unpack("<I")
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} (read: {VERSIONS}, little-endian)")
        tensor_count, kv_count = self._unpack("<Q"), self._unpack("<Q")
        size = len(self._map)
        if tensor_count > size or kv_count > size:  # each needs at least a byte: a count past that is garbage
            raise ValueError("counts larger than the file")
        metadata = {}
        for _ in range(kv_count):
            key = self._string()
            metadata[key] = self._value(self._unpack("<I"))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment!r} is not a power of two")
        start = -(-self._offset // alignment) * alignment
        data = np.memmap(self.path, mode="r") if infos else np.empty(0, np.uint8)
        tensors, names = [], set()
        for name, dims, kind, relative in infos:
            if name in names:
                raise ValueError(f"tensor {name} appears twice")
            names.add(name)
            tensors.append(_tensor(data, name, dims, kind, start + relative))
        return metadata, tensors

    def _bytes(self, n: int) -> bytes:
        end = self._offset + n
        if n < 0 or end > len(self._map):
            raise ValueError(f"{n} bytes at {self._offset} run past the end of the file")
        out = self._map[self._offset : end]
        self._offset = end
        return out

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._bytes(self._unpack("<Q")).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        element, length = self._unpack("<I"), self._unpack("<Q")
        if length <= MAX_DECODED_ARRAY:
            if element == _ARRAY:
                raise ValueError("nested metadata arrays")
            return [self._value(element) for _ in range(length)]
        if element in _SCALARS:
            self._bytes(length * struct.calcsize(_SCALARS[element]))
        elif element == _STRING:
            for _ in range(length):
                self._bytes(self._unpack("<Q"))
        else:
            raise ValueError(f"a long metadata array of type {element}")
        return ArrayLength(length)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        n_dims = self._unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(self._unpack("<Q") for _ in range(n_dims))
        kind = GGMLQuantizationType(self._unpack("<I"))
        return name, dims, kind, self._unpack("<Q")

    def close(self) -> None:
        self.tensors = []  # the numpy map goes once no tensor view is alive


def _tensor(data: np.ndarray, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType, offset: int) -> GGUFTensor:
    elements = int(np.prod(dims, dtype=np.uint64))
    block, type_size = GGML_QUANT_SIZES[kind]
    if elements % block:
        raise ValueError(f"tensor {name}: {elements} elements do not fill blocks of {block}")
    n_bytes = elements * type_size // block
    if offset + n_bytes > len(data):
        raise ValueError(f"tensor {name} runs past the end of the file")
    shape = tuple(reversed(dims))  # slowest-varying first, as numpy
    dtype = _PLAIN.get(kind)
    if dtype is None:
        view = data[offset : offset + n_bytes].reshape(quant_shape_to_byte_shape(shape, kind))
    else:
        view = data[offset : offset + n_bytes].view(dtype).reshape(shape)
    return GGUFTensor(name, kind, dims, n_bytes, offset, view)
