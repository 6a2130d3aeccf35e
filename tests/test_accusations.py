"""Verified outputs on real nodes: sealed steps, and accusations judged by the nodes that hold the blocks.

One module-scoped swarm: a bootstrap peer, A [0,10), the LIAR [10,20) (tests/lying_node.py:
1% noise on every 3rd decode step, sealed like any output), H1 and H2 [10,20) honest, and
B [20,30). A and B do not hold [10,20): they believe a conviction only on the verdicts of
two proven peers that do. Every session here is a raw tapped chain (tests/sealed_session.py),
so the evidence is built exactly as a client builds it: from the taps.

The flood test runs on its own LAN (tests/netns.py): the attacker from its own address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time

import aiohttp
import pytest
import torch

from swarm import wire
from swarm.accusation import MAX_EVIDENCE_TOKENS, Accusation, Evidence, Verdict
from swarm.discovery.peers_http import fetch_peers
from swarm.identity import Identity
from swarm.seal import FORWARD_SESSION, Transcript, check_seal, tensor_digest
from tests.netns import Lines, beside_attacker
from tests.nodes import collect_groups, namespace_bootstrap, reserve_url, start_in_namespaces, start_nodes, stop_nodes
from tests.sealed_session import TappedChain, packed

PERIOD = ["--gossip-period", "0.5"]
COURT = ["--accusation-burst", "64"]  # every node posts from 127.0.0.1 here: the per-source budget is the flood test's
PROMPT = "Tell me about the tides of the sea."
DECODE = [504, 3575, 314]  # three decode steps: the liar lies on the third


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accusations")
    port, url = reserve_url()  # all start at once
    join = ["--bootstrap", url, *PERIOD, *COURT]
    started = []
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            groups = [
                pool.submit(start_nodes, [["--no-model", *port, *PERIOD, *COURT]], tmp / "bootstrap"),
                pool.submit(start_nodes, [["--blocks", "10:20", "--lie-every", "3", *join]], tmp / "liar", module="tests.lying_node"),
                pool.submit(start_nodes, [["--blocks", span, *join] for span in ("0:10", "10:20", "10:20", "20:30")], tmp / "honest"),
            ]
            collect_groups(groups, started)
        bootstrap, liar, a, h1, h2, b = started
        asyncio.run(_until_everyone_knows_everyone(started))
        yield {"bootstrap": bootstrap, "liar": liar, "a": a, "h1": h1, "h2": h2, "b": b}
    finally:
        stop_nodes(started)


async def _until_everyone_knows_everyone(nodes, timeout: float = 60.0) -> None:
    everyone = {n.peer_id for n in nodes}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            tables = [await _peer_ids(http, n) for n in nodes]
            if all(everyone <= table | {n.peer_id} for n, table in zip(nodes, tables)):
                return
            assert time.monotonic() < deadline, "gossip did not bring every peer to every node"
            await asyncio.sleep(0.25)


async def _peer_ids(http, node) -> set[str]:
    return {record.peer_id for record in await fetch_peers(http, node.url, 5.0)}


@pytest.fixture(scope="module")
def digest(checkpoint):
    return checkpoint.fingerprint().digest


def _hops(*nodes):
    return [(n.url, n.blocks, n.peer_id) for n in nodes]


async def _generate(http, head, digest, *nodes, dtype="bfloat16") -> TappedChain:
    """Prefill the prompt and run the decode steps through `nodes`, every hop tapped."""
    chain = TappedChain(http, _hops(*nodes), digest, dtype=dtype)
    async with chain:
        await chain.step(head.embed(head.encode_prompt(PROMPT, chat=True)))
        for token in DECODE:
            await chain.step(head.embed([token]))
    return chain


async def _accuse(http, node, accusation: Accusation, verdicts=None) -> tuple[int, dict]:
    body = accusation.to_wire() if verdicts is None else {**accusation.to_wire(), "verdicts": verdicts}
    async with http.post(f"{node.url}/accusations", data=wire.encode(body), headers={"Content-Type": "application/msgpack"}) as response:
        return response.status, wire.decode(await response.read())


async def _cases(http, node) -> dict:
    async with http.get(f"{node.url}/accusations") as response:
        return await response.json()


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


# --- seals ----------------------------------------------------------------------------------


async def test_seals_of_real_nodes_replay_and_verify(swarm, head, digest):
    async with aiohttp.ClientSession() as http:
        chain = await _generate(http, head, digest, swarm["a"], swarm["h1"], swarm["b"])
        for hop in chain.hops:
            transcript = Transcript(digest, hop.blocks, hop.session, hop.peer_id)
            for (step, position), given, sent, seal in zip(hop.steps, hop.inputs, hop.outputs, hop.seals):
                d = transcript.update(step, position, tensor_digest(given["dtype"], given["shape"], given["data"]), tensor_digest(sent["dtype"], sent["shape"], sent["data"]))
                assert check_seal(hop.public_key, seal, d)  # every step's seal: the chain up to it
            chain.accusation(chain.hops.index(hop), Identity.generate()).check()  # and the evidence a client would build
        # an output altered after sealing no longer verifies
        hop = chain.hops[1]
        bent = bytearray(hop.outputs[-1]["data"])
        bent[0] ^= 1
        transcript = Transcript(digest, hop.blocks, hop.session, hop.peer_id)
        for (step, position), given, sent in zip(hop.steps, hop.inputs, hop.outputs[:-1] + [{**hop.outputs[-1], "data": bytes(bent)}]):
            d = transcript.update(step, position, tensor_digest(given["dtype"], given["shape"], given["data"]), tensor_digest(sent["dtype"], sent["shape"], sent["data"]))
        assert not check_seal(hop.public_key, hop.seals[-1], d)

        # POST /forward answers are sealed too: a one-step transcript, session "forward"
        x = head.embed(head.encode_prompt(PROMPT, chat=True))
        given = packed(x, "bfloat16")
        body = wire.encode({"type": "forward", "model": digest, "blocks": [12, 17], "hidden": given})
        async with http.post(f"{swarm['h1'].url}/forward", data=body) as response:
            answer = wire.decode(await response.read())
        assert answer["peer_id"] == swarm["h1"].peer_id
        sent = answer["hidden"]
        transcript = Transcript(digest, (12, 17), FORWARD_SESSION, swarm["h1"].peer_id)
        d = transcript.update(0, 0, tensor_digest(given["dtype"], given["shape"], given["data"]), tensor_digest(sent["dtype"], sent["shape"], sent["data"]))
        assert check_seal(chain.hops[1].public_key, answer["seal"], d)


# --- a liar caught --------------------------------------------------------------------------


async def test_a_liars_sealed_lie_convicts_it_on_holders_and_on_others_by_quorum(swarm, head, digest):
    liar, h1, a, b = swarm["liar"], swarm["h1"], swarm["a"], swarm["b"]
    client = Identity.generate()
    async with aiohttp.ClientSession() as http:
        chain = await _generate(http, head, digest, a, liar, b)
        honest_prefix = chain.accusation(1, client, steps=3)  # prefill and two decode steps: no lie yet
        accusation = chain.accusation(1, client)  # the third decode step is a lie, sealed
        accusation.check()

        # A does not hold [10,20): without verdicts it believes nothing, nor on a stranger's verdict
        stranger = Identity.generate()
        status, answer = await _accuse(http, a, accusation, [Verdict.sign(stranger, accusation.digest()).to_wire()])
        assert status == 200 and answer["status"] == "unproven" and not answer["convicted"], answer
        assert liar.peer_id in await _peer_ids(http, a)

        # H1 holds the blocks: it re-runs the evidence and convicts
        status, answer = await _accuse(http, h1, accusation)
        assert status == 200 and answer["convicted"] and answer["error"] > 0.005, answer
        assert liar.peer_id not in await _peer_ids(http, h1)

        # H1 passed it on: H2 re-checked it itself, and A, B and the bootstrap peer believed
        # it once two proven holders' verdicts were in
        async def everyone_convicted() -> bool:
            for node in (swarm["h2"], a, b, swarm["bootstrap"]):
                known = {case["accused"]: case for case in (await _cases(http, node))["accusations"]}
                if not known.get(liar.peer_id, {}).get("convicted"):
                    return False
            return True

        await _until(everyone_convicted)
        for node in (swarm["h2"], a, b):
            case = next(c for c in (await _cases(http, node))["accusations"] if c["accused"] == liar.peer_id)
            assert case["verdicts"] >= 2, case
        h2_case = next(c for c in (await _cases(http, swarm["h2"]))["accusations"] if c["accused"] == liar.peer_id)
        assert h2_case["error"] is not None and h2_case["error"] > 0.005  # its own re-run
        for node in (swarm["h2"], a, b, swarm["bootstrap"]):
            assert liar.peer_id not in await _peer_ids(http, node)

        # The honest prefix of the same transcript convicts nobody (and the charge bars its accuser)
        status, answer = await _accuse(http, swarm["h2"], honest_prefix)
        assert status == 200 and answer["acquitted"] and not answer["convicted"] and answer["error"] < 0.005, answer

        # the liar stays out: gossip does not bring it back, and nobody pushes to it
        await asyncio.sleep(1.5)  # three gossip rounds
        for node in (h1, a, b):
            assert liar.peer_id not in await _peer_ids(http, node)
        with pytest.raises(RuntimeError, match="convicted"):
            async with TappedChain(http, _hops(a, liar, b), digest):
                pass
        async with aiohttp.ClientSession() as other:
            info = await (await other.get(f"{h1.url}/info")).json()
        assert info["accusations"]["convicted"] >= 1

    # `swarm peers` shows it: the liar out of the listing, convicted; the others proven, dialled, not private
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "client.cli", "peers", "--insecure-http", "--bootstrap", swarm["bootstrap"].url, "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    view = json.loads(shown.stdout)
    assert liar.peer_id in view["convicted"] and liar.peer_id not in {p["peer_id"] for p in view["peers"]}
    listed = {p["peer_id"]: p for p in view["peers"]}
    assert {h1.peer_id, a.peer_id, b.peer_id} <= set(listed)
    assert all(p["proven"] and p["pinned"] == "http" and p["private"] is False for p in listed.values()), listed


# --- false and forged accusations ------------------------------------------------------------


async def test_a_forged_accusation_is_refused_and_convicts_nobody(swarm, head, digest):
    h1, h2 = swarm["h1"], swarm["h2"]
    async with aiohttp.ClientSession() as http:
        chain = await _generate(http, head, digest, swarm["a"], h1, swarm["b"])
        sealed = chain.accusation(1, Identity.generate())
        last = sealed.steps[-1]
        bent = torch.frombuffer(bytearray(last.output["data"]), dtype=torch.bfloat16).view(last.output["shape"]).clone()
        bent[0, 0] += 1.0  # an honest node's output, altered after it sealed it
        steps = (*sealed.steps[:-1], Evidence(last.step, last.position, last.input, packed(bent, "bfloat16")))
        forged = Accusation(sealed.model, sealed.blocks, sealed.session, sealed.accused, steps, sealed.seal).signed_by(Identity.generate())
        before = await _cases(http, h2)
        status, answer = await _accuse(http, h2, forged)
        assert (status, answer["type"], answer["code"]) == (403, "error", "signature_invalid"), answer
        after = await _cases(http, h2)
        assert after["convicted"] == before["convicted"] and len(after["accusations"]) == len(before["accusations"])
        assert h1.peer_id in await _peer_ids(http, h2)


async def test_an_accusation_of_honest_outputs_convicts_nobody_and_marks_the_accuser(swarm, head, digest):
    h1, h2 = swarm["h1"], swarm["h2"]
    accuser = Identity.generate()
    async with aiohttp.ClientSession() as http:
        chain = await _generate(http, head, digest, swarm["a"], h1, swarm["b"])
        status, answer = await _accuse(http, h2, chain.accusation(1, accuser))
        assert status == 200 and answer["acquitted"] and not answer["convicted"], answer
        assert answer["error"] < 0.005 and answer["accused"] == h1.peer_id
        assert h1.peer_id in await _peer_ids(http, h2)
        # the accuser is refused for a while, whatever it brings next
        status, answer = await _accuse(http, h2, chain.accusation(1, accuser, steps=2))
        assert (status, answer["code"]) == (403, "not_permitted"), answer
        # and a charge against the node itself is not its to judge
        status, answer = await _accuse(http, h1, chain.accusation(1, Identity.generate()))
        assert (status, answer["code"]) == (403, "not_permitted"), answer


# --- transcripts that rewind (speculative decoding) ----------------------------------------------


async def test_a_transcript_that_rewinds_is_judged_on_real_blocks(swarm, head, digest):
    """Speculation's steps start at the first rejected draft, overwriting from there. A holder re-runs
    such a transcript as its final sequence: an honest hop's is acquitted. Evidence that rewinds over
    the same positions past MAX_EVIDENCE_TOKENS in all is refused whole (bad_request), judged by nobody."""
    h1, h2 = swarm["h1"], swarm["h2"]
    async with aiohttp.ClientSession() as http:
        chain = TappedChain(http, _hops(swarm["a"], h1, swarm["b"]), digest)
        async with chain:
            prompt = head.encode_prompt(PROMPT, chat=True)
            n = len(prompt)
            await chain.step(head.embed(prompt))
            await chain.step(head.embed([504, 3575, 314, 28]))  # positions n..n+3
            await chain.step(head.embed([3575, 9, 11]), position=n + 1)  # two drafts rejected
            await chain.step(head.embed([6]), position=n + 3)  # one more
        accusation = chain.accusation(1, Identity.generate())
        assert accusation.length == n + 4 and accusation.tokens == n + 8
        status, answer = await _accuse(http, h2, accusation)
        assert status == 200 and answer["acquitted"] and not answer["convicted"] and answer["error"] < 0.005, answer

        before = await _cases(http, h2)
        rows = packed(torch.zeros(128, head.config.hidden_size), "bfloat16")
        steps = tuple(Evidence(i, 0, rows, rows) for i in range(MAX_EVIDENCE_TOKENS // 128 + 1))  # 128 positions, 4224 tokens
        hostile = Accusation(digest, (10, 20), "s1", Identity.generate().public_key_bytes, steps, bytes(64)).signed_by(Identity.generate())
        status, answer = await _accuse(http, h2, hostile)
        assert (status, answer["code"]) == (400, "bad_request") and "tokens in all" in answer["message"], answer
        after = await _cases(http, h2)
        assert len(after["accusations"]) == len(before["accusations"]) and after["rechecking"] == 0


# --- a flood from one source ----------------------------------------------------------------


def test_a_flood_of_accusations_from_one_source_is_busy_and_a_client_is_undisturbed(lan_factory, tmp_path):
    lan = lan_factory(3)
    home, user, stranger = lan.hosts
    nodes = []

    def legit() -> dict:
        client = lan.run_in(user, [sys.executable, "-m", "tests.starvation_parties", "legit", bootstrap.url, "16"], stderr=subprocess.STDOUT)
        line = Lines(client.stdout).expect(lambda line: line.startswith("{"), 180)
        assert client.wait(30) == 0
        return json.loads(line)

    try:
        first, url = namespace_bootstrap(home)  # all three start at once
        bootstrap, accused, judge = start_in_namespaces([(home, first), *((home, ["--blocks", "0:30", "--bootstrap", url]) for _ in range(2))], tmp_path, nodes)
        undisturbed = legit()
        argv = [sys.executable, "-m", "tests.accusation_flood", accused.url, accused.peer_id, judge.url]
        disturbed, seen = beside_attacker(lan, stranger, argv, legit)
    finally:
        stop_nodes(nodes)
    print(f"accusation flood: undisturbed {undisturbed['seconds']:.2f} s, under flood {disturbed['seconds']:.2f} s; attacker saw {seen}")
    assert disturbed["tokens"] == undisturbed["tokens"]
    assert disturbed["seconds"] <= 3 * undisturbed["seconds"] + 5, (undisturbed, disturbed)
    answers = seen["answers"]
    assert answers.get("busy", 0) >= 10 and set(answers) <= {"busy", "acquitted", "rechecking"}, seen
    # re-runs: the source's burst (4) and one per 10 s after it, however many it sent
    assert seen["court"]["acquitted"] <= 4 + seen["seconds"] / 10 + 1, seen
    assert seen["court"]["convicted"] == 0, seen
    assert seen["slowest_busy_s"] < 5.0, seen
