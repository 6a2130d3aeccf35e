"""Private swarms: every request, websocket and gossip exchange proves it holds the swarm key.

A swarm key is 32 random bytes that every member holds (`swarm keygen > swarm.key`, then
`--swarm-key swarm.key` on nodes and clients). It never travels: each side proves it holds
the key with an HMAC-SHA256 over a fresh challenge, much like HTTP digest authentication.

    client                                           private node
    GET /swarm/challenge   Swarm-Nonce: n0     --->  (no proof: refused before any work)
                  <---  401  Swarm-Challenge: c1  Swarm-Answer: A(n0, ..., c1)
    POST /peers  Swarm-Nonce: n1  Swarm-Proof: c1.P(c1, n1, POST, /peers)  --->  checked
                  <---  200  Swarm-Challenge: c2  Swarm-Answer: A(n1, ..., c2)
    GET /session (websocket)  Swarm-Nonce: n2  Swarm-Proof: c2.P(c2, n2, GET, /session)  ...

- P = HMAC(key, client tag | challenge | client nonce | method | path and query): the
  client's proof, bound to the node that issued the challenge, to this request's method and
  target, usable once.
- A = HMAC(key, server tag | client nonce | method | target | status | next challenge): the
  node's proof, on EVERY answer (the 101 of a websocket and the 401 of a refusal included).
  A private client refuses any answer without it, so it never talks to an open node or one
  of another swarm, and it sends a body (records, activations) only after a member answered.
- A challenge is 8 bytes of issue time, 16 random bytes and a MAC under a secret of this
  process: issuing one stores nothing, so strangers cannot make a node hold state; a node
  accepts only its own, only for `ttl_s`, and only once (verified proofs are remembered
  until their challenge expires, at most `max_spent`; beyond that the node answers `busy`).
- Every answer carries the next challenge, so a client's next request to the same peer
  needs no extra round trip; a client without a fresh challenge for a peer asks
  `CHALLENGE_PATH` first (any path would do: the node refuses it before routing).

A node never mixes swarms. A private node refuses requests without a valid proof (401,
`not_member`); an open node refuses requests that carry membership headers (401, no
challenge); a private client refuses answers without a valid node proof; an open client
that meets a private node says so in one line. The key file is one line of text,
`swarm-key-v1:<64 hex digits>` (comment lines start with `#`), readable by its owner only.

The key does not protect bodies: TLS does (swarm/transport.py). Over `--insecure-http` an
eavesdropper sees requests but can neither replay them nor make new ones.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web

from swarm.errors import Busy, NotMember, PeerUnavailable, SwarmError
from swarm.swarm_key import SwarmKey

log = logging.getLogger(__name__)

NONCE_BYTES = 16
MAC_BYTES = 32  # HMAC-SHA256, untruncated
_STAMP_BYTES = 8  # a challenge's issue time, milliseconds since the epoch
_RANDOM_BYTES = 16
_SEAL_BYTES = 16  # the process-secret MAC of a challenge: forging one needs 2^128 tries
CHALLENGE_BYTES = _STAMP_BYTES + _RANDOM_BYTES + _SEAL_BYTES

NONCE_HEADER = "Swarm-Nonce"
PROOF_HEADER = "Swarm-Proof"
CHALLENGE_HEADER = "Swarm-Challenge"
ANSWER_HEADER = "Swarm-Answer"
CHALLENGE_PATH = "/swarm/challenge"  # what a client asks when it holds no challenge of a peer

CHALLENGE_TTL_S = 60.0  # a challenge is accepted this long after it was issued
CLIENT_REUSE_S = 30.0  # a client keeps a challenge this long: well inside the ttl, after any latency
MAX_SPENT = 65_536  # verified challenges remembered at once (members only can add to it)
_CACHE_ORIGINS = 1024  # peers a client keeps challenges of
_CACHE_PER_ORIGIN = 8  # challenges kept per peer (concurrent requests each spend one)

# domain separation: no MAC made for one purpose is ever valid for another
_CHALLENGE_TAG = b"layerswarm/challenge/v1\n"
_CLIENT_TAG = b"layerswarm/member-proof/v1\n"
_SERVER_TAG = b"layerswarm/member-answer/v1\n"


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str | None, size: int) -> bytes | None:
    """`size` bytes from unpadded urlsafe base64, or None for anything else (absent, malformed, other length)."""
    if text is None or len(text) != (size * 4 + 2) // 3:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error, non-ASCII
        return None
    return data if len(data) == size and encode(data) == text else None  # canonical form only


# --- the exchange, pure --------------------------------------------------------------------------


def client_proof(key: SwarmKey, challenge: bytes, nonce: bytes, method: str, target: str) -> bytes:
    """The client's proof for one request: `target` is the path with its query, as sent."""
    return key.mac(_CLIENT_TAG, challenge, nonce, method.encode(), target.encode())


def server_answer(key: SwarmKey, nonce: bytes, method: str, target: str, status: int, challenge: bytes) -> bytes:
    """The node's proof on its answer to the request that carried `nonce`, naming the next `challenge`."""
    return key.mac(_SERVER_TAG, nonce, method.encode(), target.encode(), str(status).encode(), challenge)


def format_proof(challenge: bytes, proof: bytes) -> str:
    return f"{encode(challenge)}.{encode(proof)}"


def parse_proof(text: str) -> tuple[bytes, bytes]:
    """(challenge, proof) of a `Swarm-Proof` header, or `NotMember`."""
    challenge_text, _, proof_text = text.partition(".")
    challenge, proof = decode(challenge_text, CHALLENGE_BYTES), decode(proof_text, MAC_BYTES)
    if challenge is None or proof is None:
        raise NotMember("malformed proof of the swarm key", "malformed")
    return challenge, proof


class Challenges:
    """A node's challenges: issued without state, each accepted once within `ttl_s`.

    `spend` is called only for proofs already verified against the key, so only members
    can fill the spent set; it is pruned as its challenges expire and bounded by `max_spent`.
    """

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S, max_spent: int = MAX_SPENT, secret: bytes | None = None) -> None:
        if not (ttl_s > 0 and max_spent >= 1):
            raise ValueError("ttl_s must be positive and max_spent at least 1")
        self.ttl_s = ttl_s
        self.max_spent = max_spent
        self._secret = secret or os.urandom(32)  # per process: a restart voids every challenge
        self._spent: set[bytes] = set()
        self._expiry: list[tuple[float, bytes]] = []  # heap of (expires at, challenge) over _spent

    def __len__(self) -> int:
        return len(self._spent)

    def _seal(self, head: bytes) -> bytes:
        return hmac.new(self._secret, _CHALLENGE_TAG + head, hashlib.sha256).digest()[:_SEAL_BYTES]

    def issue(self, now: float) -> bytes:
        head = int(now * 1000).to_bytes(_STAMP_BYTES, "big") + os.urandom(_RANDOM_BYTES)
        return head + self._seal(head)

    def issued_at(self, challenge: bytes, now: float) -> float:
        """When this node issued `challenge`; `NotMember` for one it did not issue or that expired."""
        head, seal = challenge[:-_SEAL_BYTES], challenge[-_SEAL_BYTES:]
        if len(challenge) != CHALLENGE_BYTES or not hmac.compare_digest(seal, self._seal(head)):
            raise NotMember("the challenge was not issued by this node (or it restarted since): ask for a new one", "foreign_challenge")
        issued = int.from_bytes(head[:_STAMP_BYTES], "big") / 1000
        if not issued - 1.0 <= now <= issued + self.ttl_s:  # 1 s: the clock may step back a little
            raise NotMember("the challenge expired: ask for a new one", "expired")
        return issued

    def spend(self, challenge: bytes, now: float) -> None:
        """Mark a verified `challenge` used: `NotMember` if it was, `Busy` if the set is full."""
        self._prune(now)
        if challenge in self._spent:
            raise NotMember("the challenge was already used: a replay", "replayed")
        if len(self._spent) >= self.max_spent:
            raise Busy("too many requests proven within one challenge lifetime: try again shortly")
        issued = int.from_bytes(challenge[:_STAMP_BYTES], "big") / 1000
        self._spent.add(challenge)
        heapq.heappush(self._expiry, (issued + self.ttl_s, challenge))

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            self._spent.discard(heapq.heappop(self._expiry)[1])


class ChallengeCache:
    """A client's unused challenges per peer (origin), each kept `reuse_s`; bounded both ways."""

    def __init__(self, reuse_s: float = CLIENT_REUSE_S, max_origins: int = _CACHE_ORIGINS, per_origin: int = _CACHE_PER_ORIGIN) -> None:
        self.reuse_s = reuse_s
        self.max_origins = max_origins
        self.per_origin = per_origin
        self._held: OrderedDict[str, deque[tuple[float, bytes]]] = OrderedDict()

    def take(self, origin: str, now: float) -> bytes | None:
        held = self._held.get(origin)
        while held:
            received, challenge = held.pop()  # the newest
            if now - received <= self.reuse_s:
                return challenge
            held.clear()  # the rest are older still
        self._held.pop(origin, None)
        return None

    def put(self, origin: str, challenge: bytes, now: float) -> None:
        held = self._held.setdefault(origin, deque(maxlen=self.per_origin))
        held.append((now, challenge))
        self._held.move_to_end(origin)
        while len(self._held) > self.max_origins:
            self._held.popitem(last=False)


# --- the middlewares ------------------------------------------------------------------------------

_ANSWER_TO = web.RequestKey("swarm_nonce", object)  # the client nonce the answer is bound to (bytes or None)


def _refusal(error: SwarmError, status: int = 401) -> web.Response:
    # imported here, not at the top: it brings torch, which a node has loaded anyway and a
    # healthcheck probe (node/health.py, every 30 s in a container) should not pay for
    from swarm import wire

    headers = {"WWW-Authenticate": "LayerswarmKey"} if status == 401 else None
    return web.Response(status=status, body=wire.encode(wire.error_message(error)), content_type="application/msgpack", headers=headers)


def _origin(request: ClientRequest) -> str:
    return str(request.url.origin())


class Membership:
    """The swarm key at work on both sides of HTTP: `client_middleware` for every outgoing
    `ClientSession` (websockets included), `server_middleware` (first in the app) and
    `prepare_hook` (the app's `on_response_prepare`) for a node. One per process.

    `refused` counts refused requests by reason, `stats` what was proven.
    """

    def __init__(self, key: SwarmKey, *, ttl_s: float = CHALLENGE_TTL_S, max_spent: int = MAX_SPENT, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.challenges = Challenges(ttl_s, max_spent)
        self.cache = ChallengeCache(reuse_s=min(CLIENT_REUSE_S, ttl_s / 2))
        self.refused: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._clock = clock

        @web.middleware
        async def server_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            return await self._serve(request, handler)

        self.server_middleware = server_middleware

    def __repr__(self) -> str:
        return f"Membership({self.key!r})"

    def install(self, app: web.Application) -> None:
        """Make `app` private: the check runs before every other middleware, every answer proves the key."""
        app.middlewares.insert(0, self.server_middleware)
        app.on_response_prepare.append(self.prepare_hook)

    # --- the node's side ---

    async def _serve(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        request[_ANSWER_TO] = decode(request.headers.get(NONCE_HEADER), NONCE_BYTES)
        try:
            self.admit(request.method, request.raw_path, request[_ANSWER_TO], request.headers.get(PROOF_HEADER))
        except NotMember as exc:
            self.refused[exc.reason] += 1
            log.debug("refused %s %s from %s: %s", request.method, request.path, request.remote, exc.reason)
            return _refusal(exc)
        except Busy as exc:
            self.refused["busy"] += 1
            return _refusal(exc, 503)
        return await handler(request)

    def admit(self, method: str, target: str, nonce: bytes | None, proof_header: str | None) -> None:
        """Raise `NotMember` (or `Busy`) unless `proof_header` proves the key for this request; spend its challenge."""
        if proof_header is None:
            raise NotMember("this node belongs to a private swarm: prove the swarm key (--swarm-key FILE)", "no_proof")
        challenge, proof = parse_proof(proof_header)
        if nonce is None:
            raise NotMember("malformed proof of the swarm key: no nonce", "malformed")
        now = self._clock()
        self.challenges.issued_at(challenge, now)
        if not hmac.compare_digest(proof, client_proof(self.key, challenge, nonce, method, target)):
            raise NotMember("the proof does not hold with this swarm's key", "wrong_key")
        self.challenges.spend(challenge, now)
        self.stats["proven"] += 1

    async def prepare_hook(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer carries a fresh challenge, and proves the key to whoever sent a nonce."""
        challenge = self.challenges.issue(self._clock())
        response.headers[CHALLENGE_HEADER] = encode(challenge)
        nonce = request.get(_ANSWER_TO)
        if isinstance(nonce, bytes):
            answer = server_answer(self.key, nonce, request.method, request.raw_path, response.status, challenge)
            response.headers[ANSWER_HEADER] = encode(answer)

    # --- the client's side ---

    async def client_middleware(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """Prove the key on `request`, and accept its answer only from a member (else `NotMember`)."""
        origin = _origin(request)
        challenge = self.cache.take(origin, self._clock()) or await self._ask_challenge(request, origin)
        for attempt in range(2):
            nonce = os.urandom(NONCE_BYTES)
            target = request.url.raw_path_qs
            request.headers[NONCE_HEADER] = encode(nonce)
            request.headers[PROOF_HEADER] = format_proof(challenge, client_proof(self.key, challenge, nonce, request.method, target))
            response = await handler(request)
            try:
                challenge = self._check_answer(response, origin, nonce, request.method, target)
            except SwarmError:
                response.release()
                raise
            if response.status != 401:
                self.cache.put(origin, challenge, self._clock())
                return response
            response.release()  # a member refused our proof: its challenge was spent or stale (a restart)
            self.stats["retried"] += 1
        raise NotMember(f"{origin} refused our proof of the swarm key twice", "refused")

    async def _ask_challenge(self, request: ClientRequest, origin: str) -> bytes:
        """A fresh challenge of `origin`, from an answer that proves it a member: nothing else is sent first."""
        nonce = os.urandom(NONCE_BYTES)
        async with request.session.get(
            origin + CHALLENGE_PATH,
            headers={NONCE_HEADER: encode(nonce)},
            middlewares=(),  # this very exchange, not the proof of one
            allow_redirects=False,
            ssl=request.ssl,  # the same pinning as the request it is for
            server_hostname=request.server_hostname,
        ) as response:
            return self._check_answer(response, origin, nonce, "GET", CHALLENGE_PATH)

    def _check_answer(self, response: ClientResponse, origin: str, nonce: bytes, method: str, target: str) -> bytes:
        """The next challenge of an answer that proves the key; else the typed refusal."""
        challenge = decode(response.headers.get(CHALLENGE_HEADER), CHALLENGE_BYTES)
        answer = decode(response.headers.get(ANSWER_HEADER), MAC_BYTES)
        if challenge is not None and answer is not None and hmac.compare_digest(answer, server_answer(self.key, nonce, method, target, response.status, challenge)):
            return challenge
        if response.status == 503 and ANSWER_HEADER not in response.headers:  # a connection limit, before any check
            raise PeerUnavailable(f"{origin} is busy")
        if CHALLENGE_HEADER in response.headers or ANSWER_HEADER in response.headers:
            raise NotMember(f"{origin} belongs to another private swarm: its key is not the one in --swarm-key", "other_swarm")
        raise NotMember(f"{origin} is not in this private swarm: it did not prove the swarm key (an open node?)", "open_peer")


# --- the open swarm's side of the line ------------------------------------------------------------


@web.middleware
async def open_server_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """An open node refuses requests that try to prove a swarm key: it never mixes swarms."""
    if NONCE_HEADER in request.headers or PROOF_HEADER in request.headers:
        return _refusal(NotMember("this node is in the open swarm: it takes no swarm key", "open_node"))
    return await handler(request)


async def open_client_middleware(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """An open client that meets a private node says so in one line (`NotMember`)."""
    response = await handler(request)
    if response.status == 401 and CHALLENGE_HEADER in response.headers:
        response.release()
        raise NotMember(f"{_origin(request)} belongs to a private swarm: pass --swarm-key FILE", "private_peer")
    return response
