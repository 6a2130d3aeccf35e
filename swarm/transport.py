"""How a party talks to the swarm: TLS pinned to identities, or plain http by explicit choice.

One frozen `Transport` is built in cli (or by the Python API) and threaded to every place
that serves or builds an `aiohttp.ClientSession`, so the choice is made once.

TLS (the default). A node's certificate is self-signed and its subject public key IS the
node's Ed25519 identity key (`certificate_pem`). A dial whose peer id is known is pinned
(`Transport.pin`): after the handshake, before a byte of the request goes out, aiohttp
calls `PeerPin.check`, which derives the peer id from the certificate's key and refuses
any other (`PinMismatch`, which callers turn into `swarm.errors.IdentityMismatch` naming
the hop). TLS 1.3's CertificateVerify is signed with that key, so a peer that presents
the certificate holds the key: a man in the middle with his own certificate, or a node
answering at another's address, fails the pin. So records need no fingerprint field: the
peer id already names the key, and any address that answers with it is that peer.

A dial whose peer id is not known yet (a bootstrap URL given by the operator) is
encrypted but unpinned: it proves nothing about who answered; what it returns is signed
records, each checked on its own, and every later dial to a peer of those records is
pinned.

Plain http (`insecure_http`, `--insecure-http`): the node serves http and advertises an
http URL, and the party dials http and https alike. A TLS party never dials http: its
sessions refuse such URLs before connecting (`_https_only`), and the callers filter them
out of routing and gossip first. A pin on an http URL is never proof of anything (aiohttp
checks pins on TLS connections only); there the protocol's own signed nonces
(`opened`, `prove`, address proofs) are all that proves a peer.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from swarm.identity import Identity, peer_id_from_public_key
from swarm.membership import open_client_middleware, open_server_middleware
from swarm.relay_wire import sni_name

if TYPE_CHECKING:  # swarm/membership.py: a private swarm's key and its middlewares
    from swarm.membership import Membership

CERT_DAYS = 3650  # the pin is the key, not the dates: nobody checks expiry (CERT_NONE), a long life avoids clock trouble


class PinMismatch(aiohttp.ServerFingerprintMismatch):
    """The peer at a pinned address presented another identity (or none): a client-side transport error.

    A subclass of aiohttp's own, so its connector closes the connection and tries the host's other
    addresses exactly as for a fingerprint mismatch; callers catch it before `aiohttp.ClientError`.
    """

    def __init__(self, expected: str, got: str | None, host: str, port: int) -> None:
        super().__init__(expected.encode(), (got or "").encode(), host, port)
        self.expected_peer = expected
        self.got_peer = got

    def __str__(self) -> str:
        who = f"peer {self.got_peer}" if self.got_peer else "no Ed25519 identity key"
        return f"{self.host}:{self.port} presented {who}, not peer {self.expected_peer}"


class PlainHttpRefused(aiohttp.ClientConnectionError):
    """A TLS party asked to dial a plain http URL: refused before any connection is made."""


class PeerPin(aiohttp.Fingerprint):
    """The `ssl=` of a request to one peer: the TLS certificate must carry that peer's identity key.

    Equal and hashed by peer id, so aiohttp's connection pool (whose key holds the `ssl` value)
    reuses a connection pinned to the same peer, and only that.
    """

    def __init__(self, peer_id: str) -> None:  # no super(): there is no certificate hash to hold
        self.peer_id = peer_id

    @property
    def fingerprint(self) -> bytes:
        return self.peer_id.encode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerPin) and other.peer_id == self.peer_id

    def __hash__(self) -> int:
        return hash(("PeerPin", self.peer_id))

    def __repr__(self) -> str:
        return f"PeerPin({self.peer_id!r})"

    def check(self, transport: Any) -> None:
        """Raise `PinMismatch` unless `transport` is TLS and its certificate carries our peer's key.

        aiohttp's own `Fingerprint.check` passes a plain transport silently; a pin must never."""
        peername = transport.get_extra_info("peername") or ("?", 0)
        host, port = peername[0], peername[1]
        ssl_object = transport.get_extra_info("ssl_object") if transport.get_extra_info("sslcontext") else None
        if ssl_object is None:
            raise PinMismatch(self.peer_id, None, host, port)
        got = peer_id_of_certificate(ssl_object.getpeercert(binary_form=True))
        if got != self.peer_id:
            raise PinMismatch(self.peer_id, got, host, port)


@dataclass(frozen=True)
class Transport:
    insecure_http: bool = False  # serve and dial plain http: only by explicit --insecure-http
    membership: Membership | None = None  # a private swarm (swarm/membership.py); None: the open swarm

    @property
    def scheme(self) -> str:
        """What this party serves: "https", or "http" with `insecure_http`."""
        return "http" if self.insecure_http else "https"

    def client_session(self, *, limit: int = 100, limit_per_host: int = 0, **kwargs: Any) -> aiohttp.ClientSession:
        """Every outgoing session is built here. Unpinned https is encrypted but unverified (our
        certificates are self-signed: identity comes from `pin`, never from a CA); http URLs are
        refused unless `insecure_http`; a private swarm's membership proof rides on every request."""
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host, ssl=False)
        middlewares: list[Any] = [_name_the_pinned_peer]
        if not self.insecure_http:
            middlewares.append(_https_only)
        # a private party proves the key on every request and believes only members' answers; an
        # open one says in one line that it met a private node (swarm/membership.py)
        middlewares.append(self.membership.client_middleware if self.membership is not None else open_client_middleware)
        return aiohttp.ClientSession(connector=connector, middlewares=tuple(middlewares), **kwargs)

    def pin(self, peer_id: str | None) -> PeerPin | bool:
        """The `ssl=` argument of one request to `peer_id` (False: unpinned, for a peer not known yet)."""
        return PeerPin(peer_id) if peer_id else False

    def server_ssl(self, identity: Identity) -> ssl.SSLContext | None:
        """The TLS 1.3 server context presenting `identity`'s certificate; None with `insecure_http`."""
        if self.insecure_http:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # OpenSSL reads a key only from a file: a private directory, gone right after the load.
        with tempfile.TemporaryDirectory(prefix="layerswarm-tls-") as folder:
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_bytes(certificate_pem(identity))
            key.touch(mode=0o600)
            key.write_bytes(identity.private_key_pem_for_tls())
            context.load_cert_chain(cert, key)
        return context

    def server_middlewares(self) -> list[Any]:
        """Middlewares every node app runs first: membership's check when private; else the open
        swarm's refusal of requests that carry a membership proof (a node never mixes swarms)."""
        return [self.membership.server_middleware] if self.membership is not None else [open_server_middleware]

    def response_hooks(self) -> list[Any]:
        """`on_response_prepare` hooks of every node app: a private node proves the key on every
        answer, the 101 of a websocket included (headers go out before a handler returns)."""
        return [self.membership.prepare_hook] if self.membership is not None else []

    def allows(self, url: str) -> bool:
        """Whether this party dials `url` at all: https always, http only with `insecure_http`."""
        scheme = urlsplit(url).scheme.lower()
        return scheme == "https" or (scheme == "http" and self.insecure_http)


async def _name_the_pinned_peer(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
    """Client middleware: a pinned dial names its peer in the TLS server name (SNI), so a relay at
    that address can hand the connection, still encrypted, to the node it relays for
    (swarm/relay_wire.py). A node dialled directly ignores the name: its certificate is its own."""
    pin = request.ssl
    if isinstance(pin, PeerPin) and request.server_hostname is None:
        request.server_hostname = sni_name(pin.peer_id)
    return await handler(request)


async def _https_only(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
    """Client middleware of a TLS party: a plain http URL is refused before it is dialled."""
    if request.url.scheme != "https":
        raise PlainHttpRefused(f"{request.url.scheme}://{request.url.host}:{request.url.port} is plain http; dialling it needs --insecure-http")
    return await handler(request)


def certificate_pem(identity: Identity, now: datetime.datetime | None = None) -> bytes:
    """A self-signed X.509 certificate whose subject public key is `identity`'s Ed25519 key (PEM).

    The common name is the peer id, for people reading it; only the key counts."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    key = serialization.load_pem_private_key(identity.private_key_pem_for_tls(), password=None)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(Ed25519PublicKey.from_public_bytes(identity.public_key_bytes))
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def peer_id_of_certificate(der: bytes | None) -> str | None:
    """The peer id of the Ed25519 key a DER certificate carries; None for anything else."""
    if not der:
        return None
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if not isinstance(key, Ed25519PublicKey):
        return None
    return peer_id_from_public_key(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


async def round_trip(http: aiohttp.ClientSession, url: str, peer_id: str, transport: Transport, timeout: float = 2.0) -> float | None:
    """Seconds a small request to the peer at `url` takes (GET /info, pinned to `peer_id`), or None if
    it does not answer: the faster of two on one connection, so that the first one's connection
    set-up (TLS, and through a relay its dial-back) is not counted, while a relayed path's extra
    length is."""
    best: float | None = None
    for _ in range(2):
        began = time.perf_counter()
        try:
            async with http.get(f"{url}/info", timeout=aiohttp.ClientTimeout(total=timeout), ssl=transport.pin(peer_id)) as response:
                await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return best
        elapsed = time.perf_counter() - began
        best = elapsed if best is None else min(best, elapsed)
    return best
