"""A test kit for several hosts on one machine: Linux network namespaces on a private bridge.

Why: mDNS, interface binding and partitions only show up between hosts with their own
addresses. Each `Lan` builds, all outside the root namespace:

    switch namespace "<tag>sw":  bridge br0, ports p0..pN-1
    host namespace   "<tag>h<i>": lo up, eth0 = 10.213.X.(i+1)/24, the peer of port p<i>

No route joins the root namespace to the LAN, so nothing a test does here can leave the
machine. The RULE for tests: every connection starts inside a host namespace (use
`run_in`); the root namespace never connects to a LAN address (it would go out by its
default route).

Names carry the pid and a counter, so parallel runs never clash; a leftover from a killed
run can be found with `ip netns list | grep lsw<pid>`. `close()` (or leaving the `with`)
stops every process started by `run_in` and deletes every namespace, after failures too;
deleting a namespace deletes its links. Needs root and iproute2: `require()` skips otherwise.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TypeVar

import pytest

T = TypeVar("T")

SUBNET_PREFIX = "10.213"  # LANs are 10.213.X.0/24
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
_ids = itertools.count()  # per-process LAN counter, so one test can build several LANs


def require() -> None:
    """Skip the calling test unless we can build namespaces (root, iproute2 present)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`")


def ip(*args: str, namespace: str | None = None) -> None:
    """Run `ip [-n namespace] args`; a failure raises with ip's own message."""
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One machine on the LAN."""

    namespace: str
    address: str  # IPv4 on eth0
    port: str  # its bridge port in the switch namespace: what link_down cuts


class Namespaces:
    """Namespaces and the processes started in them, as a context manager that always cleans up:
    a subclass builds its topology in `_build` (adding each namespace with `_add_namespace`)."""

    def __init__(self) -> None:
        self._namespaces: list[str] = []  # created so far, deleted on close
        self._processes: list[subprocess.Popen[str]] = []

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        raise NotImplementedError

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)

    def start(self, namespace: str, argv: Sequence[str], **popen: object) -> subprocess.Popen[str]:
        """Start `argv` inside `namespace` (stdout piped, text mode); `close()` stops it."""
        options: dict[str, object] = {"stdout": subprocess.PIPE, "text": True, **popen}
        process: subprocess.Popen[str] = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **options)  # type: ignore[call-overload]
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Stop our processes, then delete every namespace we made. Safe to call twice."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self._processes.clear()
        errors = []
        for name in reversed(self._namespaces):
            try:
                ip("netns", "del", name)
            except RuntimeError as error:
                errors.append(str(error))
        self._namespaces.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


class Lan(Namespaces):
    """`hosts` namespaces on one bridge, as a context manager that always cleans up."""

    def __init__(self, hosts: int) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("a LAN has 1..200 hosts")
        super().__init__()
        self.tag = f"lsw{os.getpid()}x{next(_ids)}"
        self.switch = f"{self.tag}sw"
        subnet = _free_subnet()
        self.hosts = [Host(f"{self.tag}h{i}", f"{subnet}.{i + 1}", f"p{i}") for i in range(hosts)]

    def _build(self) -> None:
        self._add_namespace(self.switch)
        ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", namespace=self.switch)
        ip("link", "set", "br0", "up", namespace=self.switch)
        for host in self.hosts:
            self._add_namespace(host.namespace)
            ip("link", "set", "lo", "up", namespace=host.namespace)
            ip("link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.namespace, namespace=self.switch)
            ip("link", "set", host.port, "master", "br0", "up", namespace=self.switch)
            ip("addr", "add", f"{host.address}/24", "dev", "eth0", namespace=host.namespace)
            ip("link", "set", "eth0", "multicast", "on", "up", namespace=host.namespace)

    def run_in(self, host: Host, argv: Sequence[str], **popen: object) -> subprocess.Popen[str]:
        """Start `argv` inside `host` (stdout piped, text mode); `close()` stops it."""
        return self.start(host.namespace, argv, **popen)

    def link_down(self, host: Host) -> None:
        """Pull `host`'s cable at the switch: it keeps its address but reaches nobody."""
        ip("link", "set", host.port, "down", namespace=self.switch)

    def link_up(self, host: Host) -> None:
        ip("link", "set", host.port, "up", namespace=self.switch)


@pytest.fixture
def lan_factory() -> Iterator[Callable[[int], Lan]]:
    """`lan_factory(n)` builds a LAN of n hosts that is torn down when the test ends."""
    require()
    lans: list[Lan] = []

    def make(hosts: int) -> Lan:
        lan = Lan(hosts).__enter__()
        lans.append(lan)
        return lan

    yield make
    for lan in reversed(lans):
        lan.close()


class Lines:
    """The lines a process writes, read by a thread so a test can wait on them with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        except ValueError:  # the stream was closed under us at cleanup
            pass
        self._queue.put(None)

    def expect(self, match: Callable[[str], bool], timeout: float) -> str:
        """The next line for which `match` is true; AssertionError on EOF or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout} s; saw {self.seen[-10:]}") from None
            if line is None:
                raise AssertionError(f"the process closed its output; saw {self.seen[-10:]}")
            self.seen.append(line)
            if match(line):
                return line


def beside_attacker(lan: Lan, host: Host, argv: list[str], legit: Callable[[], T]) -> tuple[T, dict]:
    """Run `legit()` while an attacker party runs in `host`: the party (a script) prints `ready`
    once its attack is on, keeps it up until a line on its stdin, then prints what it saw as one
    JSON line and exits 0. Returns legit's result and what the attacker saw."""
    attacker = lan.run_in(host, argv, stdin=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = Lines(attacker.stdout)
    lines.expect(lambda line: line.startswith("ready"), 120)
    disturbed = legit()
    attacker.stdin.write("done\n")
    attacker.stdin.flush()
    seen = json.loads(lines.expect(lambda line: line.startswith("{"), 120))
    assert attacker.wait(30) == 0
    return disturbed, seen


def _free_subnet() -> str:
    """A 10.213.X prefix that no root-namespace address uses (X from the pid, then onwards)."""
    listed = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=False, capture_output=True, text=True, timeout=10).stdout
    used = set()
    for field in listed.split():
        if "/" in field and field.count(".") == 3:
            try:
                used.add(ipaddress.ip_interface(field).network)
            except ValueError:
                continue
    start = (os.getpid() + next(_ids)) % 254
    for step in range(254):
        candidate = f"{SUBNET_PREFIX}.{(start + step) % 254 + 1}"
        network = ipaddress.ip_network(f"{candidate}.0/24")
        if not any(network.overlaps(other) for other in used):
            return candidate
    raise RuntimeError(f"every {SUBNET_PREFIX}.X.0/24 overlaps a root-namespace network")
