"""Shared fixtures: the real default model, loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from swarm.model import DEFAULT_MODEL, load_head, load_span, open_checkpoint, resolve_model
from tests.netns import lan_factory  # noqa: F401 - the namespace tests' fixture


@pytest.fixture(scope="session")
def checkpoint():
    with open_checkpoint(DEFAULT_MODEL) as ck:
        yield ck


@pytest.fixture(scope="session")
def full_span(checkpoint):
    return load_span(checkpoint, 0, checkpoint.config.num_layers, torch.float32)


@pytest.fixture(scope="session")
def head(checkpoint):
    return load_head(checkpoint, torch.float32)


@pytest.fixture(scope="session")
def hf_model():
    """Hugging Face transformers loading the same GGUF: the reference implementation."""
    transformers = pytest.importorskip("transformers")
    path = resolve_model(DEFAULT_MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def client(swarm):
    """A float32-wire SwarmModel on the module's `swarm` (a fixture each such module defines)."""
    from tests.nodes import swarm_client

    bootstrap, _ = swarm
    return swarm_client(bootstrap.url, tls=bootstrap.url.startswith("https:"))
