"""Probes of a relay from outside, for the relay tests: raw TLS connections that name a peer in
their ClientHello (from any loopback source address), and a node's /info read without a pin."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request

from swarm.relay_wire import sni_name
from swarm.transport import peer_id_of_certificate


def info(url: str) -> dict:
    """A peer's /info over TLS, unverified: only counters are read from it."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(f"{url}/info", timeout=10, context=context) as response:
        return json.load(response)


def hello(port: int, server_name: str, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TCP connection to the relay (from `source`, a loopback address) ready to send a TLS
    ClientHello naming `server_name` (`do_handshake` sends it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
    return tls


def closed_without_tls(port: int, server_name: str) -> bool:
    """Whether the relay closes a connection whose ClientHello names `server_name` before any TLS answer."""
    tls = hello(port, server_name)
    try:
        tls.do_handshake()
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    finally:
        tls.close()
    return False


def port_of(node) -> int:
    return int(node.url.rsplit(":", 1)[1])


def served_by(relay, node, source: str) -> bool:
    """Whether a connection from `source` through `relay` naming `node` reaches `node`: its TLS
    certificate is `node`'s key and it answers `GET /info` with its peer id."""
    tls = hello(port_of(relay), sni_name(node.peer_id), source)
    try:
        tls.do_handshake()
        if peer_id_of_certificate(tls.getpeercert(binary_form=True)) != node.peer_id:
            return False
        tls.sendall(b"GET /info HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer.startswith(b"HTTP/1.1 200") and node.peer_id.encode() in answer
    except (ssl.SSLError, OSError):
        return False
    finally:
        tls.close()
