"""Attack 5 of issue 11, starvation: a stranger in its own network namespace takes what it can of
three nodes (sessions it never steps, concurrent large /forwards, idle and half-sent HTTP
requests) while a legitimate client in another namespace generates greedy text. The client
gets the same tokens as in an undisturbed run, within 3x its time; the attacker gets typed
`busy` answers at once, never stalls.

Every connection to a namespace address starts inside a namespace (tests/netns.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.netns import Lines, beside_attacker
from tests.nodes import namespace_bootstrap, start_in_namespaces, stop_nodes

NEW_TOKENS = 24
HEADER_TIMEOUT_S = 2.0
SESSIONS = 16  # the attacker's sessions per node: the nodes' --max-sessions-per-source (it tries a few more)
FORWARDS = 4  # concurrent large forwards to the first node: twice its per-source limit
FORWARD_TOKENS = 4096
CONNECTIONS = 80  # raw connections to the first node, over its per-source TCP limit of 64


def test_a_stranger_cannot_starve_a_legitimate_client(lan_factory, tmp_path):
    lan = lan_factory(3)
    home, user, stranger = lan.hosts
    nodes = []

    limits = ["--header-timeout", str(HEADER_TIMEOUT_S), "--max-sessions-per-source", str(SESSIONS)]

    def legit() -> dict:
        client = lan.run_in(user, [sys.executable, "-m", "tests.starvation_parties", "legit", bootstrap.url, str(NEW_TOKENS)], stderr=subprocess.STDOUT)
        line = Lines(client.stdout).expect(lambda line: line.startswith("{"), 180)
        assert client.wait(30) == 0
        return json.loads(line)

    try:
        first, url = namespace_bootstrap(home)  # all four start at once
        bootstrap, *spans = start_in_namespaces(
            [(home, [*limits, *first]), *((home, [*limits, "--blocks", blocks, "--bootstrap", url]) for blocks in ("0:10", "10:20", "20:30"))], tmp_path, nodes
        )
        undisturbed = legit()

        argv = [sys.executable, "-m", "tests.starvation_parties", "attack", *(n.url for n in spans), "--sessions", str(SESSIONS + 4), "--forwards", str(FORWARDS),
                "--forward-tokens", str(FORWARD_TOKENS), "--connections", str(CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT_S)]
        disturbed, seen = beside_attacker(lan, stranger, argv, legit)
    finally:
        stop_nodes(nodes)
    print(f"starvation: undisturbed {undisturbed['seconds']:.2f} s, under attack {disturbed['seconds']:.2f} s; attacker saw {seen}")
    assert disturbed["tokens"] == undisturbed["tokens"]
    assert disturbed["seconds"] <= 3 * undisturbed["seconds"], (undisturbed["seconds"], disturbed["seconds"])
    # the attacker: its sessions hold slots up to the per-source limit, then each node says busy
    assert seen["sessions_opened"] == 3 * SESSIONS and seen["session_refusals"] == {"busy": 3}, seen
    # forwards: some ran, the rest were refused as busy, and a refusal came at once
    assert seen["forward_answers"].get("ok", 0) >= 0 and seen["forward_answers"].get("busy", 0) >= 1, seen
    assert set(seen["forward_answers"]) <= {"ok", "busy", "reset"}, seen  # reset: busy, then closed under the upload
    assert seen["slowest_refusal_s"] < 5.0, seen
    # connections: over the per-source limit refused with a typed busy; the rest (idle or half-sent) cut by the header timeout
    assert seen["connections_refused"] >= CONNECTIONS - 64, seen
    assert seen["connections_refused"] + seen["closed_by_node"] == CONNECTIONS, seen
    assert seen["closed_after_s"] < 4 * HEADER_TIMEOUT_S + 10, seen
