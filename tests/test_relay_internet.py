"""Nodes behind NAT serve through relays: the internet in network namespaces (tests/internet.py).

inet, the internet, routes nothing between sites; the bootstrap peer and two relays live there
(the bootstrap peer offers no relaying, so the relays are R1 and R2). Nodes A [0,15) and
B [15,30) sit each in its own site behind a NAT-like firewall: nobody can dial them, not
the client, not each other, not inet. They are started with the default `--relay auto`:
each must find by itself (a dial-back with its nonce) that it cannot be dialled, pick
the relays among proven peers, and name them in its record. The client, in a third site,
then generates through both, and its text must equal the local model's:
- plainly;
- while capturing what the relays forward to and from the nodes: no plaintext hidden
  state crosses (the capture itself is shown to see plaintext);
- with the relay its first hop goes through killed mid-generation: the nodes and the
  client move to the other relay and the text is unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from client.generate import GenerationStats, LocalBlocks, stream_tokens
from client.sampling import SamplingParams
from swarm import wire
from swarm.protocol import Step
from tests.internet import Internet
from tests.netns import Lines
from tests.nodes import start_in_namespaces, stop_nodes

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 32
BOOTSTRAP_PORT, R1_PORT, R2_PORT, NODE_PORT = 7100, 7101, 7102, 7200


@dataclass(frozen=True)
class _Host:
    namespace: str
    address: str


@dataclass
class World:
    net: Internet
    bootstrap: object
    r1: object
    r2: object
    a: object
    b: object
    url: str  # the bootstrap peer's


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("internet")
    with Internet([True, True, False]) as net:
        inet = _Host(net.inet, net.public)
        url = f"https://{net.public}:{BOOTSTRAP_PORT}"
        join = ["--bootstrap", url, "--log-level", "info"]
        entries = [
            (inet, ["--no-model", "--port", str(BOOTSTRAP_PORT), "--relay-capacity", "0"]),
            (inet, ["--no-model", "--port", str(R1_PORT), *join]),
            (inet, ["--no-model", "--port", str(R2_PORT), *join]),
            (net.sites[0], ["--blocks", "0:15", "--port", str(NODE_PORT), *join]),
            (net.sites[1], ["--blocks", "15:30", "--port", str(NODE_PORT), *join]),
        ]
        started: list = []
        try:
            bootstrap, r1, r2, a, b = start_in_namespaces(entries, tmp, started, tls=True)
            for node in (a, b):  # both relays held: the record names them
                _until_output(node, lambda out: out.count("relayed through") >= 2, 90)
            yield World(net, bootstrap, r1, r2, a, b, url)
        finally:
            stop_nodes(started)


@pytest.fixture(scope="module")
def baseline(head, full_span):
    ids = head.encode_prompt(PROMPT, chat=True)
    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

    async def run():
        async for _ in stream_tokens(head, LocalBlocks(full_span, len(ids) + NEW_TOKENS), ids, params, stats):
            pass

    import asyncio

    asyncio.run(run())
    return stats.token_ids


def _until_output(node, done, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not done("".join(node.output)):
        if time.monotonic() > deadline:
            raise TimeoutError("".join(node.output[-30:]))
        time.sleep(0.1)


def _connects(net: Internet, namespace: str, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=3).close()"
    return net.run(namespace, [sys.executable, "-c", code]).returncode == 0


def _client(world: World, wait_at: int = -1) -> tuple[subprocess.Popen, Lines]:
    client = world.net.start(world.net.sites[2].namespace, [sys.executable, "-m", "tests.relay_client", world.url, str(NEW_TOKENS), str(wait_at)], stdin=subprocess.PIPE, stderr=subprocess.STDOUT)
    return client, Lines(client.stdout)


def _result(lines: Lines) -> dict:
    return json.loads(lines.expect(lambda line: line.startswith("{"), 240))


# --- the internet as built -----------------------------------------------------------------------


def test_nobody_can_dial_a_node_behind_nat(world):
    net, a, b = world.net, world.net.sites[0], world.net.sites[1]
    client = net.sites[2].namespace
    assert not _connects(net, client, a.address, NODE_PORT), "the client dialled a node behind NAT"
    assert not _connects(net, net.inet, a.address, NODE_PORT), "inet dialled a node behind NAT"
    assert not _connects(net, b.namespace, a.address, NODE_PORT), "one site dialled another"
    assert not _connects(net, client, net.public.rsplit(".", 1)[0] + ".5", 22), "inet forwarded to a site"
    assert _connects(net, a.namespace, net.public, R1_PORT), "a node behind NAT reaches the internet"


def test_nodes_found_themselves_undialable_and_chose_both_relays(world):
    for node in (world.a, world.b):
        out = "".join(node.output)
        assert "dial-back check: not dialable" in out
        assert world.r1.peer_id in out and world.r2.peer_id in out, "auto mode picked the two relays"
    for relay in (world.r1, world.r2):
        assert "dial-back check: dialable" in "".join(relay.output)


def _probe(world: World, site: int, count: int) -> dict:
    site_ = world.net.sites[site]
    done = world.net.run(site_.namespace, [sys.executable, "-m", "tests.reach_probe", world.url, site_.address, "7300", str(count)])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_dial_back_goes_only_to_the_address_that_asked_and_a_flood_gets_busy(world):
    """The client's site (not behind NAT) asks the bootstrap peer for 8 dial-backs: the checker
    dials back only the asking address (nothing in the request can name another), 6 a minute;
    then busy. Another source's check is still answered."""
    seen = _probe(world, 2, 8)
    asker = world.net.sites[2].address
    assert seen["statuses"] == [200] * 6 + [503] * 2
    assert set(seen["observed"]) == {f"https://{asker}:7300"}
    assert len(seen["dialled_back_from"]) == 6, "one dial-back per check answered, none for the refused"
    other = _probe(world, 0, 1)  # behind NAT: answered (not dialable), not refused
    assert other["statuses"] == [200] and other["dialled_back_from"] == []


# --- generating through them ------------------------------------------------------------------


def _windows(data: bytes, size: int = 16) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


def _plaintext_in(stream: bytes, rows: bytes) -> list[str]:
    """What of a plaintext step frame `stream` holds: its msgpack field names (short strings are
    0xa0 | length, then the bytes), or 16-byte windows of `rows`."""
    found = [name for name in ("hidden", "session", "position") if bytes([0xA0 | len(name)]) + name.encode() in stream]
    found += [f"row bytes at {i * 16}" for i, window in enumerate(_windows(rows)) if window in stream]
    return found


def test_generation_through_relayed_nodes_equals_the_local_text_and_the_relays_see_only_ciphertext(world, baseline, head, tmp_path):
    net = world.net
    out = tmp_path / "capture.json"
    capture = net.start(net.inet, [sys.executable, "-m", "tests.capture", str(out), net.sites[0].link, net.sites[1].link], stdin=subprocess.PIPE)
    Lines(capture.stdout).expect(lambda line: line == "ready", 30)
    # The positive control: plaintext sent from a node's site crosses the captured link.
    marker = b"PLAINTEXT-MARKER-layerswarm-0123456789"
    net.run(net.sites[0].namespace, [sys.executable, "-c", f"import socket; s=socket.create_connection(({net.public!r}, {BOOTSTRAP_PORT})); s.sendall({marker!r}); s.close()"], check=True)
    client, lines = _client(world)
    result = _result(lines)
    capture.stdin.close()
    assert capture.wait(30) == 0
    assert result["tokens"] == baseline
    assert not result["failovers"]
    relays = {f"https://{net.public}:{R1_PORT}", f"https://{net.public}:{R2_PORT}"}
    assert {hop.split("@", 1)[1] for hop in result["hops"]} <= relays, "every hop is reached through a relay"

    flows = {flow: bytes.fromhex(data) for flow, data in json.loads(out.read_text()).items()}
    everything = b"".join(flows.values())
    assert marker in everything, "the capture must see plaintext that crosses these links"
    ids = head.encode_prompt(PROMPT, chat=True)
    rows = head.embed(ids).to(torch.float32).contiguous().view(torch.uint8).numpy().tobytes()  # the first hop's input, as the float32 wire carries it
    assert len(everything) > len(rows), "the prefill's frame crossed a captured link"
    plain = wire.encode(Step("s" * 16, 0, 0, head.embed(ids).to(torch.float32), "float32").to_wire())
    assert _plaintext_in(plain, rows), "the search finds a plaintext step frame"
    for flow, data in flows.items():
        assert not _plaintext_in(data, rows), f"plaintext in {flow}"


def test_a_relay_killed_mid_generation_the_nodes_move_and_the_text_stays(world, baseline):
    client, lines = _client(world, wait_at=8)
    route = lines.expect(lambda line: line.startswith("route "), 240)
    lines.expect(lambda line: line == "waiting", 240)
    first = route.split()[1].split("@", 1)[1]
    dead, alive = (world.r1, world.r2) if first.endswith(f":{R1_PORT}") else (world.r2, world.r1)
    dead.kill()
    client.stdin.write("go\n")
    client.stdin.flush()
    result = _result(lines)
    assert result["tokens"] == baseline
    assert result["failovers"], "the relay's death was noticed"
    assert all(hop.split("@", 1)[1].endswith(f":{R2_PORT if dead is world.r1 else R1_PORT}") for hop in result["hops"]), result["hops"]
    for node in (world.a, world.b):
        _until_output(node, lambda out: f"lost relay {dead.peer_id}" in out, 30)
