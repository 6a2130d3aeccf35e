"""mDNS discovery: on loopback in one process, forged records, and across network namespaces.

Loopback tests bind zeroconf to 127.0.0.1 only (no `ip link set lo multicast on` needed
on Linux). Other tests on this machine may advertise on loopback too, so assertions only
ever look at the peers a test made itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from netns import Lan, Lines, lan_factory  # noqa: F401  (lan_factory is a fixture)
from zeroconf.asyncio import AsyncServiceInfo

from swarm.discovery.mdns import SERVICE_TYPE, Advert, Mdns, MdnsConfig, _candidate_urls
from swarm.identity import Identity
from swarm.peers import PeerTable
from swarm.records import PeerRecord
from swarm.transport import Transport

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).with_name("mdns_peer.py")
MODEL = {"architecture": "llama", "shape": "L30-d576", "digest": "0123456789abcdef" * 2}
POLL_S = 0.02
PLAIN = Transport(insecure_http=True)  # these stand-in nodes serve plain http (TLS browsing: tests/test_tls.py)

# Fast settings for tests: a crashed advertiser leaves a browser's table within
# ttl + sweep + probe = 4 + 1 + 1 = 6 s.
ADVERTISE = MdnsConfig(interfaces=[LOOPBACK], browse=False, ttl_s=4)
BROWSE = MdnsConfig(interfaces=[LOOPBACK], advertise=False, ttl_s=4, sweep_interval_s=1.0, probe_timeout_ms=1000)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` holds; fails the test after `timeout` s."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - start


@dataclass
class InfoServer:
    """A stand-in node: serves whatever record `body` holds at GET /info."""

    port: int
    body: dict[str, str]

    def serve(self, record: PeerRecord) -> None:
        self.body.clear()
        self.body.update({"peer_id": record.peer_id, "record": base64.b64encode(record.to_bytes()).decode()})


@asynccontextmanager
async def info_server() -> AsyncIterator[InfoServer]:
    body: dict[str, str] = {}

    async def info(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield InfoServer(runner.addresses[0][1], body)
    finally:
        await runner.cleanup()


def signed(identity: Identity, port: int, *, now: float | None = None, span: tuple[int, int] = (0, 10)) -> PeerRecord:
    return PeerRecord.create(
        identity,
        addresses=[f"http://{LOOPBACK}:{port}"],
        now=time.time() if now is None else now,
        ttl=60.0,
        model=MODEL,
        num_layers=30,
        span=span,
    )


# --- pure parts -----------------------------------------------------------------------


def test_config_checks_interfaces_and_ttl() -> None:
    assert MdnsConfig(interfaces=["127.0.0.1", "10.1.2.3"]).interfaces == ("127.0.0.1", "10.1.2.3")
    assert BROWSE.removal_bound_s == 6.0
    bad: list[dict[str, Any]] = [{"interfaces": "eth0"}, {"interfaces": ["not-an-ip"]}, {"interfaces": []}, {"ttl_s": 0}]
    for fields in bad:
        with pytest.raises(ValueError):
            MdnsConfig(**fields)


def test_advert_txt_is_small_and_checked() -> None:
    peer_id = Identity.generate().peer_id
    txt = Advert(peer_id, 8080, model="smollm2-135m", span=(3, 7)).txt()
    assert txt == {b"id": peer_id.encode(), b"model": b"smollm2-135m", b"span": b"3:7", b"port": b"8080", b"v": b"1", b"s": b"https"}
    assert sum(len(k) + len(v) for k, v in txt.items()) < 200
    for bad in ({"peer_id": "nope"}, {"port": 0}, {"model": "x" * 65}, {"span": (5, 5)}, {"addresses": ("host",)}, {"scheme": "ftp"}):
        with pytest.raises(ValueError):
            Advert(**{"peer_id": peer_id, "port": 1, **bad})  # type: ignore[arg-type]


def test_candidate_urls_prefer_ipv4_and_skip_link_local() -> None:
    addresses = ["fe80::1", "169.254.3.4", "127.0.0.1", "2001:db8::5", "192.168.1.9"]
    info = AsyncServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=7000, parsed_addresses=addresses)
    assert _candidate_urls(info) == ["http://192.168.1.9:7000", "http://127.0.0.1:7000", "http://[2001:db8::5]:7000"]
    only_link_local = AsyncServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=7000, parsed_addresses=["169.254.3.4"])
    assert _candidate_urls(only_link_local) == ["http://169.254.3.4:7000"]


# --- loopback, one process --------------------------------------------------------------


async def test_discovers_updates_and_removes_on_goodbye() -> None:
    alice = Identity.generate()
    table = PeerTable()
    async with info_server() as server, Mdns(BROWSE, table=table, transport=PLAIN) as browser:
        first = signed(alice, server.port)
        server.serve(first)
        advert = Advert(alice.peer_id, server.port, model="smol", span=(0, 10), scheme="http")
        entered = time.monotonic()
        async with Mdns(ADVERTISE, advert=advert) as advertiser:
            await wait_until(lambda: alice.peer_id in table, 10, "discovery")
            found = time.monotonic() - entered
            assert table.get(alice.peer_id) == first

            # A new span: the node signs a new record and announces new TXT; browsers fetch it.
            second = signed(alice, server.port, now=first.issued_at + 1, span=(10, 20))
            server.serve(second)
            await advertiser.update(replace(advert, span=(10, 20)))
            await wait_until(lambda: table.get(alice.peer_id) == second, 5, "update")

            # Records of 4 s outlive their TTL in the browser's cache, because the advertiser
            # re-broadcasts them: its sweeps never had to ask the network.
            probes = browser.stats["probes"]
            await asyncio.sleep(1.5 * ADVERTISE.ttl_s)
            assert alice.peer_id in table and browser.stats["probes"] == probes
            leaving = time.monotonic()
        await wait_until(lambda: alice.peer_id not in table, 3, "removal on goodbye")
        gone = time.monotonic() - leaving
        assert not browser.failures, browser.failures
    print(f"loopback: discovered {found:.2f} s after registering began, removed {gone:.2f} s after leaving")


@pytest.mark.parametrize("forgery", ["bad_signature", "other_peer", "expired"])
async def test_forged_records_are_refused_and_counted(forgery: str) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    table = PeerTable()
    async with info_server() as server, Mdns(BROWSE, table=table, transport=PLAIN) as browser:
        record = signed(alice, server.port)
        if forgery == "bad_signature":
            record = replace(record, span=(0, 30))  # changed after signing
        elif forgery == "other_peer":
            record = signed(mallory, server.port)  # valid, but not the advertised peer's
        else:
            record = signed(alice, server.port, now=time.time() - 3600)
        server.serve(record)
        async with Mdns(ADVERTISE, advert=Advert(alice.peer_id, server.port, scheme="http")):
            if forgery == "bad_signature":
                await wait_until(lambda: table.refused["signature_invalid"] > 0, 10, "signature refusal")
            elif forgery == "other_peer":
                await wait_until(lambda: browser.failures["id_mismatch"] > 0, 10, "peer id mismatch")
            else:
                await wait_until(lambda: table.refused["expired"] > 0, 10, "expiry refusal")
            assert alice.peer_id not in table and mallory.peer_id not in table


async def test_a_killed_advertiser_leaves_within_the_bound() -> None:
    """An advertiser process on loopback, SIGKILLed: no goodbye, its records just stop."""
    table = PeerTable()
    async with Mdns(BROWSE, table=table, transport=PLAIN):
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PEER_SCRIPT), "serve", LOOPBACK, str(ADVERTISE.ttl_s),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert process.stdout is not None
            ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 15))
            peer_id = ready["peer_id"]
            await wait_until(lambda: peer_id in table, 10, "discovery")
        finally:
            process.kill()
            await process.wait()
        killed = time.monotonic()
        await wait_until(lambda: peer_id not in table, BROWSE.removal_bound_s + 2, "removal after expiry")
        gone = time.monotonic() - killed
    assert gone <= BROWSE.removal_bound_s + 0.5
    print(f"loopback SIGKILL: removed after {gone:.2f} s (bound {BROWSE.removal_bound_s} s)")


# --- across network namespaces -------------------------------------------------------


def start_peer(lan: Lan, host: int, mode: str, *argv: str) -> tuple[int, Lines, str]:
    """Run tests/mdns_peer.py inside host `host`; returns its pid, its output and its peer id."""
    address = lan.hosts[host].address
    command = [sys.executable, str(PEER_SCRIPT), mode, address, *argv]
    process = lan.run_in(lan.hosts[host], command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    lines = Lines(process.stdout)
    ready = json.loads(lines.expect(lambda line: json.loads(line)["event"] == "ready", 15))
    return process.pid, lines, ready.get("peer_id", "")


def event(lines: Lines, kind: str, peer_id: str, timeout: float) -> float:
    """Wait for the browser's `kind` event about `peer_id`; returns its unix time."""

    def matches(line: str) -> bool:
        fields = json.loads(line)
        return fields["event"] == kind and fields["peer_id"] == peer_id

    return float(json.loads(lines.expect(matches, timeout))["t"])


def test_namespaces_discover_goodbye_partition_and_crash(lan_factory: Callable[[int], Lan]) -> None:  # noqa: F811
    """Two advertisers and a browser on three hosts of one bridge, each in its own namespace.

    Peers use ttl 4 s and the browser sweeps every 1 s with 1 s probes, so a peer that
    vanishes without goodbye (cable pulled, SIGKILL) must leave within 4 + 1 + 1 = 6 s.
    """
    bound_s = 6.0
    lan = lan_factory(3)
    _, browser, _ = start_peer(lan, 2, "browse", "1.0", "1000")
    started = time.time()
    alice_pid, _, alice = start_peer(lan, 0, "serve", "4")
    bob_pid, _, bob = start_peer(lan, 1, "serve", "4")
    found = max(event(browser, "added", alice, 10), event(browser, "added", bob, 10)) - started

    os.kill(alice_pid, signal.SIGTERM)
    sent = time.time()
    goodbye = event(browser, "removed", alice, 5) - sent

    lan.link_down(lan.hosts[1])
    cut = time.time()
    partition = event(browser, "removed", bob, bound_s + 2) - cut
    lan.link_up(lan.hosts[1])
    healed = time.time()
    back = event(browser, "added", bob, 10) - healed

    os.kill(bob_pid, signal.SIGKILL)
    killed = time.time()
    crash = event(browser, "removed", bob, bound_s + 2) - killed
    print(
        f"netns: both found {found:.2f} s after start; goodbye removal {goodbye:.2f} s; "
        f"partition removal {partition:.2f} s, back {back:.2f} s after heal; SIGKILL removal {crash:.2f} s"
    )
    assert partition <= bound_s + 0.5 and crash <= bound_s + 0.5


async def test_a_node_that_moves_re_announces_its_advert() -> None:
    from node.discovery import DiscoveryConfig, NodeDiscovery

    class Advertiser:  # stands in for an entered, advertising Mdns
        advertising = True

        def __init__(self) -> None:
            self.adverts: list[Advert] = []

        async def update(self, advert: Advert) -> None:
            self.adverts.append(advert)

    me = Identity.generate()
    discovery = NodeDiscovery(DiscoveryConfig(), PeerTable(), lambda leaving: signed(me, 1), Advert(me.peer_id, 1, model="m", span=(0, 10)))
    await discovery.moved(Advert(me.peer_id, 1, model="m", span=(10, 20)))  # no mDNS: nothing to say
    discovery.mdns = Advertiser()  # type: ignore[assignment]
    await discovery.moved(Advert(me.peer_id, 1, model="m", span=(10, 20)))
    assert [advert.span for advert in discovery.mdns.adverts] == [(10, 20)]  # type: ignore[attr-defined]
