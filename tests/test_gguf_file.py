"""Our GGUF header reader (swarm/model/gguf_file.py) against gguf-py's own `GGUFReader`.

The same metadata and tensor table of the default model (every field, every tensor's type,
shape, offset and bytes), files written by gguf-py's `GGUFWriter` with every metadata type,
and typed errors for every truncation and for garbage in the header."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import CheckpointError
from swarm.model import DEFAULT_MODEL
from swarm.model.gguf_file import MAX_DECODED_ARRAY, ArrayLength, GGUFFile
from swarm.model.weights import resolve_model


def _same(ours: GGUFFile, reference: gguf.GGUFReader) -> None:
    fields = {key: field for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        if isinstance(value, ArrayLength):
            assert value.length == len(field.data) > MAX_DECODED_ARRAY, key
        else:
            assert value == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert (mine.tensor_type, mine.shape, mine.n_bytes, mine.data_offset) == (
            theirs.tensor_type,
            tuple(theirs.shape.tolist()),
            theirs.n_bytes,
            theirs.data_offset,
        ), mine.name
        assert mine.data.shape == theirs.data.shape and mine.data.dtype == theirs.data.dtype, mine.name
        assert np.array_equal(np.asarray(mine.data), np.asarray(theirs.data)), mine.name


def test_the_default_model_reads_as_gguf_py_reads_it():
    path = resolve_model(DEFAULT_MODEL)
    ours = GGUFFile(path)
    _same(ours, gguf.GGUFReader(path))
    assert isinstance(ours.metadata["tokenizer.ggml.tokens"], ArrayLength)  # 49152 strings, stepped over
    assert ours.metadata["general.architecture"] == "llama"


def _written(path, long_array: bool = True) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "blocks ✓")
    writer.add_array("t.short", [1, 2, 3])
    writer.add_array("t.words", ["a", "bc", ""])
    if long_array:
        writer.add_array("t.long_words", [f"w{i}" for i in range(MAX_DECODED_ARRAY + 5)])
        writer.add_array("t.long_numbers", list(range(MAX_DECODED_ARRAY * 3)))
    writer.add_tensor("f32", np.arange(24, dtype=np.float32).reshape(4, 6))
    writer.add_tensor("f16", np.ones((2, 64), dtype=np.float16))
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_metadata_type_and_tensor_kind_reads_as_gguf_py_reads_it(tmp_path):
    path = tmp_path / "all.gguf"
    _written(path)
    ours = GGUFFile(path)
    _same(ours, gguf.GGUFReader(path))
    assert ours.metadata["t.long_words"] == ArrayLength(MAX_DECODED_ARRAY + 5)
    assert ours.metadata["t.words"] == ["a", "bc", ""] and ours.metadata["t.str"] == "blocks ✓"
    q8 = next(t for t in ours.tensors if t.name == "q8")
    assert np.allclose(gguf.quants.dequantize(q8.data, q8.tensor_type), np.linspace(-1, 1, 128).reshape(2, 64), atol=0.01)


def test_every_truncation_is_a_checkpoint_error(tmp_path):
    whole = tmp_path / "whole.gguf"
    _written(whole, long_array=False)
    data = whole.read_bytes()
    needed = max(t.data_offset + t.n_bytes for t in GGUFFile(whole).tensors)  # the rest is padding
    cut = tmp_path / "cut.gguf"
    for end in [*range(0, 400), *range(400, needed, 7)]:
        cut.write_bytes(data[:end])
        with pytest.raises(CheckpointError, match="not a readable GGUF"):
            GGUFFile(cut)


@settings(max_examples=300, deadline=None)
@given(at=st.integers(min_value=4, max_value=300), junk=st.binary(min_size=1, max_size=16))
def test_garbage_in_the_header_is_a_checkpoint_error_or_reads(tmp_path_factory, at, junk):
    """Overwritten header bytes never raise anything but CheckpointError."""
    folder = tmp_path_factory.mktemp("junk")
    whole = folder / "whole.gguf"
    _written(whole, long_array=False)
    data = bytearray(whole.read_bytes())
    data[at : at + len(junk)] = junk
    mangled = folder / "mangled.gguf"
    mangled.write_bytes(bytes(data))
    try:
        GGUFFile(mangled)
    except CheckpointError:
        pass
