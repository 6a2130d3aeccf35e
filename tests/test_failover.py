"""Generation survives a hop that dies (SIGKILL) or leaves (SIGTERM) mid-way, with a replica alive.

Only the lost hop's blocks move: the healthy first and last hops keep their
sessions (no second session is opened on them) and the tokens equal a run
with no failure.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections import Counter

import aiohttp
import pytest
import torch

from client.sampling import SamplingParams
from client.session import RemoteHop, RouteSession, SessionConfig, hop_of
from swarm.errors import PeerUnavailable
from swarm.model import Segment
from tests.netns import Lines
from tests.nodes import module_swarm, namespace_bootstrap, refresh, start_in_namespaces, stop_nodes

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 64


# `client` (conftest) is a float32-wire SwarmModel on this swarm. Tests run in file order
# and kill nodes as they go: each picks live ones, and every span keeps a live replica.
swarm = module_swarm("failover", ["0:10", "0:10", "10:20", "10:20", "10:20", "20:30", "20:30"])


@pytest.fixture(scope="module")
def baseline(client):
    ids = client.head.encode_prompt(PROMPT, chat=True)
    return asyncio.run(_generate(client, ids, None, {})).token_ids


async def _generate(client, ids, route, at_token: dict):
    """Generate NEW_TOKENS greedily, calling at_token[n]() once n tokens have come."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    stats = None
    async for _, stats, _ in client.stream_result(ids, params, route):
        action = at_token.pop(len(stats.token_ids), None)
        if action is not None:
            action()
    return stats


def _live(nodes, blocks):
    return [n for n in nodes if n.blocks == blocks and n.proc.poll() is None]


def _route_via(client, nodes, chosen):
    """The client's route through exactly the `chosen` nodes (one per span)."""
    asyncio.run(refresh(client))
    others = frozenset(n.peer_id for n in nodes if n not in chosen and n.blocks in {c.blocks for c in chosen})
    route = client.plan(exclude=others)
    assert route.peers == tuple(c.peer_id for c in chosen)
    return route


def _run_losing(client, nodes, baseline, lost, at_token: dict):
    """Generate along live nodes through `lost`; the failure must cost `lost`'s hop alone."""
    chosen = [lost if lost.blocks == blocks else _live(nodes, blocks)[0] for blocks in ((0, 10), (10, 20), (20, 30))]
    route = _route_via(client, nodes, chosen)
    kept = [n for n in chosen if n is not lost]
    opened = [_info(n)["sessions_opened"] for n in kept]
    stats = asyncio.run(_generate(client, client.head.encode_prompt(PROMPT, chat=True), route, at_token))
    assert stats.token_ids == baseline
    assert [f.how for f in stats.failovers] == ["splice"], stats.failovers
    assert stats.failovers[0].failed.startswith(lost.peer_id[:8])
    assert [_info(n)["sessions_opened"] for n in kept] == [o + 1 for o in opened], "healthy hops must keep their sessions"
    return stats.failovers[0]


async def test_replace_splices_a_two_hop_sub_route_after_a_refused_one(swarm, full_span, checkpoint):
    """RouteSession.replace directly: a replacement that cannot be reached fails with its hop named
    and leaves the session repairable; a two-hop replacement then carries on exactly."""
    _, nodes = swarm  # first in the module: every replica is alive
    a, b, c = (_live(nodes, blocks)[0] for blocks in ((0, 10), (10, 20), (20, 30)))
    spares = [n for n in _live(nodes, (10, 20)) if n is not b]
    x = torch.randn(12, 576, generator=torch.Generator().manual_seed(3))
    reference = full_span(x, [Segment(full_span.new_cache(12), 0, 12)])
    digest = checkpoint.fingerprint().digest
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops([a, b, c]), digest, 16, SessionConfig(wire_dtype="float32")) as session:
            await session.forward(x[:8], 0)
            for i in (8, 9):
                torch.testing.assert_close(await session.forward(x[i : i + 1], i), reference[i : i + 1], atol=5e-4, rtol=1e-4)
            nowhere = RemoteHop("http://127.0.0.1:9", 10, 20, "nowhere")
            with pytest.raises(PeerUnavailable) as refused:
                await session.replace(session.route[1], [nowhere], x[:10])
            assert refused.value.hop == nowhere
            two = [RemoteHop(spares[0].url, 10, 15, spares[0].peer_id), RemoteHop(spares[1].url, 15, 20, spares[1].peer_id)]
            await session.replace(session.route[1], two, x[:10])
            assert session.route[1:3] == two
            for i in (10, 11):
                torch.testing.assert_close(await session.forward(x[i : i + 1], i), reference[i : i + 1], atol=5e-4, rtol=1e-4)
            # A connection already closing when its reader has not yet noticed (the soak met it):
            # the write fails, and that is the first hop's loss, not an untyped error.
            first = session.hops[0]
            first.reader.cancel()
            first.ws._writer.transport.close()  # private: the only way to open this window on purpose
            with pytest.raises(PeerUnavailable) as lost:
                await session.forward(x[11:12], 12)
            assert lost.value.hop == session.route[0]


async def test_replace_before_the_first_step_rebuilds_nothing(swarm, full_span, checkpoint):
    """A hop lost during the prefill is replaced with an empty prefix: no hop is sent 0 tokens
    (the soak met `tensor holds no tokens` here), and the prefill then runs on the new route."""
    _, nodes = swarm
    a, b, c = (_live(nodes, blocks)[0] for blocks in ((0, 10), (10, 20), (20, 30)))
    spare = next(n for n in _live(nodes, (10, 20)) if n is not b)
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(4))
    reference = full_span(x, [Segment(full_span.new_cache(6), 0, 6)])
    digest = checkpoint.fingerprint().digest
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, _hops([a, b, c]), digest, 8, SessionConfig(wire_dtype="float32")) as session:
            replacement = RemoteHop(spare.url, 10, 20, spare.peer_id)
            await session.replace(session.route[1], [replacement], x[:0])
            assert session.route[1] == replacement
            torch.testing.assert_close(await session.forward(x, 0), reference[-1:], atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_middle_hop_lost_mid_generation(client, swarm, baseline, how):
    _, nodes = swarm
    middle = _live(nodes, (10, 20))[0]
    lose = middle.kill if how == "sigkill" else (lambda: middle.proc.send_signal(signal.SIGTERM))
    failover = _run_losing(client, nodes, baseline, middle, {10: lose})
    print(f"{how}: generation stalled {failover.stall_s:.3f} s")
    if how == "sigterm":  # the node said it was draining and the session moved before any step failed
        assert "draining" in failover.reason, failover
        assert middle.proc.wait(60) == 0


def test_last_hop_killed_is_replaced_from_boundary_states(client, swarm, baseline):
    """The new last hop's cache is rebuilt from the prefix run through the two healthy hops."""
    _, nodes = swarm
    last = _live(nodes, (20, 30))[0]
    failover = _run_losing(client, nodes, baseline, last, {10: last.kill})
    print(f"last hop SIGKILL: generation stalled {failover.stall_s:.3f} s")


def test_hung_first_hop_is_replaced_by_deadline_and_its_late_push_dropped(client, swarm, baseline):
    """SIGSTOP the first hop: no error comes, the step deadline fires and the hop is replaced.
    Woken 20 tokens later, it pushes its stale step to the middle hop, which must drop it
    (running it would rewind the middle hop's cache)."""
    _, nodes = swarm
    first = _live(nodes, (0, 10))[0]
    try:
        failover = _run_losing(client, nodes, baseline, first, {10: lambda: first.proc.send_signal(signal.SIGSTOP), 30: lambda: first.proc.send_signal(signal.SIGCONT)})
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert "timed out" in failover.reason
    print(f"hung first hop: generation stalled {failover.stall_s:.3f} s")


def _hops(nodes):
    return [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]


def test_cut_link_mid_generation_fails_over_by_deadline(lan_factory, tmp_path, head, full_span):
    """Pull the cable of the middle hop: no error arrives, the step deadline fires, the session moves."""
    lan = lan_factory(5)
    home, a, b1, b2, c = lan.hosts
    nodes = []
    middle = None
    try:
        first, url = namespace_bootstrap(home)  # all five start at once
        bootstrap, _, middle, spare, _ = start_in_namespaces(
            [(home, first), *((host, ["--blocks", span, "--bootstrap", url]) for host, span in ((a, "0:10"), (b1, "10:20"), (b2, "10:20"), (c, "20:30")))],
            tmp_path,
            nodes,
        )
        client = lan.run_in(home, [sys.executable, "-m", "tests.failover_client", bootstrap.url, spare.peer_id, str(NEW_TOKENS)], stderr=subprocess.STDOUT)
        lines = Lines(client.stdout)
        assert middle.peer_id[:8] in lines.expect(lambda line: line.startswith("route "), 120)
        lines.expect(lambda line: line == "token 10", 120)
        lan.link_down(b1)
        result = json.loads(lines.expect(lambda line: line.startswith("{"), 120))
        assert client.wait(30) == 0
    finally:
        if middle is not None:
            middle.kill()  # the cut-off middle node: SIGTERM would have it drain for sessions nobody can reach
        stop_nodes(nodes)
    ids = head.encode_prompt(PROMPT, chat=True)
    local = asyncio.run(_local(head, full_span, ids))
    assert result["tokens"] == local
    assert [f["how"] for f in result["failovers"]] == ["splice"], result["failovers"]
    print(f"link cut: failovers {result['failovers']}")


def _info(node) -> dict:
    with urllib.request.urlopen(f"{node.url}/info", timeout=10) as response:
        return json.load(response)


async def _local(head, span, ids):
    from client.generate import GenerationStats, LocalBlocks, stream_tokens

    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    async for _ in stream_tokens(head, LocalBlocks(span, len(ids) + NEW_TOKENS), ids, params, stats):
        pass
    return stats.token_ids


# --- pure: FailoverBlocks against a fake planner and fake sessions (no network) --------------


class _FakeSession:
    """A route that fails its next `failures` steps at its first hop, then echoes its input."""

    def __init__(self, hops, failures: int = 0) -> None:
        self.route = list(hops)
        self.failures = failures
        self.compute_ms = [1.0] * len(hops)
        self.closed = False

    def take_draining(self):
        return []

    async def forward(self, hidden, start, output="last", timeout=None):
        if self.failures:
            self.failures -= 1
            error = PeerUnavailable(f"{self.route[0]} closed the connection")
            error.hop = self.route[0]
            raise error
        return hidden

    async def replace(self, failed, hops, prefix):  # pragma: no cover - planning fails first here
        raise AssertionError("no splice expected")

    async def close(self):
        self.closed = True


class _FakePlanner:
    """Planning a sub-route fails as the view cannot be re-read (bootstrap down): a TransientError
    that names no hop. Whole routes come from `sessions`, in order."""

    def __init__(self, sessions, config) -> None:
        from swarm.errors import NoRoute

        self.config = config
        self.sessions = list(sessions)
        self.penalized: list[BaseException] = []
        self.steps: list[tuple] = []
        self.occupancy: Counter[str] = Counter()
        self._no_route = NoRoute

    async def refresh(self, http, force=False):
        raise PeerUnavailable("no bootstrap peer answered: http://127.0.0.1:1")

    def plan_hops(self, exclude, start, end):  # pragma: no cover - refresh raises first
        raise AssertionError("unreachable")

    async def open_session(self, http, max_length, route=None, exclude=frozenset(), lease=None):
        if not self.sessions:
            raise PeerUnavailable("no bootstrap peer answered: http://127.0.0.1:1")
        session = self.sessions.pop(0)
        if lease is not None:
            lease.move(h.peer_id for h in session.route)
        return session

    def lease(self):
        from client.planner import Lease

        return Lease(self.occupancy)

    def penalize(self, error):
        self.penalized.append(error)

    def readdress(self, error):  # one address per peer here: a failure is never only the address's
        return False

    def record_step(self, route, compute_ms, wall_s):
        self.steps.append((tuple(route), tuple(compute_ms), wall_s))


async def test_recover_survives_planning_that_fails_before_choosing_hops():
    """Regression: `_recover` read `hops` before assignment when `_plan_hops` raised a
    TransientError, and the UnboundLocalError killed `swarm chat`. Now it re-routes."""
    from client.failover import FailoverBlocks
    from client.planner import ClientConfig

    hops = [RemoteHop("http://127.0.0.1:9", 0, 30, "dead")]
    first, second = _FakeSession(hops, failures=1), _FakeSession([RemoteHop("http://127.0.0.1:8", 0, 30, "alive")])
    planner = _FakePlanner([first, second], ClientConfig(max_attempts=3))
    blocks = FailoverBlocks(planner, None, 16)
    await blocks.start()
    x = torch.ones(1, 4)
    assert torch.equal(await blocks.forward(x, 0), x)
    assert [f.how for f in blocks.failovers] == ["reroute"]
    assert blocks.route == ["alive[0:30)"] and blocks.exclude == {"dead"}
    assert [hop_of(e).peer_id for e in planner.penalized if hop_of(e) is not None] == ["dead"]
    await blocks.forward(x, 1)
    assert [s[0][0].peer_id for s in planner.steps] == ["alive"]  # a clean one-token step is a measurement
    assert planner.occupancy == {"alive": 1}  # the re-route moved the generation's count
    await blocks.close()
    assert first.closed and not planner.occupancy


async def test_recover_that_keeps_failing_ends_in_a_typed_error():
    """When neither a splice nor a new route can be had, the user gets NoRoute, not a crash."""
    from client.failover import FailoverBlocks
    from client.planner import ClientConfig
    from swarm.errors import NoRoute

    session = _FakeSession([RemoteHop("http://127.0.0.1:9", 0, 30, "dead")], failures=99)
    blocks = FailoverBlocks(_FakePlanner([session], ClientConfig(max_attempts=2)), None, 16)
    await blocks.start()
    with pytest.raises(NoRoute):
        await blocks.forward(torch.ones(1, 4), 0)
