"""Node limits: the per-source counter (pure), the backend's budget and queue rules, the CLI's flags."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
import torch

from node.backend import Backend
from node.limits import SourceLimit, source_key
from node.steps import BackendConfig
from swarm import wire
from swarm.errors import Busy, LengthExceeded, SessionNotFound, ShuttingDown
from swarm.model import load_span
from tests.nodes import start_nodes, stop_nodes

# --- SourceLimit (pure) ---------------------------------------------------------------


def test_a_source_at_its_limit_is_busy_and_others_are_not():
    limit = SourceLimit(2, "sessions")
    a1, a2 = limit.acquire("10.0.0.1"), limit.acquire("10.0.0.1")
    with pytest.raises(Busy, match="too many sessions from 10.0.0.1: the limit is 2"):
        limit.acquire("10.0.0.1")
    b = limit.acquire("10.0.0.2")
    assert (limit.count("10.0.0.1"), limit.count("10.0.0.2"), limit.total, len(limit)) == (2, 1, 3, 2)
    a1.release()
    limit.acquire("10.0.0.1")  # room again
    a2.release(), b.release()


def test_counts_vanish_at_zero_so_strangers_leave_nothing_behind():
    limit = SourceLimit(1, "connections")
    for n in range(1000):
        with limit.acquire(f"10.0.{n // 256}.{n % 256}"):
            pass
    assert len(limit) == 0 and limit.total == 0


def test_release_is_idempotent_per_hold():
    limit = SourceLimit(3, "forwards")
    held = limit.acquire("s")
    other = limit.acquire("s")
    held.release()
    held.release()  # a second close path must not free someone else's hold
    assert limit.count("s") == 1 and held.released and not other.released
    with other:
        pass
    assert limit.count("s") == 0
    with pytest.raises(ValueError):
        limit.release("s")  # releasing what nobody holds is our bug, loudly


def test_a_hold_is_released_when_the_block_raises():
    limit = SourceLimit(1, "forwards")
    with pytest.raises(RuntimeError), limit.acquire("s"):
        raise RuntimeError("boom")
    assert limit.count("s") == 0


def test_zero_means_no_limit_and_negative_is_refused():
    limit = SourceLimit(0, "connections")
    holds = [limit.acquire("s") for _ in range(100)]
    assert limit.count("s") == 100
    for held in holds:
        held.release()
    with pytest.raises(ValueError):
        SourceLimit(-1, "connections")


@pytest.mark.parametrize(
    "address, key",
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: the same source
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_key(address, key):
    assert source_key(address) == key


# --- the backend: budget, queue, chunks, crash (in-process, two real blocks) ---------------





@pytest.fixture(scope="module")
def span(checkpoint):
    return load_span(checkpoint, 0, 2, torch.float32)


class GatedExecutor(concurrent.futures.ThreadPoolExecutor):
    """One worker; once `close()` is called every later job waits until `open()`. `started` is set
    (on the loop) when a gated job has been handed over, so a test knows a batch is computing."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.gate = threading.Event()
        self.gate.set()
        self.started = asyncio.Event()

    def close(self) -> None:
        self.gate.clear()

    def open(self) -> None:
        self.gate.set()

    def submit(self, fn, /, *args, **kwargs):
        if not self.gate.is_set():
            self.started.set()
        gate = self.gate

        def gated():
            gate.wait()
            return fn(*args, **kwargs)

        return super().submit(gated)


def hidden(span, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


async def test_freeing_a_cache_drops_its_waiting_step_and_returns_the_budget(span):
    async with Backend(span, BackendConfig(kv_memory_bytes=2**30)) as backend:
        cache = backend.open_cache((0, 2), 16)
        assert backend.kv_used == cache.nbytes and backend.sessions == 1
        done = backend.submit(cache, (0, 2), hidden(span, 1), 0)
        backend.free_cache(cache)  # before the batcher took it
        with pytest.raises(SessionNotFound):
            await done
        assert (backend.kv_used, backend.sessions) == (0, 0)
        with pytest.raises(SessionNotFound):
            backend.submit(cache, (0, 2), hidden(span, 1), 1)  # a freed cache takes no more steps


async def test_a_cache_freed_while_its_step_computes_keeps_its_budget_until_the_compute_ends(span):
    executor = GatedExecutor()
    async with Backend(span, BackendConfig(kv_memory_bytes=2**30, inline_max_s=0.0), executor) as backend:
        cache = backend.open_cache((0, 2), 16)
        executor.close()
        done = backend.submit(cache, (0, 2), hidden(span, 1), 0)
        queued = backend.submit(cache, (0, 2), hidden(span, 1), 1)  # its next step, still waiting
        await executor.started.wait()
        backend.free_cache(cache)
        backend.free_cache(cache)  # twice: a second close path is harmless
        # the compute still writes into the cache: its memory is not free for another session yet
        assert (backend.kv_used, backend.sessions) == (cache.nbytes, 1)
        executor.open()
        for future in (done, queued):
            with pytest.raises(SessionNotFound):
                await future
        await backend.drain()
        assert (backend.kv_used, backend.sessions) == (0, 0)
    executor.shutdown()


async def test_a_dead_batcher_fails_waiting_steps_and_refuses_new_work(span, monkeypatch):
    async with Backend(span, BackendConfig()) as backend:
        cache = backend.open_cache((0, 2), 16)

        def broken():
            raise RuntimeError("a bug in the batcher")

        monkeypatch.setattr(backend, "_take_batch", broken)
        done = backend.submit(cache, (0, 2), hidden(span, 1), 0)
        with pytest.raises(ShuttingDown, match="compute loop failed"):
            await asyncio.wait_for(done, 30)  # not a hang
        await asyncio.wait_for(backend.stopped.wait(), 30)
        assert isinstance(backend.failure, ShuttingDown)
        with pytest.raises(ShuttingDown):
            backend.submit(cache, (0, 2), hidden(span, 1), 0)
        with pytest.raises(ShuttingDown):
            backend.open_cache((0, 2), 16)
        with pytest.raises(ShuttingDown):
            await backend.forward((0, 2), hidden(span, 4))


async def test_a_forward_counts_as_a_session_and_against_the_kv_budget(span):
    per_token = span.new_cache(1).nbytes
    async with Backend(span, BackendConfig(max_sessions=1, kv_memory_bytes=100 * per_token, max_forward_tokens=64)) as backend:
        cache = backend.open_cache((0, 2), 8)
        with pytest.raises(Busy, match="sessions"):
            await backend.forward((0, 2), hidden(span, 4))  # the one session slot is taken
        backend.free_cache(cache)
        out = await backend.forward((0, 2), hidden(span, 4))
        assert out.shape == (4, span.config.hidden_size)
        assert (backend.kv_used, backend.sessions, backend.forwards) == (0, 0, 0)
        with pytest.raises(LengthExceeded, match="limit of 64"):
            await backend.forward((0, 2), hidden(span, 65))
    async with Backend(span, BackendConfig(kv_memory_bytes=10 * per_token)) as backend:
        with pytest.raises(Busy, match="KV cache"):
            await backend.forward((0, 2), hidden(span, 11))


async def test_forwards_beyond_the_limit_are_busy_at_once(span):
    executor = GatedExecutor()
    async with Backend(span, BackendConfig(max_forwards=2, inline_max_s=0.0), executor) as backend:
        executor.close()
        running = [asyncio.ensure_future(backend.forward((0, 2), hidden(span, 4))) for _ in range(2)]
        await executor.started.wait()
        with pytest.raises(Busy, match="limit of 2 forwards"):
            await backend.forward((0, 2), hidden(span, 4))
        executor.open()
        await asyncio.gather(*running)
        assert backend.forwards == 0
        await backend.forward((0, 2), hidden(span, 4))  # room again
    executor.shutdown()


async def test_a_long_step_runs_in_chunks_with_the_same_output(span):
    x = hidden(span, 300)
    async with Backend(span, BackendConfig(prefill_chunk_tokens=1000)) as whole:
        reference = await whole.forward((0, 2), x)
    async with Backend(span, BackendConfig(prefill_chunk_tokens=64)) as chunked:
        out = await chunked.forward((0, 2), x)
        assert chunked.chunks_done == 4  # 4 x 64 tokens, then the last 44 ride as a small step
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


async def test_one_token_steps_go_ahead_of_a_long_prefill(span):
    async with Backend(span, BackendConfig(prefill_chunk_tokens=32, prefill_every=1000)) as backend:
        long = asyncio.ensure_future(backend.forward((0, 2), hidden(span, 640)))
        await asyncio.sleep(0)  # the forward is queued
        cache = backend.open_cache((0, 2), 64)
        for position in range(8):  # a decoding session: each step waits at most one chunk
            await backend.step(cache, (0, 2), hidden(span, 1, seed=position), position)
        assert not long.done()
        await long
        assert backend.chunks_done == 640 // 32 - 1


async def test_a_long_step_still_progresses_while_small_steps_keep_coming(span):
    async with Backend(span, BackendConfig(prefill_chunk_tokens=32, prefill_every=2, prefill_share=1.0)) as backend:
        long = asyncio.ensure_future(backend.forward((0, 2), hidden(span, 200)))
        cache = backend.open_cache((0, 2), 256)
        position = 0
        while not long.done():  # a small step is always waiting: chunks ride every other batch
            await backend.step(cache, (0, 2), hidden(span, 1, seed=position), position)
            position += 1
        await long
        assert position <= 2 * (200 // 32) + 2


# --- a real node: limits at the door, in /info, on the CLI ------------------------------------




TCP_LIMIT = 4
HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    (found,) = start_nodes(
        [["--blocks", "0:2", "--max-tcp-per-source", str(TCP_LIMIT), "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", "1",
          "--max-forwards-per-source", "1", "--max-frame", "32MiB", "--max-forward-tokens", "8192"]],
        tmp_path_factory.mktemp("limits"),
    )
    yield found
    stop_nodes([found])


def _from(source: str) -> aiohttp.ClientSession:
    """A client whose connections come from `source` (any 127/8 address is this machine's)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), limit=0))


def _hostport(node) -> tuple[str, int]:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_info_shows_every_limit(node):
    async with _from("127.0.0.2") as http, http.get(f"{node.url}/info") as response:
        limits = (await response.json())["limits"]
    assert limits["max_tcp_per_source"] == TCP_LIMIT and limits["header_timeout_s"] == HEADER_TIMEOUT_S
    assert limits["max_forwards_per_source"] == 1 and limits["max_forward_tokens"] == 8192 and limits["body_timeout_s"] == 1
    for key in ("max_sockets_per_source", "max_sessions_per_source", "socket_idle_timeout_s", "unstepped_session_grace_s", "max_sessions",
                "kv_memory_bytes", "max_forwards", "max_frame", "prefill_chunk_tokens", "prefill_share", "max_batch_tokens"):
        assert key in limits


async def test_half_sent_requests_and_idle_connections_are_cut_by_the_header_timeout(node):
    host, port = _hostport(node)
    began = time.monotonic()
    partial = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
    idle = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
    partial[1].write(b"GET /info HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    for reader, writer in (partial, idle):
        assert await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S + 20) == b""  # closed by the node
        writer.close()
    assert time.monotonic() - began >= HEADER_TIMEOUT_S * 0.9


async def test_connections_over_the_per_source_limit_are_answered_busy(node):
    host, port = _hostport(node)
    held = [await asyncio.open_connection(host, port, local_addr=("127.0.0.4", 0)) for _ in range(TCP_LIMIT)]
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.4", 0))
    answer = await asyncio.wait_for(reader.read(), 10)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503") and wire.decode(body)["code"] == "busy"
    async with _from("127.0.0.5") as http, http.get(f"{node.url}/info") as response:
        assert response.status == 200  # another source is let in meanwhile
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_a_slow_body_is_refused_in_time(node):
    host, port = _hostport(node)
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.6", 0))
    writer.write(b"POST /forward HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\nContent-Length: 1000\r\n\r\n" + b"\x00" * 10)
    answer = await asyncio.wait_for(reader.read(), 20)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and wire.decode(body)["code"] == "bad_request", answer[:200]
    writer.close()


async def test_a_body_over_the_limit_is_refused_before_it_is_read(node):
    host, port = _hostport(node)
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.7", 0))
    writer.write(b"POST /forward HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    head, body = (await asyncio.wait_for(reader.read(), 20)).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and wire.decode(body)["code"] == "frame_too_large"
    writer.close()


async def test_forwards_are_limited_per_source(node):
    async with _from("127.0.0.8") as http, http.get(f"{node.url}/info") as response:
        info = await response.json()

    def body(tokens: int) -> bytes:
        hidden = torch.randn(tokens, info["hidden_size"])
        return wire.encode({"type": "forward", "model": info["model"]["digest"], "blocks": info["span"], "hidden": wire.pack_tensor(hidden, "float32")})

    async def forward(http, data) -> tuple[int, dict]:
        async with http.post(f"{node.url}/forward", data=data, headers={"Content-Type": "application/msgpack"}) as response:
            return response.status, wire.decode(await response.read())

    async with _from("127.0.0.8") as attacker, _from("127.0.0.9") as other:
        long = asyncio.ensure_future(forward(attacker, body(8192)))
        while True:  # until the node computes it
            async with other.get(f"{node.url}/info") as response:
                if (await response.json())["forwards"]:
                    break
        status, answer = await forward(attacker, body(16))
        assert (status, answer["code"]) == (503, "busy") and "forwards from 127.0.0.8" in answer["message"]
        status, answer = await forward(other, body(16))  # another source still gets through
        assert (status, answer["type"]) == (200, "result")
        status, answer = await long
        assert status == 200 and answer["type"] == "result"
        status, answer = await forward(attacker, body(8193))
        assert (status, answer["code"]) == (400, "bad_request")  # over max_forward_tokens


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blocks", "0:2", "--device", "npu"], "error: --device 'npu' is not a device"),
        (["--blocks", "0:2", "--device", "cuda"] if not torch.cuda.is_available() else ["--blocks", "0:2", "--device", "cuda:99"], "error: --device cuda"),
        (["--no-model", "--mdns", "--mdns-interface", "192.0.2.77"], "error: --mdns-interface 192.0.2.77 is not an address of this machine"),
        (["--no-model", "--mdns", "--mdns-interface", "bogus"], "error: bad discovery option"),
    ],
)
def test_bad_device_or_interface_is_one_line_and_exit_2(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "node.cli", "--identity", str(tmp_path / "key"), *args], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_a_node_whose_batcher_died_stops_with_the_error(span, monkeypatch):
    from types import SimpleNamespace

    from node.server import _watch_compute

    async with Backend(span, BackendConfig()) as backend:
        state, stop, failure = SimpleNamespace(backend=backend), asyncio.Event(), []
        watch = asyncio.ensure_future(_watch_compute(state, stop, failure))
        monkeypatch.setattr(backend, "_take_batch", lambda: 1 / 0)
        cache = backend.open_cache((0, 2), 4)
        with pytest.raises(ShuttingDown):
            await backend.step(cache, (0, 2), hidden(span, 1), 0)
        await asyncio.wait_for(stop.wait(), 30)  # serve() then shuts down and raises failure[0]
        await watch
        assert failure == [backend.failure]
