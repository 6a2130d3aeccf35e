"""Choosing and moving spans from the swarm's coverage: the pure choice, then real `--blocks auto` nodes."""

from __future__ import annotations

import time

from node.balance import (
    CLAIM_FACTOR,
    block_throughput,
    blocks_that_fit,
    bottleneck,
    bounded_claim,
    choose_span,
    peer_speeds,
    should_move,
    should_resize,
    speed_share,
)
from swarm.identity import Identity
from swarm.records import PeerRecord

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


def test_blocks_that_fit_a_memory_budget():
    # 1 GB, 10% reserve, 200 MB of KV: 700 MB for 100 MB blocks
    assert blocks_that_fit(10**9, 10**8, 2 * 10**8) == 7
    assert blocks_that_fit(10**8, 10**9, 0) == 1  # never nothing


def test_the_only_server_of_a_span_does_not_abandon_it():
    totals = [10, 10, 10, 10, 0, 0, 0, 0]  # we alone hold [0,4)
    assert should_move(totals, (0, 4), 10.0) is None


def test_ties_go_to_windows_aligned_with_the_coverage():
    # one node holds the whole model: a newcomer takes an end, never the middle (which would
    # leave two pieces that the first node could not shrink to)
    assert choose_span([7.0] * 30, 24) == (0, 24)
    import random

    assert {choose_span([7.0] * 30, 24, random.Random(seed)) for seed in range(20)} == {(0, 24), (6, 30)}
    # a window whose ends fall where coverage changes beats one that cuts a covered piece
    assert choose_span([5, 5, 0, 0, 5, 5, 5, 5], 4) == (0, 4)


def test_speed_share_is_proportional_to_speed():
    assert speed_share(100.0, [], 30) == 30  # alone: the whole model
    assert speed_share(300.0, [(100.0, 30)], 30) == 22  # 3:1 -> 22.5 of 30, rounded half to even
    assert speed_share(100.0, [(300.0, 24)], 30) == 8
    assert speed_share(100.0, [(100.0, 10), (100.0, 10), (100.0, 10)], 30) == 8  # 30 / 4 = 7.5
    # the others already make two replicas of the model: the share of one of two pipelines
    assert speed_share(100.0, [(100.0, 15)] * 4, 30) == 12  # 2 * 30 * 100 / 500
    assert speed_share(1.0, [(1.0, 1)], 1) == 1  # one block: never nothing


def test_peer_speeds_reads_records_of_this_model_only():
    records = [_record((0, 4), 10.0), _record((2, 8), 5.0), _record((0, 8), 99.0, model={**MODEL, "digest": "e" * 32}), _record(None, 50.0, model=None, layers=0)]
    assert sorted(peer_speeds(records, MODEL["digest"], 8)) == [(5.0, 6), (10.0, 4)]
    assert peer_speeds(records, MODEL["digest"], 8, skip=records[0].peer_id) == [(5.0, 6)]


def test_one_lying_record_cannot_make_a_node_take_nothing_or_everything():
    """Attack: a record claims the fastest (or the slowest) speed a record may carry."""
    for layers in (2, 8, 30, 80):
        huge = speed_share(100.0, [(1e9, layers)], layers)
        nothing = speed_share(100.0, [(0.0, layers)], layers)
        assert 1 <= huge <= nothing <= layers - 1, (layers, huge, nothing)
    # bounded: the liar counts as CLAIM_FACTOR times our speed at most, or 1/CLAIM_FACTOR at least
    assert bounded_claim(1e9, 100.0) == 100.0 * CLAIM_FACTOR
    assert bounded_claim(0.0, 100.0) == 100.0 / CLAIM_FACTOR
    assert bounded_claim(float("nan"), 100.0) == 100.0 / CLAIM_FACTOR
    assert speed_share(100.0, [(1e9, 80)], 80) == round(80 / (1 + CLAIM_FACTOR))
    # an honest mixed swarm is barely clamped: a GPU 10x a CPU, block for block
    assert speed_share(10.0, [(100.0, 30)], 30) == 3
    # a node whose own speed is unknown (0, NaN) claims the least
    assert speed_share(0.0, [(100.0, 30)], 30) == speed_share(float("nan"), [(100.0, 30)], 30) == 1


def test_resize_only_when_badly_off_and_never_into_a_hole():
    # we hold all 30 blocks at 100 blocks/s; a 3x faster node took [6, 30): shrink to the rest
    without = [0.0] * 6 + [300.0] * 24
    assert should_resize(without, (0, 30), 100.0, 8) == (0, 8)
    # near the share (within the margin, or one block): stay, measured speeds are noisy
    assert should_resize(without, (0, 8), 100.0, 9) is None
    assert should_resize([0.0] * 6 + [300.0] * 24, (0, 6), 100.0, 7) is None
    # shrinking would uncover blocks only we hold: stay
    without = [0.0] * 10 + [300.0] * 20
    assert should_resize(without, (0, 10), 100.0, 4) is None
    # growing is fine, onto the weakest window
    assert should_resize([0.0] * 10 + [300.0] * 10 + [100.0] * 10, (0, 10), 100.0, 20) == (0, 20)


def test_cli_sizes_by_speed_unless_num_blocks_is_given():
    """`--blocks auto` alone resizes by speed, capped by --max-memory beside --kv-memory (on CPU
    without it: the whole model); with --num-blocks the size is fixed."""
    from node.cli import _rebalance_config
    from node.flags import build_parser

    parse = build_parser().parse_args
    assert _rebalance_config(parse(["--blocks", "auto"])).max_blocks == 30
    # 200 MiB, 10% reserve, 100 MiB of KV: 80 MiB for float32 blocks of 3.54 M parameters (14.2 MB)
    config = _rebalance_config(parse(["--blocks", "auto", "--max-memory", "200MiB", "--kv-memory", "100MiB"]))
    assert config.resize and config.max_blocks == 5
    assert not _rebalance_config(parse(["--blocks", "auto", "--num-blocks", "5"])).resize
    assert _rebalance_config(parse(["--blocks", "0:5"])) is None


# --- real nodes ---------------------------------------------------------------------------------

TTL = 3.0


def _records(url: str) -> list:
    """The records the bootstrap peer's table holds now."""
    import asyncio

    import aiohttp

    from swarm.discovery.peers_http import fetch_peers

    async def fetch():
        async with aiohttp.ClientSession() as http:
            return await fetch_peers(http, url, 5.0)

    return asyncio.run(fetch())


def _spans(url: str) -> dict[str, tuple[int, int]]:
    """peer id -> span, as the bootstrap peer's table has it now."""
    return {r.peer_id: tuple(r.span) for r in _records(url) if r.span}


def _uncovered(spans, skip=frozenset()) -> int:
    counts = [0] * 30
    for peer, span in spans.items():
        if peer not in skip:
            for block in range(*span):
                counts[block] += 1
    return counts.count(0)


def _until_covered(url: str, timeout: float, skip=frozenset()) -> float:
    began = time.monotonic()
    while _uncovered(_spans(url), skip):
        assert time.monotonic() - began < timeout, f"not covered after {timeout} s: {_spans(url)}"
        time.sleep(0.2)  # another process's table: polled, there is no event to await
    return time.monotonic() - began


def test_auto_nodes_cover_the_model_and_close_a_hole(tmp_path):
    """Five `--blocks auto --num-blocks 15` nodes cover all 30 blocks; kill the two whose loss
    leaves the biggest hole, and the other three move to close it.

    Bound for the hole: record TTL (3 s) + a rebalance period (1 s, jittered) + the move
    (loading 15 blocks, a few seconds here) + gossip: 25 s is asserted.
    """
    import itertools

    from tests.nodes import reserve_url, start_nodes, stop_nodes

    gossip = ["--gossip-period", "0.3", "--record-ttl", str(TTL)]
    port, url = reserve_url()  # the bootstrap peer starts beside them: the five find an empty swarm either way
    auto = ["--blocks", "auto", "--num-blocks", "15", "--rebalance-period", "1", "--min-dwell", "2", "--bootstrap", url, *gossip]
    *nodes, bootstrap = start_nodes([*[auto] * 5, ["--no-model", *port, *gossip]], tmp_path)
    try:
        covered = _until_covered(bootstrap.url, 60)
        print(f"5 auto nodes cover all 30 blocks {covered:.1f} s after they were ready")
        spans = _spans(bootstrap.url)
        victims = max(itertools.combinations(nodes, 2), key=lambda pair: _uncovered(spans, {n.peer_id for n in pair}))
        gone = frozenset(n.peer_id for n in victims)
        hole = _uncovered(spans, gone)
        for victim in victims:
            victim.kill()
        healed = _until_covered(bootstrap.url, 60, skip=gone)
        print(f"killed 2 of 5 (spans {sorted(spans.values())}), leaving {hole} blocks uncovered: covered again after {healed:.1f} s")
        assert healed < 25
    finally:
        stop_nodes([bootstrap, *nodes])


def test_a_node_moving_mid_generation_hands_its_session_over_first(tmp_path):
    """An auto node decides to move while a generation runs through it: it says `draining`,
    serves until the client has spliced its blocks onto a replica, and only then loads
    its new span. The generation never sees an error and its tokens equal a quiet run."""
    import asyncio
    import json
    import urllib.request

    from client.sampling import SamplingParams
    from client.swarm import ClientConfig, SwarmModel
    from swarm.model import DEFAULT_MODEL
    from tests.nodes import refresh, reserve_url, start_nodes, stop_nodes

    def info(node) -> dict:
        with urllib.request.urlopen(f"{node.url}/info", timeout=10) as response:
            return json.load(response)

    def until(node, predicate, timeout: float = 60.0) -> dict:
        began = time.monotonic()
        while not predicate(state := info(node)):
            assert time.monotonic() - began < timeout, state
            time.sleep(0.1)  # another process's state: polled, there is no event to await
        return state

    gossip = ["--gossip-period", "0.3", "--record-ttl", str(TTL)]
    port, url = reserve_url()  # the bootstrap peer starts beside the fixed nodes
    fixed = [["--blocks", span, "--bootstrap", url, *gossip] for span in ("0:15", "15:30")]
    bootstrap, *nodes = start_nodes([["--no-model", *port, *gossip], *fixed], tmp_path / "f")
    _until_covered(bootstrap.url, 60)  # the auto node must see both fixed ones when it picks its span
    auto = ["--blocks", "auto", "--num-blocks", "15", "--rebalance-period", "1", "--min-dwell", "0", "--drain-timeout", "60"]
    nodes += start_nodes([[*auto, "--bootstrap", bootstrap.url, *gossip]], tmp_path / "a")
    mover = nodes[-1]
    span = f"{mover.blocks[0]}:{mover.blocks[1]}"
    try:
        client = SwarmModel(DEFAULT_MODEL, insecure_http=True, bootstrap=[bootstrap.url], config=ClientConfig(wire_dtype="float32"))
        ids = client.head.encode_prompt("Tell me about the sea.", chat=True)
        params = SamplingParams(max_new_tokens=32, stop_at_eos=False)
        replica = next(n for n in nodes[:2] if n.blocks == mover.blocks)

        async def generate(route=None, at_token_10=None):
            async for _, stats, _ in client.stream_result(ids, params, route):
                if len(stats.token_ids) == 10 and at_token_10:
                    await at_token_10()
            return stats

        async def add_replica_and_wait_for_the_move():
            # A second replica of the mover's span makes moving worth it; the mover then
            # waits for this (paused) session to move before it goes.
            nodes.extend(await asyncio.to_thread(start_nodes, [["--blocks", span, "--bootstrap", bootstrap.url, *gossip]], tmp_path / "d"))
            await asyncio.to_thread(until, mover, lambda state: state["moving"])

        quiet = asyncio.run(generate())
        asyncio.run(refresh(client))
        route = client.plan(exclude=frozenset({replica.peer_id}))
        assert mover.peer_id in route.peers
        stats = asyncio.run(generate(route, add_replica_and_wait_for_the_move))
        assert stats.token_ids == quiet.token_ids
        assert [f.how for f in stats.failovers] == ["splice"] and "draining" in stats.failovers[0].reason, stats.failovers
        moved = until(mover, lambda state: state["moves"] == 1 and not state["moving"])
        assert tuple(moved["span"]) != mover.blocks
        print(f"moving node handed its session over: stall {stats.failovers[0].stall_s:.3f} s, now serves {moved['span']}")
    finally:
        stop_nodes([bootstrap, *nodes])


def _cpu_quota(share: float, name: str):
    """A cgroup (v1 cpu controller) whose processes get `share` of one core, and the argv prefix that
    starts a process in it; None where this machine has no writable cpu cgroup. The period is short
    (4 ms) so that every step of more than a few ms is throttled, not only the occasional one."""
    import os
    from pathlib import Path

    root = Path("/sys/fs/cgroup/cpu")
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        return None, None
    group = root / name
    group.mkdir(exist_ok=True)
    period = 4000
    (group / "cpu.cfs_period_us").write_text(str(period))
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(period * share))))
    return group, ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]


def test_auto_nodes_size_their_spans_by_measured_speed(tmp_path):
    """`--blocks auto` without `--num-blocks`: a node throttled to 40% of a core (a CPU quota,
    so it honestly is that slow: it measures itself so) holds the whole model while alone. A
    full-speed node joins and takes the share its measured speed earns; the slow node then shrinks
    to the rest (the rebalancer resizes). The spans' sizes follow the speeds the nodes measured
    (their ready lines) within 2.5x, and the model stays covered."""
    import json
    import os
    import re
    import urllib.request

    import pytest

    from tests.nodes import reserve_url, start_nodes, stop_nodes

    group, prefix = _cpu_quota(0.4, f"layerswarm-test-{os.getpid()}")
    if group is None:
        pytest.skip("no writable cpu cgroup to throttle a node with")

    def info(node) -> dict:
        with urllib.request.urlopen(f"{node.url}/info", timeout=10) as response:
            return json.load(response)

    def throughput(node) -> float:
        return float(next(m.group(1) for line in node.output if (m := re.search(r"^ready .* throughput=(\S+)", line))))

    def until(predicate, timeout: float, what):
        began = time.monotonic()
        while not (value := predicate()):
            assert time.monotonic() - began < timeout, what()
            time.sleep(0.2)  # other processes' state: polled, there is no event to await
        return value

    # A throttled node's event loop is slow too (a quarter core, on a box shared with other tests):
    # records live longer and proofs of new peers get more time than elsewhere in this module.
    gossip = ["--gossip-period", "0.3", "--record-ttl", "15", "--proof-timeout", "20"]
    auto = ["--blocks", "auto", "--rebalance-period", "1", "--min-dwell", "2", *gossip]
    port, url = reserve_url()
    nodes = start_nodes([["--no-model", *port, *gossip]], tmp_path / "b")
    try:
        nodes += start_nodes([[*auto, "--bootstrap", url]], tmp_path / "s", prefix=prefix)
        slow = nodes[-1]
        assert slow.blocks == (0, 30), "alone on a CPU without --max-memory: the whole model"
        until(lambda: slow.peer_id in _spans(url), 60, lambda: "the bootstrap peer never saw the slow node")
        nodes += start_nodes([[*auto, "--bootstrap", url]], tmp_path / "f")
        fast = nodes[-1]
        t_slow, t_fast = throughput(slow), throughput(fast)
        moved = until(lambda: (state := info(slow))["moves"] >= 1 and not state["moving"] and state, 180, lambda: f"the slow node never resized: bootstrap sees {_spans(url)}, the slow node's table {info(slow)['discovery']['peer_table']}, fast serves {info(fast)['span']}")
        spans = {slow.peer_id: tuple(moved["span"]), fast.peer_id: tuple(info(fast)["span"])}
        size_slow, size_fast = (end - start for start, end in spans.values())
        print(f"measured blocks/s: slow {t_slow:.0f}, fast {t_fast:.0f}; spans: slow {spans[slow.peer_id]}, fast {spans[fast.peer_id]}")
        assert _uncovered(spans) == 0, spans
        assert size_slow < size_fast
        ratio = (size_fast / size_slow) / (t_fast / t_slow)
        assert 1 / 2.5 < ratio < 2.5, (spans, t_slow, t_fast)
    finally:
        stop_nodes(nodes)
        group.rmdir()


def test_a_record_claiming_the_fastest_speed_cannot_make_an_auto_node_take_nothing(tmp_path):
    """Attack: a peer serving all 30 blocks signs records claiming 1e9 blocks/s (the most a
    record may say). A `--blocks auto` node joining measures itself and holds the claim within
    CLAIM_FACTOR of its own speed: it takes round(30 / (1 + CLAIM_FACTOR)) = 2 blocks, whatever
    its own speed, not the none an unbounded claim would earn it (30 / 1e9 per block/s)."""
    from tests.nodes import reserve_url, start_nodes, stop_nodes

    gossip = ["--gossip-period", "0.3", "--record-ttl", "15"]
    port, url = reserve_url()
    nodes = start_nodes([["--no-model", *port, *gossip]], tmp_path / "b")
    try:
        nodes += start_nodes([["--claim", "1e9", "--blocks", "0:30", "--threads", "1", "--bootstrap", url, *gossip]], tmp_path / "l", module="tests.claiming_node")
        liar = nodes[-1]
        began = time.monotonic()
        while liar.peer_id not in _spans(url):
            assert time.monotonic() - began < 60, "the bootstrap peer never saw the liar"
            time.sleep(0.2)  # another process's table: polled, there is no event to await
        assert next(r.throughput for r in _records(url) if r.peer_id == liar.peer_id) == 1e9
        nodes += start_nodes([["--blocks", "auto", "--bootstrap", url, *gossip]], tmp_path / "a")
        start, end = nodes[-1].blocks
        assert end - start == round(30 / (1 + CLAIM_FACTOR)) == 2
    finally:
        stop_nodes(nodes)
