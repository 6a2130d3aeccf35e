"""The swarm key and its challenge-response (swarm/membership.py): pure parts, then the two
middlewares against a tiny aiohttp app on loopback (plain HTTP and websockets)."""

from __future__ import annotations

import contextlib
import os
import stat

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from swarm import wire
from swarm.errors import Busy, KeyFileError, NotMember, error_from_code
from swarm.membership import (
    ANSWER_HEADER,
    CHALLENGE_BYTES,
    CHALLENGE_HEADER,
    CHALLENGE_PATH,
    NONCE_HEADER,
    PROOF_HEADER,
    ChallengeCache,
    Challenges,
    Membership,
    client_proof,
    decode,
    encode,
    format_proof,
    open_client_middleware,
    open_server_middleware,
    parse_proof,
    server_answer,
)
from swarm.swarm_key import SwarmKey

# --- the key file -------------------------------------------------------------------------------


def test_key_text_round_trips_and_hides_the_key() -> None:
    key = SwarmKey.generate()
    again = SwarmKey.from_text(key.to_text())
    assert again.fingerprint == key.fingerprint and again.mac(b"t", b"x") == key.mac(b"t", b"x")
    assert key.to_text().count("\n") == 3 and key.fingerprint in key.to_text()
    assert key._secret.hex() not in repr(key)
    assert SwarmKey.generate().fingerprint != key.fingerprint


def test_key_file_is_written_private_and_loaded(tmp_path) -> None:
    key = SwarmKey.generate()
    path = tmp_path / "swarm.key"
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SwarmKey.load(path).fingerprint == key.fingerprint
    with pytest.raises(KeyFileError, match="cannot write"):
        SwarmKey.generate().write(path)  # never overwritten
    assert SwarmKey.load(path).fingerprint == key.fingerprint


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "one 'swarm-key-v1:"),
        ("# only a comment\n", "one 'swarm-key-v1:"),
        ("swarm-key-v1:" + "ab" * 31 + "\n", "64 hex digits"),
        ("swarm-key-v1:" + "ab" * 33 + "\n", "64 hex digits"),
        ("swarm-key-v1:" + "zz" * 32 + "\n", "64 hex digits"),
        ("swarm-key-v2:" + "ab" * 32 + "\n", "one 'swarm-key-v1:"),
        ("swarm-key-v1:" + "ab" * 32 + "\nswarm-key-v1:" + "cd" * 32 + "\n", "one 'swarm-key-v1:"),
    ],
)
def test_malformed_key_files_are_refused_loudly(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "swarm.key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message) as refused:
        SwarmKey.load(path)
    assert str(path) in str(refused.value)


def test_key_files_open_to_others_missing_huge_or_binary_are_refused(tmp_path) -> None:
    path = tmp_path / "swarm.key"
    SwarmKey.generate().write(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        SwarmKey.load(path)
    with pytest.raises(KeyFileError, match="swarm keygen"):
        SwarmKey.load(tmp_path / "absent.key")
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"#" * 10_000)
    huge.chmod(0o600)
    with pytest.raises(KeyFileError, match="too large"):
        SwarmKey.load(huge)
    binary = tmp_path / "binary.key"
    binary.write_bytes(os.urandom(32) + b"\xff")
    binary.chmod(0o600)
    with pytest.raises(KeyFileError, match="not text"):
        SwarmKey.load(binary)


# --- pure parts of the exchange ---------------------------------------------------------------------


def test_encoding_is_exact() -> None:
    data = os.urandom(CHALLENGE_BYTES)
    assert decode(encode(data), CHALLENGE_BYTES) == data
    assert decode(encode(data), CHALLENGE_BYTES - 1) is None
    assert decode(encode(data) + "A", CHALLENGE_BYTES) is None
    assert decode(None, 16) is None
    assert decode("!" * 22, 16) is None
    assert decode("é" * 22, 16) is None


def test_proofs_bind_key_challenge_nonce_method_and_target() -> None:
    key, other = SwarmKey.generate(), SwarmKey.generate()
    challenge, nonce = os.urandom(CHALLENGE_BYTES), os.urandom(16)
    proof = client_proof(key, challenge, nonce, "POST", "/peers")
    assert proof == client_proof(key, challenge, nonce, "POST", "/peers")
    variants = [
        client_proof(other, challenge, nonce, "POST", "/peers"),
        client_proof(key, os.urandom(CHALLENGE_BYTES), nonce, "POST", "/peers"),
        client_proof(key, challenge, os.urandom(16), "POST", "/peers"),
        client_proof(key, challenge, nonce, "GET", "/peers"),
        client_proof(key, challenge, nonce, "POST", "/peers?x=1"),
    ]
    assert proof not in variants
    # the node's answer is another MAC: a client proof never passes for an answer, nor back
    assert server_answer(key, nonce, "POST", "/peers", 200, challenge) != proof
    assert server_answer(key, nonce, "POST", "/peers", 200, challenge) != server_answer(key, nonce, "POST", "/peers", 404, challenge)
    assert parse_proof(format_proof(challenge, proof)) == (challenge, proof)
    for bad in ("", ".", "x.y", format_proof(challenge, proof)[:-1], format_proof(challenge, proof) + "."):
        with pytest.raises(NotMember) as refused:
            parse_proof(bad)
        assert refused.value.reason == "malformed"


def test_a_challenge_is_this_nodes_and_expires() -> None:
    node, other = Challenges(ttl_s=60), Challenges(ttl_s=60)
    challenge = node.issue(1000.0)
    assert len(challenge) == CHALLENGE_BYTES and node.issue(1000.0) != challenge
    assert node.issued_at(challenge, 1000.0) == 1000.0
    assert node.issued_at(challenge, 1060.0) == 1000.0
    for now, reason in ((1060.5, "expired"), (998.0, "expired")):
        with pytest.raises(NotMember) as refused:
            node.issued_at(challenge, now)
        assert refused.value.reason == reason
    with pytest.raises(NotMember) as refused:
        other.issued_at(challenge, 1000.0)  # node B never accepts node A's challenge
    assert refused.value.reason == "foreign_challenge"
    forged = bytearray(challenge)
    forged[0] ^= 1  # an older stamp under the same seal
    with pytest.raises(NotMember):
        node.issued_at(bytes(forged), 1000.0)
    assert len(node) == 0  # issuing and checking store nothing


def test_a_challenge_is_spent_once_and_forgotten_when_it_expires() -> None:
    node = Challenges(ttl_s=10, max_spent=2)
    first, second, third = node.issue(100.0), node.issue(101.0), node.issue(102.0)
    node.spend(first, 100.5)
    with pytest.raises(NotMember) as refused:
        node.spend(first, 100.6)
    assert refused.value.reason == "replayed"
    node.spend(second, 101.5)
    with pytest.raises(Busy):
        node.spend(third, 102.5)  # full: a member is refused for a moment, nobody's replay passes
    assert len(node) == 2
    node.spend(third, 110.5)  # first expired at 110: pruned, which makes room
    assert len(node) == 2
    node.spend(node.issue(200.0), 200.0)
    assert len(node) == 1  # everything older was pruned


def test_the_client_cache_keeps_fresh_challenges_per_peer_bounded() -> None:
    cache = ChallengeCache(reuse_s=30, max_origins=2, per_origin=2)
    cache.put("http://a:1", b"a1", 0.0)
    cache.put("http://a:1", b"a2", 1.0)
    cache.put("http://a:1", b"a3", 2.0)  # a1 falls off
    assert cache.take("http://a:1", 3.0) == b"a3"
    assert cache.take("http://a:1", 3.0) == b"a2"
    assert cache.take("http://a:1", 3.0) is None
    cache.put("http://a:1", b"old", 0.0)
    assert cache.take("http://a:1", 31.0) is None  # stale
    for origin in ("http://a:1", "http://b:1", "http://c:1"):
        cache.put(origin, b"x", 40.0)
    assert cache.take("http://a:1", 40.0) is None  # the least recent peer was dropped
    assert cache.take("http://c:1", 40.0) == b"x"


def test_not_member_travels_as_its_code() -> None:
    error = error_from_code("not_member", "nope")
    assert isinstance(error, NotMember) and error.code == "not_member"


# --- the middlewares on a tiny app ---------------------------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(body=b"%s %s %d" % (request.method.encode(), request.path_qs.encode(), len(body)))


async def _socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_bytes(message.data[::-1])
    return ws


@contextlib.asynccontextmanager
async def _app(membership: Membership | None, handled: list[str] | None = None, hooks=()):
    """An app like a node's: the membership check first (or the open one), then the routes."""
    handled = handled if handled is not None else []

    @web.middleware
    async def count(request, handler):
        handled.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[count])
    if membership is not None:
        membership.install(app)
    else:
        app.middlewares.insert(0, open_server_middleware)
    app.on_response_prepare.extend(hooks)
    app.add_routes([web.get("/echo", _echo), web.post("/echo", _echo), web.get("/session", _socket)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _session(membership: Membership | None, capture: list | None = None) -> aiohttp.ClientSession:
    """A client session as Transport builds one; `capture` records each request's headers as sent."""

    async def record(request, handler):
        capture.append((request.method, str(request.url), dict(request.headers)))
        return await handler(request)

    middlewares = [membership.client_middleware if membership else open_client_middleware]
    if capture is not None:
        middlewares.append(record)  # inner: sees the headers membership added
    return aiohttp.ClientSession(middlewares=tuple(middlewares))


async def test_members_talk_http_and_websockets_and_reuse_challenges() -> None:
    key = SwarmKey.generate()
    node, client = Membership(key), Membership(key)
    sent: list = []
    async with _app(node) as url, _session(client, sent) as http:
        async with http.post(url + "/echo?x=1", data=b"a" * 1000) as response:
            assert response.status == 200 and await response.read() == b"POST /echo?x=1 1000"
        assert [s[1] for s in sent] == [url + "/echo?x=1"]  # the preflight went around the capture
        assert client.stats["retried"] == 0 and node.stats["proven"] == 1
        async with http.get(url + "/echo") as response:  # the cached challenge: one round trip
            assert await response.read() == b"GET /echo 0"
        ws = await http.ws_connect(url + "/session")
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"
        await ws.close()
        assert node.stats["proven"] == 3 and node.refused["no_proof"] == 1  # only the first preflight
        assert all(h[PROOF_HEADER] and h[NONCE_HEADER] for _, _, h in sent)


async def test_a_stale_challenge_costs_one_retry_with_the_body() -> None:
    key = SwarmKey.generate()
    node, client = Membership(key), Membership(key)
    async with _app(node) as url, _session(client) as http:
        async with http.get(url + "/echo") as response:
            assert response.status == 200
        client.cache.put(str(URL(url).origin()), node.challenges.issue(0.0), client._clock())  # expired
        async with http.post(url + "/echo", data=b"xyz") as response:
            assert await response.read() == b"POST /echo 3"
        assert client.stats["retried"] == 1 and node.refused["expired"] == 1


async def test_strangers_are_refused_before_any_work() -> None:
    key = SwarmKey.generate()
    node = Membership(key)
    handled: list[str] = []
    async with _app(node, handled) as url:
        async with aiohttp.ClientSession() as raw:  # no middleware at all
            async with raw.post(url + "/echo", data=b"x" * 100) as response:
                assert response.status == 401 and CHALLENGE_HEADER in response.headers
                assert ANSWER_HEADER not in response.headers
                error = wire.decode(await response.read())
                assert error["code"] == "not_member"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await raw.ws_connect(url + "/session")
            assert refused.value.status == 401
        async with _session(None) as http:  # an open client: one clear line
            with pytest.raises(NotMember, match="belongs to a private swarm: pass --swarm-key FILE"):
                await http.get(url + "/echo")
            with pytest.raises(NotMember, match="belongs to a private swarm"):
                await http.ws_connect(url + "/session")
        async with _session(Membership(SwarmKey.generate())) as http:  # another swarm's key
            with pytest.raises(NotMember, match="belongs to another private swarm"):
                await http.post(url + "/echo", data=b"secret")
        assert handled == []  # nothing reached a handler, or even the next middleware
        assert node.stats["proven"] == 0


async def test_private_and_open_never_talk() -> None:
    key = SwarmKey.generate()
    handled: list[str] = []
    async with _app(None, handled) as url:
        async with _session(Membership(key)) as http:  # a private client at an open node
            with pytest.raises(NotMember, match="not in this private swarm"):
                await http.post(url + "/echo", data=b"private records")
            with pytest.raises(NotMember, match="not in this private swarm"):
                await http.ws_connect(url + "/session")
        async with _session(None) as http, http.post(url + "/echo", data=b"ab") as response:  # open with open: as before
            assert await response.read() == b"POST /echo 2"
        async with aiohttp.ClientSession() as raw:  # a proof at an open node is refused
            headers = {NONCE_HEADER: encode(os.urandom(16)), PROOF_HEADER: "x.y"}
            async with raw.get(url + "/echo", headers=headers) as response:
                assert response.status == 401 and CHALLENGE_HEADER not in response.headers
    assert handled == ["/echo"]  # only the open client's request; the private one sent no body anywhere


async def test_an_answer_without_the_nodes_proof_is_refused() -> None:
    """A private client refuses an answer whose node proof does not hold (here a hook after
    membership's replaces it), the websocket handshake included: it never takes that body."""
    key = SwarmKey.generate()
    node, client = Membership(key), Membership(key)

    async def tamper(request, response):
        if request.path != CHALLENGE_PATH:
            response.headers[ANSWER_HEADER] = encode(os.urandom(32))

    async with _app(node, hooks=[tamper]) as url, _session(client) as http:
        with pytest.raises(NotMember, match="another private swarm"):
            await http.get(url + "/echo")
        with pytest.raises(NotMember, match="another private swarm"):
            await http.ws_connect(url + "/session")
    assert node.stats["proven"] == 2  # the node took both: the client refused the answers


async def test_a_replayed_proof_is_refused_and_a_proof_for_one_node_fails_at_another() -> None:
    key = SwarmKey.generate()
    node_a, node_b, client = Membership(key), Membership(key), Membership(key)
    sent: list = []
    async with _app(node_a) as url_a, _app(node_b) as url_b, _session(client, sent) as http:
        async with http.post(url_a + "/echo", data=b"once") as response:
            assert response.status == 200
        _, url, headers = sent[-1]
        replay = {NONCE_HEADER: headers[NONCE_HEADER], PROOF_HEADER: headers[PROOF_HEADER]}
        async with aiohttp.ClientSession() as raw:
            async with raw.post(url, data=b"once", headers=replay) as response:
                assert response.status == 401
                assert "already used" in wire.decode(await response.read())["message"]
            # a fresh, unused proof made for node A, sent to node B
            challenge = node_a.challenges.issue(node_a._clock())
            nonce = os.urandom(16)
            proof = {NONCE_HEADER: encode(nonce), PROOF_HEADER: format_proof(challenge, client_proof(key, challenge, nonce, "POST", "/echo"))}
            async with raw.post(url_b + "/echo", data=b"x", headers=proof) as response:
                assert response.status == 401
                assert "not issued by this node" in wire.decode(await response.read())["message"]
            async with raw.post(url_a + "/echo", data=b"x", headers=proof) as response:
                assert response.status == 200  # where it belongs, it works (once)
            # the same proof on another path of the same node
            challenge = node_a.challenges.issue(node_a._clock())
            proof = {NONCE_HEADER: encode(nonce), PROOF_HEADER: format_proof(challenge, client_proof(key, challenge, nonce, "POST", "/echo"))}
            async with raw.post(url_a + "/echo?other", data=b"x", headers=proof) as response:
                assert response.status == 401
        assert node_a.refused == {"no_proof": 1, "replayed": 1, "wrong_key": 1}  # no_proof: the preflight
        assert node_b.refused["foreign_challenge"] == 1
