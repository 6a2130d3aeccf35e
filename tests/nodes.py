"""Start real `swarm-node` processes for tests and stop them by pid.

Nodes started here serve plain http (`--insecure-http`, a loopback fixture the issue allows)
unless `tls=True`; clients of them come from `swarm_client`, which dials http only for such
swarms. The default path, TLS pinned to identities, is tested in tests/test_tls.py.

A swarm "over a WAN": `start_swarm(..., delay_s=0.010)` puts a `DelayRelay` (tests/delay_relay.py)
in front of every node that holds blocks and starts the node with `--public-url` of its relay, so
the client's connections and the pushes from hop to hop all cross relays: a one-token step pays
(hops + 1) one-way delays. `stop_nodes` closes the relays after the nodes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.delay_relay import RelayHost

READY = re.compile(r"^ready peer=(\S+) url=(\S+) blocks=(?:(\d+):(\d+)|none) model=(\S+)")


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    peer_id: str = ""
    url: str = ""
    blocks: tuple[int, int] = (0, 0)
    output: list[str] = field(default_factory=list)
    settled: threading.Event = field(default_factory=threading.Event)  # ready line seen, or output ended
    relays: RelayHost | None = None  # the relays in front of it and its swarm (`behind_relays`), closed by stop_nodes

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start_nodes(
    specs: list[list[str]], tmp: Path, timeout: float = 180.0, prefix: list[str] | None = None, tls: bool = False, module: str = "node.cli"
) -> list[NodeProcess]:
    """Start one node per argument list (all at once) and wait until every one printed its ready line.

    Without `tls` every node gets `--insecure-http` (plain http on loopback). `module`: what runs as
    the node (`-m module`), e.g. tests.lying_node; it takes swarm-node's arguments."""
    nodes = []
    insecure = [] if tls else ["--insecure-http"]
    # One compute thread a node: the suite runs several nodes on 2 cores, where more threads only
    # wait on each other (benchmarks/api_load.py --threads 1: the nodes' CPU per token 17 -> 5 ms);
    # the outputs are bit-identical to two threads'.
    threads = ["--threads", "1"] if module == "node.cli" else []
    for index, args in enumerate(specs):
        argv = [sys.executable, "-m", module, "--identity", str(tmp / f"node{index}-{os.getpid()}.key"), *insecure, *threads, *args]
        proc = subprocess.Popen((prefix or []) + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        nodes.append(NodeProcess(proc))
    for node in nodes:
        threading.Thread(target=_pump, args=(node,), daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            if not node.settled.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("node did not become ready:\n" + "".join(node.output))
            if not node.url:
                raise RuntimeError(f"node exited with {node.proc.wait(10)}:\n" + "".join(node.output))
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


def _pump(node: NodeProcess) -> None:
    """Read the node's output in a thread: record the ready line, keep the rest for failure messages."""
    for line in node.proc.stdout:
        node.output.append(line)
        match = READY.match(line)
        if match:
            node.peer_id, url, start, end = match.group(1), match.group(2), match.group(3), match.group(4)
            node.blocks = (int(start), int(end)) if start else (0, 0)
            node.url = url
            node.settled.set()
    node.settled.set()


NAMESPACE_BOOTSTRAP_PORT = 7100  # a fresh namespace has every port free: a bootstrap peer there can take a known one


def start_in_namespace(host, tmp: Path, args: list[str], started: list[NodeProcess], tls: bool = False, index: int | None = None) -> NodeProcess:
    """One node inside `host`'s network namespace (tests/netns.py), listening on its address and
    gossiping every 0.5 s; it is appended to `started`, which the test stops at the end.
    `index` names its folder (its identity), `len(started)` unless given."""
    folder = tmp / f"{host.namespace}-{len(started) if index is None else index}"
    (node,) = start_nodes([["--host", host.address, "--gossip-period", "0.5", *args]], folder, prefix=["ip", "netns", "exec", host.namespace], tls=tls)
    started.append(node)
    return node


def namespace_bootstrap(host) -> tuple[list[str], str]:
    """(arguments, URL) of a bootstrap peer (no blocks) to start in `host`'s fresh namespace on
    `NAMESPACE_BOOTSTRAP_PORT`: its URL is known before it is up, so the nodes naming it can
    start at the same time (`start_in_namespaces`)."""
    return ["--no-model", "--port", str(NAMESPACE_BOOTSTRAP_PORT)], f"http://{host.address}:{NAMESPACE_BOOTSTRAP_PORT}"


def start_in_namespaces(entries: list[tuple[Any, list[str]]], tmp: Path, started: list[NodeProcess], tls: bool = False) -> list[NodeProcess]:
    """`start_in_namespace` for every (host, args) at once, waiting until all are ready; the nodes
    in the order given. Each is appended to `started` as it becomes ready (so in any order)."""
    from concurrent.futures import ThreadPoolExecutor

    base = len(started)
    with ThreadPoolExecutor(len(entries)) as pool:
        futures = [pool.submit(start_in_namespace, host, tmp, args, started, tls, base + i) for i, (host, args) in enumerate(entries)]
    return [future.result() for future in futures]


def collect_groups(groups: list[concurrent.futures.Future], started: list[NodeProcess]) -> None:
    """Add the nodes of every group of `start_nodes` calls that started to `started` (so the caller
    stops them all), then raise the first group's failure, if any."""
    failure: Exception | None = None
    for group in groups:
        try:
            started += group.result()
        except Exception as exc:  # noqa: BLE001 - raised below, once the others are collected
            failure = failure or exc
    if failure is not None:
        raise failure


def stop_nodes(nodes: list[NodeProcess]) -> None:
    """Stop the nodes (SIGTERM, then kill), then close the relays in front of them."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
    for node in nodes:
        if node.relays is not None:
            node.relays.close()  # idempotent: nodes of one swarm share their host


_RESERVED: set[int] = set()
_RESERVE_RANDOM = random.Random(os.getpid())


def free_port() -> int:
    """A loopback port free now, for a server yet to start, from below the kernel's ephemeral
    range: a port the kernel handed out (`bind` to 0) is one it may hand out again as the local
    end of any outgoing connection before the server binds it (CI lost a test module to that).
    No two calls in this process return the same port."""
    low = _ephemeral_low()
    while True:
        port = _RESERVE_RANDOM.randrange(max(1024, low - 12000), low)
        if port in _RESERVED:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _RESERVED.add(port)
        return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def reserve_url(tls: bool = False) -> tuple[list[str], str]:
    """(`--port` arguments, URL) of a node yet to start, on a free loopback port: nodes naming it as
    their bootstrap peer can start at the same time as it, instead of after it. Until it is up
    their gossip rounds to it fail, and every round tries it again, so they meet within a period.
    (Another process may take the port meanwhile; the node then fails to start, loudly.)
    The port is `free_port()`'s."""
    port = free_port()
    return ["--port", str(port)], f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def behind_relays(specs: list[list[str]], relays: RelayHost, delay_s: float, tls: bool = False, **options: Any) -> list[list[str]]:
    """Each node's arguments with a reserved loopback `--port` and `--public-url` of a `DelayRelay`
    (started on `relays`, delay `delay_s` each way, `options` as DelayRelay's) in front of that port.

    The relay listens before the node starts and dials the node only when a connection comes, so
    the nodes can start at once. Every peer learns the relay's URL from the node's record: the
    client and the node pushing to it both go through the relay."""
    fronted = []
    for args in specs:
        port, _ = reserve_url(tls)
        relay = relays.relay(("127.0.0.1", int(port[1])), delay_s, **options)
        fronted.append([*args, *port, "--public-url", relay.url("https" if tls else "http")])
    return fronted


def start_swarm(
    tmp: Path,
    spans: list[str],
    gossip_period: float = 0.5,
    tls: bool = False,
    extra: Sequence[str] = (),
    delay_s: float = 0.0,
    relayed: bool | None = None,
    relay_options: dict[str, Any] | None = None,
) -> tuple[NodeProcess, list[NodeProcess]]:
    """A bootstrap peer (no blocks) and one node per span ("0:10", ...) that announces to it, all
    started at once (`reserve_url`). The nodes' identities are tmp/node{i}-{pid}.key, the bootstrap
    peer's is under tmp/bootstrap. `extra`: more flags for the nodes that hold blocks.

    With `delay_s` > 0 (or `relayed`, which also puts relays of 0 delay in front, to raise later)
    every node that holds blocks sits behind its own `DelayRelay`
    (`behind_relays`; `relay_options`: jitter_s, bandwidth, ...), all on one `RelayHost` set on
    every node's `.relays` (`set_delay` changes the delay of the whole swarm at once). The
    bootstrap peer is dialled directly: it is on no step's path."""
    period = ["--gossip-period", str(gossip_period)]
    port, url = reserve_url(tls)
    identity = ["--identity", str(tmp / "bootstrap" / f"node0-{os.getpid()}.key")]  # an explicit --identity wins
    node_args = [["--blocks", span, "--bootstrap", url, *period, *extra] for span in spans]
    relays = RelayHost() if (delay_s > 0 if relayed is None else relayed) else None
    try:
        if relays is not None:
            node_args = behind_relays(node_args, relays, delay_s, tls, **(relay_options or {}))
        *nodes, bootstrap = start_nodes([*node_args, ["--no-model", *port, *identity, *period]], tmp, tls=tls)
    except BaseException:
        if relays is not None:
            relays.close()
        raise
    for node in nodes:
        node.relays = relays
    return bootstrap, nodes


def module_swarm(name: str, spans: list[str], tls: bool = False, delay_s: float = 0.0):
    """A module-scoped pytest fixture: `start_swarm` with these spans (behind relays with
    `delay_s`), stopped after the module."""
    import pytest

    @pytest.fixture(scope="module")
    def swarm(tmp_path_factory):
        bootstrap, nodes = start_swarm(tmp_path_factory.mktemp(name), spans, tls=tls, delay_s=delay_s)
        yield bootstrap, nodes
        stop_nodes([bootstrap, *nodes])

    return swarm


def swarm_client(bootstrap: list[str] | str, wire_dtype: str = "float32", tls: bool = False, config=None, **kwargs):
    """A `SwarmModel` of the default model for a test swarm: it dials plain http too unless `tls`."""
    from client.swarm import ClientConfig, SwarmModel
    from swarm.model import DEFAULT_MODEL

    urls = [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)
    return SwarmModel(DEFAULT_MODEL, bootstrap=urls, config=config or ClientConfig(wire_dtype=wire_dtype), insecure_http=not tls, **kwargs)


async def refresh(client) -> None:
    """Make a SwarmModel re-read the swarm now."""
    async with client.config.transport.client_session() as http:
        await client.refresh(http, force=True)


async def until_routed(client, timeout: float = 120.0):
    """The route a SwarmModel plans over every block, once it can: nodes reach the bootstrap peer
    a gossip round or more after their ready line (GPU nodes: after their compile)."""
    from swarm.errors import SwarmError

    deadline = time.monotonic() + timeout
    while True:
        try:
            await refresh(client)
            return client.plan()
        except SwarmError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
