"""Choosing and moving spans from the swarm's coverage (pure)."""

from __future__ import annotations

import time

from node.balance import block_throughput, bottleneck, choose_span, should_move
from swarm.identity import Identity
from swarm.peers import PeerRecord

MODEL = {"architecture": "llama", "shape": "L8", "digest": "d" * 32}


def _record(span, throughput, model=MODEL, layers=8):
    return PeerRecord.create(
        Identity.generate(), addresses=("http://127.0.0.1:9",), now=time.time(), ttl=60, model=model, num_layers=layers, span=span, throughput=throughput
    )


def test_block_throughput_sums_peers_of_this_model_only():
    records = [_record((0, 4), 10.0), _record((2, 8), 5.0), _record((0, 8), 99.0, model={**MODEL, "digest": "e" * 32})]
    assert block_throughput(records, MODEL["digest"], 8) == [10, 10, 15, 15, 5, 5, 5, 5]
    assert block_throughput(records, MODEL["digest"], 8, skip=records[0].peer_id) == [0, 0, 5, 5, 5, 5, 5, 5]


def test_a_new_node_takes_the_hole():
    assert choose_span([5, 5, 0, 0, 0, 5, 5, 5], 3) == (2, 5)
    assert choose_span([0] * 8, 4) == (0, 4)  # empty swarm: the first window
    assert choose_span([9, 9, 9, 1, 9, 9, 9, 9], 2) in {(2, 4), (3, 5)}
    assert choose_span([3, 3], 5) == (0, 2)  # more blocks asked than the model has


def test_move_only_when_the_bottleneck_rises_by_more_than_the_margin():
    # two nodes on [0,4), nobody on [4,8): one of them should move there
    totals = [20, 20, 20, 20, 0, 0, 0, 0]
    assert should_move(totals, (0, 4), 10.0) == (4, 8)
    # balanced swarm: stay
    assert should_move([10] * 8, (0, 4), 10.0) is None
    # a small gain below the margin: stay (no flapping)
    totals = [11, 11, 11, 11, 10, 10, 10, 10]
    assert should_move(totals, (0, 4), 1.0) is None
    assert bottleneck(totals) == 10


def test_the_only_server_of_a_span_does_not_abandon_it():
    totals = [10, 10, 10, 10, 0, 0, 0, 0]  # we alone hold [0,4)
    assert should_move(totals, (0, 4), 10.0) is None
