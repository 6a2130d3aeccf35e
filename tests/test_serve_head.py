"""`swarm-node --serve-head`: the last hop applies the LM head and answers only the top-K candidates.

One module-scoped swarm of real node processes (default model, float32): a
bootstrap peer, [0, 15) (given --serve-head, which it ignores), [15, 30) with --serve-head,
and [15, 30) without it. A lying head node joins for one test.
Tests run in file order; the last one kills the head-serving node.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import secrets
import time
import urllib.request

import aiohttp
import pytest
import torch

from client.generate import GenerationStats
from client.planner import ClientConfig
from client.remote_head import Candidates, HeadTape, head_request, remote_head_config, wrong_candidates
from client.sampling import Sampler, SamplingParams
from client.session import RemoteHop, RouteSession, SessionConfig, hop_of
from client.verify import Verdict
from node import head_service
from node.compute import MainThreadExecutor
from node.head_service import HeadService, load_lm_head, with_head
from swarm import wire
from swarm.errors import BadRequest, PeerUnavailable, RecordRejected, SignatureInvalid
from swarm.head_protocol import MAX_HEAD_ROWS, HeadResult, parse_session
from swarm.identity import Identity
from swarm.protocol import MAX_HEAD_K, Error, Open, Result
from swarm.records import PeerRecord, verify_record
from tests.nodes import refresh, reserve_url, start_nodes, stop_nodes, swarm_client
from tests.test_node import Raw

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 24
LOGPROB_TOLERANCE = 1e-4  # nats: the node's logsumexp vs the client's log_softmax, both float32 on one CPU


# --- the pure parts: records, messages, candidates ---------------------------------------------

ID = Identity.generate()
MODEL = {"architecture": "llama", "shape": "30x576", "digest": "d" * 32}


def _record(span=(15, 30), serves_head=False) -> PeerRecord:
    return PeerRecord.create(
        ID,
        addresses=("http://127.0.0.1:7001",),
        now=time.time(),
        ttl=60,
        model=MODEL,
        num_layers=30,
        span=span,
        serves_head=serves_head,
    )


def test_serves_head_is_signed_and_on_the_wire_only_when_true():
    plain, serving = _record(), _record(serves_head=True)
    assert "serves_head" not in plain.to_wire(), "records of nodes without the head encode as before the field existed"
    back = PeerRecord.from_bytes(serving.to_bytes())
    verify_record(back, time.time())
    assert back.serves_head and back == serving
    forged = plain.to_wire() | {"serves_head": True}  # a relay adding the claim: the signature does not cover it
    with pytest.raises(SignatureInvalid):
        verify_record(PeerRecord.from_wire(forged), time.time())
    for value in (False, 1, "yes", None):  # one encoding per record: absent, or true
        with pytest.raises(RecordRejected):
            PeerRecord.from_wire(plain.to_wire() | {"serves_head": value})
    with pytest.raises(RecordRejected):
        PeerRecord.from_wire(plain.to_wire() | {"serves_heads": True})  # still no unknown keys
    with pytest.raises(RecordRejected):
        _record(span=(10, 20), serves_head=True)  # only a peer holding the last block


def _open(**head) -> dict:
    return Open("s1", (15, 30), 16, "float32", "d" * 32, secrets.token_bytes(16), secrets.token_urlsafe(16)).to_wire() | head


def test_open_carries_k_and_refuses_any_other_value():
    assert Open.from_wire(_open()).head == 0 and "head" not in _open()
    assert Open.from_wire(_open(head=64)).head == 64
    assert Open.from_wire(wire.decode(wire.encode(_open(head=MAX_HEAD_K)))).head == MAX_HEAD_K
    for value in (0, -1, MAX_HEAD_K + 1, 2**63, "64", 64.0, True, None, [64], b"\x40"):
        with pytest.raises(BadRequest):
            Open.from_wire(_open(head=value))


def _head_result(ids, logits, lse) -> dict:
    """A head_result on the wire: ids, logits [K] (one row) or [T, K]; lse a float (one row) or [T]."""
    ids, logits = torch.tensor(ids).reshape(-1, len(ids[-1]) if isinstance(ids[0], list) else len(ids)), torch.tensor(logits)
    logits, lse = logits.reshape(ids.shape), torch.tensor(lse, dtype=torch.float32).reshape(-1)
    hidden = torch.zeros(ids.shape[0], 4)
    message = HeadResult("s1", 3, (15, 30), 1.0, 2.0, 1, bytes(64), hidden, "float32", ids, logits, lse).to_wire()
    return wire.decode(wire.encode(message))


def test_a_head_result_round_trips_and_is_checked_whole():
    back = parse_session(_head_result([5, 1, 9], [3.0, 2.0, -1.0], 4.5))
    assert (
        isinstance(back, HeadResult)
        and back.ids.tolist() == [[5, 1, 9]]
        and back.logits.tolist() == [[3.0, 2.0, -1.0]]
        and back.logsumexp.tolist() == [4.5]
    )
    rows = parse_session(_head_result([[5, 1], [1, 5], [7, 2]], [[3.0, 2.0], [1.0, 0.5], [0.0, -1.0]], [4.5, 2.0, 1.0]))
    assert rows.ids.tolist() == [[5, 1], [1, 5], [7, 2]] and rows.logsumexp.tolist() == [4.5, 2.0, 1.0]
    assert rows.hidden.shape == (3, 4)
    good = _head_result([5, 1, 9], [3.0, 2.0, -1.0], 4.5)
    two = _head_result([[5, 1], [1, 5]], [[3.0, 2.0], [1.0, 0.5]], [4.5, 2.0])
    many = MAX_HEAD_ROWS + 1
    bad = [
        two | {"logsumexp": two["logsumexp"][:4]},  # one logsumexp for two rows
        two | {"ids": two["ids"][:12], "logits": two["logits"][:12]},  # 3 values: not K per row
        two | {"hidden": good["hidden"]},  # candidates of two rows for one row sent
        _head_result([[5, 1], [1, 1]], [[3.0, 2.0], [1.0, 0.5]], [4.5, 2.0]),  # an id twice in the second row
        _head_result([[5, 1], [1, 5]], [[3.0, 2.0], [0.5, 1.0]], [4.5, 2.0]),  # the second row ascending
        _head_result([[5, 1], [1, 5]], [[3.0, 2.0], [1.0, 0.5]], [4.5, 0.9]),  # the second lse below its top logit
        _head_result([[5, 1], [1, 5]], [[3.0, 2.0], [1.0, 0.5]], [4.5, float("nan")]),
        _head_result([[1]] * many, [[0.0]] * many, [1.0] * many),  # more rows than a head_result answers
    ]
    for message in bad:
        with pytest.raises(BadRequest):
            parse_session(message)
    bad = [
        good | {"ids": good["ids"][:8]},  # fewer ids than logits
        good | {"ids": b""},  # no candidates
        good | {"ids": bytes(4 * (MAX_HEAD_K + 1)), "logits": bytes(4 * (MAX_HEAD_K + 1))},  # over the cap
        _head_result([5, 1, 9], [2.0, 3.0, -1.0], 4.5),  # not descending
        _head_result([5, 5, 9], [3.0, 2.0, -1.0], 4.5),  # an id twice
        _head_result([5, -1, 9], [3.0, 2.0, -1.0], 4.5),  # a negative id
        _head_result([5, 1, 9], [float("nan"), 2.0, -1.0], 4.5),
        _head_result([5, 1, 9], [3.0, 2.0, -1.0], 2.5),  # logsumexp below the largest logit
        good | {"logsumexp": torch.tensor([float("inf")]).numpy().tobytes()},
        good | {"logsumexp": 4.5},  # not bytes
        good | {"extra": 1},
        {k: v for k, v in good.items() if k != "logsumexp"},
    ]
    for message in bad:
        with pytest.raises(BadRequest):
            parse_session(message)


def test_candidates_sample_like_the_full_logits(head):
    """Greedy exact, logprobs exact for candidates, top_k <= K the same draws from one seed."""
    full = torch.randn(head.config.vocab_size, generator=torch.Generator().manual_seed(1)) * 3
    values, ids = torch.topk(full, 64)
    candidates = Candidates.one(ids, values, float(torch.logsumexp(full, 0)), full.numel())
    with pytest.raises(BadRequest):
        Candidates.of(_as_message(ids + full.numel(), values, candidates.logsumexp), full.numel())
    assert len(candidates) == 1 and torch.equal(candidates.row(-1).ids, candidates.ids)
    dense = candidates.dense()
    history = [int(ids[0]), 3, 4]
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=40, seed=3),
        SamplingParams(temperature=1.0, top_k=64, seed=5),
    ):
        a, b = Sampler(params), Sampler(params)
        assert [a(full, history) for _ in range(20)] == [b(dense, history) for _ in range(20)]
    logprobs = torch.log_softmax(full, 0)
    logprob, best = candidates.logprobs(int(ids[7]), 5)
    assert abs(logprob - float(logprobs[ids[7]])) <= LOGPROB_TOLERANCE
    assert [i for i, _ in best] == torch.topk(logprobs, 5).indices.tolist()
    nucleus = Sampler(SamplingParams(temperature=1.5, top_p=0.99, seed=2))
    assert all(int(nucleus(dense, [])) in set(ids.tolist()) for _ in range(50)), "top_p samples among the candidates"


def _as_message(ids, logits, lse) -> HeadResult:
    return HeadResult("s1", 0, (15, 30), 0.0, 0.0, 1, bytes(64), torch.zeros(1, 4), "float32", ids.reshape(1, -1), logits.reshape(1, -1), lse)


def test_candidates_of_several_rows_give_each_row_alone():
    rows = torch.randn(3, 500, generator=torch.Generator().manual_seed(6)) * 3
    values, ids = torch.topk(rows, 20, dim=1)
    many = Candidates(ids, values, torch.logsumexp(rows, 1), 500)
    assert len(many) == 3
    for i in range(3):
        one = many.row(i)
        assert len(one) == 1 and torch.equal(one.dense()[ids[i]], values[i]) and wrong_candidates(rows[i], one) is None
        logprob, _ = one.logprobs(int(ids[i, 3]), 2)
        assert abs(logprob - float(torch.log_softmax(rows[i], 0)[ids[i, 3]])) <= LOGPROB_TOLERANCE
    with pytest.raises(ValueError):
        many.dense()  # one row at a time
    with pytest.raises(IndexError):
        many.row(3)


def test_the_nodes_head_gives_the_clients_logits(checkpoint, head):
    """Same dtype, same device: the node's candidates are the client's own logits' top K, bit for bit."""
    lm_head = load_lm_head(checkpoint, torch.float32, torch.device("cpu"))
    hidden = torch.randn(1, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    top = lm_head.top(hidden, 64)
    logits = head.logits(hidden)[0]
    values, ids = torch.topk(logits, 64)
    assert torch.equal(top.ids, ids) and torch.equal(top.logits, values)
    assert top.logsumexp == float(torch.logsumexp(logits, 0))


def test_the_head_check_catches_hidden_tokens_and_reweighting():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 4
    values, ids = torch.topk(logits, 64)
    honest = Candidates.one(ids, values, float(torch.logsumexp(logits, 0)), 1000)
    assert wrong_candidates(logits, honest) is None
    bf16 = logits.to(torch.bfloat16).float()  # a bf16 GPU head's rounding passes
    assert wrong_candidates(bf16, honest) is None
    lse = float(honest.logsumexp[0])
    hidden = Candidates.one(ids[1:], values[1:], lse, 1000)  # the likeliest token left out
    assert "left out" in wrong_candidates(logits, hidden)
    scaled = Candidates.one(ids, values * 1.2, lse, 1000)  # the distribution sharpened
    assert "off by" in wrong_candidates(logits, scaled)
    assert "logsumexp" in wrong_candidates(logits, Candidates.one(ids, values, lse + 1.0, 1000))


def test_the_head_tape_keeps_a_bounded_uniform_sample():
    hop = RemoteHop("http://127.0.0.1:7001", 15, 30, ID.peer_id)
    tape = HeadTape(keep=4, rng=random.Random(0))
    answer = Candidates.one(torch.tensor([1]), torch.tensor([0.0]), 0.0, 8)
    for step in range(100):
        tape.add(hop, torch.full((1, 2), float(step)), answer)
    assert tape.seen == 100 and len(tape.steps) == 4
    assert max(int(h[0, 0]) for _, h, _ in tape.steps) >= 4, "later steps replace earlier ones"


def test_the_head_tape_checks_each_row_of_a_step():
    """A step of several rows is kept row by row; a lie in one row of it is caught."""
    hop = RemoteHop("http://127.0.0.1:7001", 15, 30, ID.peer_id)
    weight = torch.randn(6, 300, generator=torch.Generator().manual_seed(8))
    hidden = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    logits = hidden @ weight
    values, ids = torch.topk(logits, 20, dim=1)
    tape = HeadTape(keep=8)
    tape.add(hop, hidden, Candidates(ids, values, torch.logsumexp(logits, 1), 300))
    assert tape.seen == 4 and tape.check(lambda h: h @ weight) is None
    liar = HeadTape(keep=8)
    top = torch.topk(logits[2], 21)
    ids[2], values[2] = top.indices[1:], top.values[1:]  # row 2 hides its likeliest token
    liar.add(hop, hidden, Candidates(ids, values, torch.logsumexp(logits, 1), 300))
    assert liar.check(lambda h: h @ weight) is not None


def test_a_head_product_of_many_rows_runs_in_chunks(checkpoint, monkeypatch):
    lm_head = load_lm_head(checkpoint, torch.float32, torch.device("cpu"))
    rows = torch.randn(5, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(3))
    whole = lm_head.top_batch(rows, [20] * 5)
    monkeypatch.setattr(head_service, "HEAD_CHUNK_ROWS", 2)
    for a, b in zip(whole, lm_head.top_batch(rows, [20] * 5), strict=True):
        assert torch.equal(a.ids, b.ids) and torch.allclose(a.logits, b.logits, atol=1e-4)


async def test_the_head_service_runs_one_product_for_the_steps_of_one_turn(checkpoint):
    lm_head = load_lm_head(checkpoint, torch.float32, torch.device("cpu"))
    service = HeadService(lm_head)
    rows = torch.randn(5, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(2))
    answers = await asyncio.gather(*(service.top(rows[i : i + 1], 20 + i) for i in range(5)))
    assert (service.batches, service.served) == (1, 5)
    for i, (answer,) in enumerate(answers):
        alone = lm_head.top(rows[i : i + 1], 20 + i)
        assert torch.equal(answer.ids, alone.ids) and answer.ids.numel() == 20 + i
        assert torch.allclose(answer.logits, alone.logits, atol=1e-4) and abs(answer.logsumexp - alone.logsumexp) < 1e-4
    await service.top(rows[:1], 20)
    assert (service.batches, service.served) == (2, 6), "a step alone is a batch of its own"
    # steps of several rows (speculation's output "all") share the product with one-row steps
    many, one = await asyncio.gather(service.top(rows[:4], 24), service.top(rows[4:], 20))
    assert (service.batches, service.served, service.rows) == (3, 8, 1 + 5 + 5)
    assert len(many) == 4 and len(one) == 1 and torch.equal(one[0].ids, lm_head.top(rows[4:], 20).ids)
    for i, answer in enumerate(many):
        assert torch.equal(answer.ids, lm_head.top(rows[i : i + 1], 24).ids)


async def test_a_head_asked_of_a_stopped_compute_thread_answers_shutting_down(checkpoint):
    executor = MainThreadExecutor()
    executor.shutdown()
    service = HeadService(load_lm_head(checkpoint, torch.float32, torch.device("cpu")), executor)
    hidden = torch.zeros(1, checkpoint.config.hidden_size)
    answer = await with_head(service, Result("s1", 4, (15, 30), 1.0, 1.0, 1, bytes(64), hidden), 20)
    assert isinstance(answer, Error) and (answer.code, answer.session, answer.step) == ("shutting_down", "s1", 4)


def test_which_hop_is_asked_for_the_head():
    serving, plain = _record(serves_head=True), _record()
    hop = RemoteHop("http://127.0.0.1:7001", 15, 30, ID.peer_id)
    assert head_request("always", 64, 49152, hop, serving, last=True) == 64
    assert head_request("never", 64, 49152, hop, serving, last=True) == 0
    assert head_request("always", 64, 0, hop, serving, last=True) == 0  # vocabulary unknown: never asked
    assert head_request("always", 64, 49152, hop, plain, last=True) == 0
    assert head_request("always", 64, 49152, hop, None, last=True) == 0
    assert head_request("always", 64, 49152, hop, serving, last=False) == 0  # a splice's hop before the rest
    assert head_request("always", 64, 49152, RemoteHop(hop.url, 15, 20, ID.peer_id), serving, last=True) == 0
    assert remote_head_config(ClientConfig(), "cpu", 10).session.remote_head == "always"
    assert remote_head_config(ClientConfig(), "cuda", 10).session.remote_head == "never"
    never = ClientConfig(session=SessionConfig(remote_head="never"))
    assert remote_head_config(never, "cpu", 10).session.remote_head == "never"
    for session in (
        SessionConfig(remote_head="sometimes"),
        SessionConfig(head_candidates=5),
        SessionConfig(head_candidates=MAX_HEAD_K + 1),
    ):
        with pytest.raises(ValueError):
            remote_head_config(ClientConfig(session=session), "cpu", 10)


def test_remote_head_flag_reaches_the_client():
    from client.cli import _swarm_model, build_parser

    parser = build_parser()
    for argv in (["generate", "hi"], ["chat"], ["serve"]):
        assert parser.parse_args(argv).remote_head == "auto"
    args = parser.parse_args(
        ["generate", "hi", "--remote-head", "never", "--device", "cpu", "--bootstrap", "http://127.0.0.1:9", "--insecure-http"]
    )
    assert _swarm_model(args).config.session.remote_head == "never"
    args = parser.parse_args(["generate", "hi", "--device", "cpu", "--bootstrap", "http://127.0.0.1:9", "--insecure-http"])
    assert _swarm_model(args).config.session.remote_head == "always", "auto: a CPU head asks"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--remote-head", "sometimes"])


# --- real nodes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """(bootstrap, first [0,15) (ignoring --serve-head), head [15,30) --serve-head, plain [15,30))."""
    tmp = tmp_path_factory.mktemp("servehead")
    port, url = reserve_url()
    common = ["--bootstrap", url, "--gossip-period", "0.5"]
    # The first node is given --serve-head too: it does not hold the last block, so it ignores it.
    specs = [
        ["--blocks", "0:15", "--serve-head", *common],
        ["--blocks", "15:30", "--serve-head", *common],
        ["--blocks", "15:30", *common],
    ]
    *nodes, bootstrap = start_nodes(
        [*specs, ["--no-model", *port, "--gossip-period", "0.5", "--identity", str(tmp / "bootstrap.key")]], tmp
    )
    yield bootstrap, *nodes
    stop_nodes([bootstrap, *nodes])


def _client(swarm, remote_head: str):
    bootstrap = swarm[0]
    config = ClientConfig(wire_dtype="float32", verify_fraction=0.0, session=SessionConfig(remote_head=remote_head))
    return swarm_client(bootstrap.url, config=config)


@pytest.fixture(scope="module")
def remote(swarm):
    return _client(swarm, "always")


@pytest.fixture(scope="module")
def local(swarm):
    return _client(swarm, "never")


def _info(node) -> dict:
    with urllib.request.urlopen(f"{node.url}/info", timeout=10) as response:
        return json.load(response)


def _route(client, nodes, last):
    """The client's route through nodes[0] then `last`."""
    asyncio.run(refresh(client))
    others = frozenset(n.peer_id for n in nodes if n is not nodes[0] and n is not last)
    route = client.plan(exclude=others)
    assert route.peers == (nodes[0].peer_id, last.peer_id)
    return route


async def _run(client, route, params: SamplingParams, at_token: dict | None = None):
    """(tokens, stats) of one generation along `route`, calling at_token[n]() once n tokens have come."""
    ids, stats, tokens, at_token = client.head.encode_prompt(PROMPT, chat=True), GenerationStats(), [], at_token or {}
    async for token in client.stream_generation(ids, params, stats, route):
        if token.id is not None:
            tokens.append(token)
            action = at_token.pop(len(tokens), None)
            if action is not None:
                action()
    return tokens, stats


async def _generate(client, route, params: SamplingParams):
    return (await _run(client, route, params))[0]


def test_the_record_says_which_node_serves_the_head(swarm):
    _, first, head, plain = swarm
    records = {n.peer_id: PeerRecord.from_bytes(base64.b64decode(_info(n)["record"])) for n in (first, head, plain)}
    assert [records[n.peer_id].serves_head for n in (first, head, plain)] == [False, True, False]
    assert _info(head)["serves_head"] is True
    assert _info(first)["serves_head"] is False and any("--serve-head ignored" in line for line in first.output)


def test_greedy_text_with_the_remote_head_equals_the_local_head(swarm, remote, local):
    _, _, head, _ = swarm
    # One-token steps: a speculative round whose draft is kept scores two tokens in one head step
    # (whether one is kept depends on the adaptive policy's timings), and this counts head steps.
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False, speculate=False)
    served = _info(head)["head_steps"]
    by_node = asyncio.run(_generate(remote, _route(remote, swarm[1:], head), params))
    assert _info(head)["head_steps"] - served == NEW_TOKENS, "every token's head ran on the node"
    by_client = asyncio.run(_generate(local, _route(local, swarm[1:], head), params))
    assert _info(head)["head_steps"] - served == NEW_TOKENS, "a client that says never applies its own head"
    assert [t.id for t in by_node] == [t.id for t in by_client]
    assert "".join(t.text for t in by_node) == "".join(t.text for t in by_client)


def test_logprobs_from_candidates_agree_with_the_local_head(swarm, remote, local):
    _, _, head, _ = swarm
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False, logprobs=5)
    by_node = asyncio.run(_generate(remote, _route(remote, swarm[1:], head), params))
    by_client = asyncio.run(_generate(local, _route(local, swarm[1:], head), params))
    assert [t.id for t in by_node] == [t.id for t in by_client]
    for a, b in zip(by_node, by_client):
        assert abs(a.logprob - b.logprob) <= LOGPROB_TOLERANCE
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs)) <= LOGPROB_TOLERANCE


def test_concurrent_sessions_through_the_head_node_get_their_own_texts(swarm, remote, local):
    """Four generations at once through one head node (their heads may share a product): each text is
    the one the client's own head gives."""
    _, _, head, _ = swarm
    prompts = ["Name a color.", "Count to five.", "What is the capital of France?", "Say hello in Spanish."]
    params = {"max_new_tokens": 8, "stop_at_eos": False, "speculate": False}  # one head step a token, counted below

    async def texts(client, route):
        return [r.text for r in await asyncio.gather(*(client.agenerate(p, route=route, **params) for p in prompts))]

    route = _route(remote, swarm[1:], head)
    before = _info(head)
    by_node = asyncio.run(texts(remote, route))
    after = _info(head)
    assert after["head_steps"] - before["head_steps"] == 4 * 8
    assert by_node == asyncio.run(texts(local, _route(local, swarm[1:], head)))


def test_sampling_with_top_k_within_the_candidates_is_reproducible(swarm, remote, local):
    """top_k <= K samples from exactly the same distribution: with one seed, the same tokens."""
    _, _, head, _ = swarm
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False, temperature=0.8, top_k=40, seed=7)
    by_node = asyncio.run(_generate(remote, _route(remote, swarm[1:], head), params))
    by_client = asyncio.run(_generate(local, _route(local, swarm[1:], head), params))
    assert [t.id for t in by_node] == [t.id for t in by_client]


async def _open_head(node, digest, blocks, **head):
    async with aiohttp.ClientSession() as http, Raw(http, node.url) as raw:
        return await raw.open(secrets.token_urlsafe(8), digest, blocks, **head)


def test_a_node_without_serve_head_refuses_the_head_with_a_typed_error(swarm, checkpoint):
    _, _, _, plain = swarm
    digest = checkpoint.fingerprint().digest
    answer = asyncio.run(_open_head(plain, digest, (15, 30), head=64))
    assert (answer["type"], answer["code"]) == ("error", "head_not_served"), answer
    assert asyncio.run(_open_head(plain, digest, (15, 30)))["type"] == "opened"


@pytest.mark.parametrize(
    "blocks, head, code",
    [
        ((15, 30), 0, "bad_request"),
        ((15, 30), -1, "bad_request"),
        ((15, 30), MAX_HEAD_K + 1, "bad_request"),
        ((15, 30), 2**64 - 1, "bad_request"),
        ((15, 30), "64", "bad_request"),
        ((15, 30), 64.0, "bad_request"),
        ((15, 30), True, "bad_request"),
        ((15, 30), None, "bad_request"),
        ((15, 30), [64], "bad_request"),
        ((15, 20), 64, "head_not_served"),  # a session that does not end at the last block
    ],
)
def test_hostile_head_requests_are_refused_whole(swarm, checkpoint, blocks, head, code):
    _, _, node, _ = swarm
    before = _info(node)
    answer = asyncio.run(_open_head(node, checkpoint.fingerprint().digest, blocks, head=head))
    assert (answer["type"], answer["code"]) == ("error", code), answer
    after = _info(node)
    assert after["sessions_opened"] == before["sessions_opened"], "a refused open opens nothing"


def test_the_node_keeps_serving_the_head_after_hostile_requests(swarm, remote, local):
    _, _, head, _ = swarm
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    assert [t.id for t in asyncio.run(_generate(remote, _route(remote, swarm[1:], head), params))] == [
        t.id for t in asyncio.run(_generate(local, _route(local, swarm[1:], head), params))
    ]


def test_a_direct_session_gets_candidates_only_from_the_hop_asked(swarm, checkpoint, head):
    """RouteSession asks only a last hop whose record serves the head, ending at the last block."""
    _, first, node, plain = swarm
    digest = checkpoint.fingerprint().digest
    config = SessionConfig(wire_dtype="float32", remote_head="always", vocab_size=checkpoint.config.vocab_size)

    async def run(last):
        async with aiohttp.ClientSession() as http:
            record = PeerRecord.from_bytes(base64.b64decode(_info(last)["record"]))
            hops = [RemoteHop(first.url, 0, 15, first.peer_id), RemoteHop(last.url, 15, 30, last.peer_id, record)]
            async with RouteSession(http, hops, digest, 16, config) as session:
                out = await session.forward(head.embed([1, 2, 3]), 0)
                return out, session.head_hop

    out, served_by = asyncio.run(run(node))
    assert type(out).__name__ == "Candidates" and served_by is not None and out.ids.numel() == 64
    out, served_by = asyncio.run(run(plain))
    assert type(out).__name__ == "Tensor" and served_by is None


def test_a_step_of_several_rows_gets_the_candidates_of_each(swarm, checkpoint, head):
    """Output "all" (a speculative step), then a step rewinding over two of its rows: every row's
    candidates are the client's own head's top K on the very hidden row the hop sent; over the limit
    of rows the step is refused with a typed error."""
    _, first, node, _ = swarm
    digest = checkpoint.fingerprint().digest
    config = SessionConfig(wire_dtype="float32", remote_head="always", vocab_size=checkpoint.config.vocab_size)

    async def run():
        async with aiohttp.ClientSession() as http:
            record = PeerRecord.from_bytes(base64.b64decode(_info(node)["record"]))
            hops = [RemoteHop(first.url, 0, 15, first.peer_id), RemoteHop(node.url, 15, 30, node.peer_id, record)]
            async with RouteSession(http, hops, digest, 64, config) as session:
                session.head_tape = HeadTape(keep=64)
                answers = [
                    await session.forward(head.embed([1, 2, 3, 4, 5]), 0),
                    await session.forward(head.embed([6, 7, 8, 9]), 5, output="all"),
                    await session.forward(head.embed([7, 8, 10]), 6, output="all"),  # rows 7 and 8 rewound
                ]
                with pytest.raises(BadRequest):
                    await session.forward(head.embed([1] * (MAX_HEAD_ROWS + 1)), 9, output="all")
                return answers, session.head_tape

    (last, many, rewound), tape = asyncio.run(run())
    assert (len(last), len(many), len(rewound)) == (1, 4, 3) and tape.seen == 8 and len(tape.steps) == 8
    for _, hidden, answer in tape.steps:
        logits = head.logits(hidden)[0].float()
        assert torch.equal(answer.ids[0, :8], torch.topk(logits, 8).indices), "the same top candidates, in order"
        assert wrong_candidates(logits, answer, tolerance=1e-5) is None
    assert torch.equal(rewound.row(0).ids[0, :8], many.row(1).ids[0, :8]), "position 6 again, after the same tokens"
    assert torch.equal(many.row(-1).ids, many.row(3).ids) and many.row(0).dense().isfinite().sum() == 64


def test_an_answer_short_of_the_rows_asked_for_is_refused(checkpoint, head, tmp_path):
    """A last hop answering a step of output "all" with fewer rows than it sent (with or without the
    head): the client refuses the answer whole, naming the hop (failover routes around it)."""
    (short,) = start_nodes(
        [["--blocks", "0:30", "--serve-head", "--threads", "1"]],  # alone: no route of the other tests may take it
        tmp_path,
        module="tests.short_rows_node",
    )
    digest = checkpoint.fingerprint().digest

    async def run(remote_head: str):
        config = SessionConfig(wire_dtype="float32", remote_head=remote_head, vocab_size=checkpoint.config.vocab_size)
        async with aiohttp.ClientSession() as http:
            record = PeerRecord.from_bytes(base64.b64decode(_info(short)["record"]))
            async with RouteSession(http, [RemoteHop(short.url, 0, 30, short.peer_id, record)], digest, 16, config) as session:
                assert len(await session.forward(head.embed([1, 2, 3]), 0)) == 1  # one row asked, one row sent
                with pytest.raises(PeerUnavailable, match="answered 2 rows for a step of 3") as caught:
                    await session.forward(head.embed([4, 5, 6]), 3, output="all")
                assert hop_of(caught.value).peer_id == short.peer_id

    try:
        asyncio.run(run("always"))
        asyncio.run(run("never"))
    finally:
        stop_nodes([short])


def _head_rows_all_agreed(reason: str, tokens: int, keep: int = 16) -> bool:
    """The head check's line says it compared every row it kept (a sample of up to `keep`) and that
    the hop served at least a row per token (speculative steps serve rejected drafts' rows too)."""
    found = re.search(r"agreed on (\d+) of its (\d+) rows", reason)
    return found is not None and int(found[2]) >= tokens and int(found[1]) == min(keep, int(found[2]))


def test_a_checked_generation_checks_the_head_it_was_served(swarm):
    """verify=True: the client applies its own head to a sample of the served steps' hidden states."""
    _, _, head, _ = swarm
    client = _client(swarm, "always")
    route = _route(client, swarm[1:], head)
    result = asyncio.run(client.agenerate(PROMPT, route=route, verify=True, max_new_tokens=8, stop_at_eos=False))
    outcome = result.stats.verification
    assert outcome is not None and outcome.verdict is not Verdict.HEAD_WRONG, outcome
    assert f"the LM head applied by {head.peer_id[:8]}" in outcome.reason and _head_rows_all_agreed(outcome.reason, 8), outcome


def test_a_lying_head_is_caught_and_banned(swarm, tmp_path):
    """A node whose blocks are honest but whose candidates hide the likeliest token: the check catches it."""
    bootstrap, _, _, _ = swarm
    (liar,) = start_nodes(
        [["--blocks", "15:30", "--serve-head", "--threads", "1", "--bootstrap", bootstrap.url, "--gossip-period", "0.5"]],
        tmp_path,
        module="tests.lying_head_node",
    )
    try:
        client = _client(swarm, "always")
        asyncio.run(_until_seen(client, liar))
        route = _route(client, [*swarm[1:], liar], liar)
        result = asyncio.run(client.agenerate(PROMPT, route=route, verify=True, max_new_tokens=8, stop_at_eos=False))
        outcome = result.stats.verification
        assert outcome is not None and outcome.verdict is Verdict.HEAD_WRONG and outcome.peer_id == liar.peer_id, outcome
        assert "left out" in outcome.reason
        assert liar.peer_id in client.planner.measurements.banned(client.planner.clock())
    finally:
        stop_nodes([liar])


async def _until_seen(client, node, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.peer_id == node.peer_id for r in client.planner.records()):
        assert time.monotonic() < deadline, f"{node.peer_id} never reached the client's view"
        await refresh(client)
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
)
def test_a_bfloat16_head_node_passes_the_head_check(device, tmp_path):
    """A bf16 head (a GPU node's default; here also bf16 on the CPU) against the client's float32 one:
    its candidates are within the check's tolerance on every step, so verification agrees."""
    port, url = reserve_url()
    common = ["--bootstrap", url, "--gossip-period", "0.5"]
    specs = [
        ["--blocks", "0:15", *common],
        ["--blocks", "15:30", "--serve-head", "--device", device, "--dtype", "bfloat16", *common],
    ]
    *nodes, bootstrap = start_nodes(
        [*specs, ["--no-model", *port, "--gossip-period", "0.5", "--identity", str(tmp_path / "bootstrap.key")]], tmp_path
    )
    try:
        config = ClientConfig(wire_dtype="bfloat16", verify_fraction=0.0, session=SessionConfig(remote_head="always"))
        client = swarm_client(bootstrap.url, config=config)
        for node in nodes:
            asyncio.run(_until_seen(client, node))
        result = asyncio.run(client.agenerate(PROMPT, verify=True, max_new_tokens=16, stop_at_eos=False))
        outcome = result.stats.verification
        assert len(result.stats.token_ids) == 16
        assert outcome is not None and outcome.verdict is not Verdict.HEAD_WRONG and _head_rows_all_agreed(outcome.reason, 16), outcome
    finally:
        stop_nodes([bootstrap, *nodes])


def test_killing_the_head_serving_last_hop_falls_back_to_the_local_head(swarm, remote, local):
    """Last: it kills the head node. The replacement [15, 30) does not serve the head: the client's own
    head takes over mid-generation and the text is that of a run with no failure."""
    _, _, head, plain = swarm
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    baseline = asyncio.run(_generate(local, _route(local, swarm[1:], plain), params))
    route = _route(remote, swarm[1:], head)
    served, seen = _info(head)["head_steps"], []

    def kill() -> None:
        seen.append(_info(head)["head_steps"])
        head.kill()

    tokens, stats = asyncio.run(_run(remote, route, params, {NEW_TOKENS // 2: kill}))
    assert seen[0] - served >= NEW_TOKENS // 2, "the head node served the tokens before it died"
    assert [t.id for t in tokens] == [t.id for t in baseline]
    assert [f.how for f in stats.failovers] == ["splice"], stats.failovers
    assert stats.failovers[0].failed.startswith(head.peer_id[:8])
