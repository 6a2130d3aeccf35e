"""Bad input to the model core gets a clear, typed error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from swarm.errors import BadSpan, CheckpointError, ModelNotFound, UnsupportedModel
from swarm.model import load_span, open_checkpoint


def test_missing_file():
    with pytest.raises(ModelNotFound, match="does not exist"):
        open_checkpoint("/nonexistent/model.gguf")


def test_unknown_alias():
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        open_checkpoint("no-such-model")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        open_checkpoint(path)


def test_non_llama_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="'gpt2' is not supported"):
        open_checkpoint(path)


@pytest.mark.parametrize("start,end", [(-1, 3), (0, 31), (29, 31), (5, 5), (7, 3)])
def test_span_outside_model(checkpoint, start, end):
    with pytest.raises(BadSpan, match=r"inside \[0, 30\)"):
        load_span(checkpoint, start, end)


def test_cli_reports_errors_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "no-such-model", "hi"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown model 'no-such-model': not a path and not an alias (aliases: smollm2-135m-instruct)"]
