"""Attack: a Sybil flood of `POST /peers` (issue 11, attack 1, and the gossip half of attack 3).

Real nodes, each on its own host of a namespace LAN: a bootstrap peer and two nodes serving
the model. An attacker on its own host pushes ~3,000 validly self-signed records from fresh
keys to every node, twice: records whose addresses answer nothing, answer without the
record's key (its own trap listener), or point at an "admin" port on a host's loopback or
on the LAN. While the flood goes on an honest newcomer joins. The test asserts that

- the honest nodes keep listing exactly each other (and the newcomer), no attacker record;
- nobody ever POSTs gossip to an address that did not prove its key, and no node dials the
  loopback admin port at all (a LAN node never dials loopback for a stranger);
- a client generates the same greedy text as before the attack.

Every connection to a LAN address starts inside a namespace (tests/netns.py's rule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.netns import Lan, Lines
from tests.nodes import start_in_namespace, stop_nodes

FLOOD = 3000  # records per target per wave
TOKENS = 8
ADMIN_PORT = 8081  # the "admin" listeners' port: each namespace is ours alone, so a fixed port is free
TRAP = [sys.executable, "-m", "tests.discovery_attack"]


def _run(lan: Lan, host, *args: str, timeout: float = 120) -> str:
    process = lan.run_in(host, [*TRAP, *args], stderr=subprocess.STDOUT)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out.strip().splitlines()[-1]


def _listen(lan: Lan, host, address: str) -> tuple[subprocess.Popen, Lines]:
    process = lan.run_in(host, [*TRAP, "trap", address, str(ADMIN_PORT)], stderr=subprocess.STDOUT)
    lines = Lines(process.stdout)
    lines.expect(lambda line: line.startswith("listening "), 60)
    return process, lines


def _hits(process: subprocess.Popen, lines: Lines) -> list[str]:
    process.terminate()
    process.wait(10)
    try:
        while True:
            lines.expect(lambda line: False, 5)
    except AssertionError:  # EOF: every line is in `seen`
        pass
    return [line for line in lines.seen if line.startswith("hit ")]


BOOTSTRAP_PORT = 7000


def test_a_sybil_flood_cannot_eclipse_honest_nodes(lan_factory, tmp_path):
    lan = lan_factory(6)
    home, a, b, attacker, newcomer_host, client = lan.hosts
    nodes = []

    def node(host, *args):
        return start_in_namespace(host, tmp_path, list(args), nodes)

    try:
        url = f"http://{home.address}:{BOOTSTRAP_PORT}"  # a fresh namespace has every port free: all three start at once
        with ThreadPoolExecutor(3) as pool:
            starting = [pool.submit(node, home, "--no-model", "--port", str(BOOTSTRAP_PORT))]
            starting += [pool.submit(node, host, "--blocks", span, "--bootstrap", url) for host, span in ((a, "0:15"), (b, "15:30"))]
        bootstrap, first, second = (f.result() for f in starting)
        assert bootstrap.url == url
        honest = [bootstrap, first, second]
        urls = [n.url for n in honest]
        ids = ",".join(n.peer_id for n in honest)
        _run(lan, client, "listed", "60", ids, *urls)
        before = json.loads(_run(lan, client, "generate", bootstrap.url, str(TOKENS)))["tokens"]

        trap = _listen(lan, attacker, attacker.address)  # answers proofs without the key
        loopback_admin = _listen(lan, home, "127.0.0.1")  # on the bootstrap's own host
        lan_admin = _listen(lan, client, client.address)  # a LAN service: LAN nodes may dial it, only to ask for a proof
        addresses = [
            f"http://{attacker.address}:{ADMIN_PORT}",
            f"http://{attacker.address}:9",  # nothing listens: refused
            f"http://{attacker.address.rsplit('.', 1)[0]}.250:{ADMIN_PORT}",  # nobody has this address: no answer
            f"http://127.0.0.1:{ADMIN_PORT}",
            f"http://{client.address}:{ADMIN_PORT}",
        ]
        flood = lan.run_in(attacker, [*TRAP, "flood", str(FLOOD), ",".join(addresses), *urls], stderr=subprocess.STDOUT)
        newcomer = node(newcomer_host, "--no-model", "--bootstrap", bootstrap.url)  # joins during the flood
        out, _ = flood.communicate(timeout=120)
        assert flood.returncode == 0 and all(status == 200 for statuses in json.loads(out.splitlines()[-1]).values() for status in statuses), out
        second_wave = lan.run_in(attacker, [*TRAP, "flood", str(FLOOD), ",".join(addresses), *urls], stderr=subprocess.STDOUT)

        everyone = ",".join(n.peer_id for n in [*honest, newcomer])
        admitted = float(_run(lan, client, "listed", "30", everyone, *urls, newcomer.url))
        assert second_wave.wait(120) == 0
        after = json.loads(_run(lan, client, "generate", bootstrap.url, str(TOKENS)))["tokens"]
        _run(lan, client, "listed", "10", everyone, *urls, newcomer.url)  # still exactly the honest nodes
        print(f"newcomer listed everywhere {admitted:.2f} s after the first flood wave")

        assert after == before
        trap_hits, loopback_hits, lan_hits = _hits(*trap), _hits(*loopback_admin), _hits(*lan_admin)
        assert loopback_hits == [], loopback_hits
        for hits in (trap_hits, lan_hits):
            assert hits and set(hits) == {"hit GET /peers/proof"}, hits  # asked once per record for a proof, never gossip
        assert len(trap_hits) < FLOOD  # the per-source budget: most records were refused unread
    finally:
        stop_nodes(nodes)
