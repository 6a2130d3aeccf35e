"""Which addresses a node dials: a pure policy, decided from the node's own public URL.

Records, mDNS answers and (later) a session's `next` name addresses chosen by strangers.
A node dials such an address only if it is a base URL (`http` or `https`, a host and an
explicit port; no user, path, query or fragment) and its host is of a kind the node's own
reach allows:

- The node's reach comes from the host of its own public URL (`--public-url`, else the
  address it binds): `loopback` (127.0.0.0/8, ::1, `localhost`), `private` (any other
  non-global IP: RFC 1918, CGNAT 100.64/10, IPv6 ULA; or a name ending in `.local` or
  without a dot) or `public` (a global IP or any other DNS name).
- A `loopback` node (a test or a laptop swarm) dials loopback, private and public hosts;
  a `private` node (a LAN swarm) dials private and public hosts; a `public` node dials
  public hosts only. So a LAN or loopback swarm works with no flags, and an internet node
  is never made to reach into its own machine or network by a stranger's record.
- Link-local (169.254/16 with the cloud metadata service, fe80::/10), multicast,
  unspecified (0.0.0.0, ::) and reserved hosts are never dialled for strangers.
- Operator-given URLs (`--bootstrap`) are always dialled: the operator chose them.
- A TLS node (`plain_http` False: the default, see swarm/transport.py) never dials a plain
  http address, operator-given or not: it would carry no identity to pin.

Hosts are classified without DNS: a name counts by its suffix (`localhost`, `.local`),
and IPv4 in the short forms resolvers accept (`127.1`, `2130706433`, `0x7f.0.0.1`) or
IPv6-mapped IPv4 count as the address they spell. A DNS name that resolves to a private
address is not caught here (DNS rebinding is not defended yet).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from swarm.errors import AddressRefused

MAX_URL_CHARS = 256
_HOST_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")  # urlsplit lowercases `hostname`


class Reach(enum.Enum):
    """Where a node lives, from its own public URL; also the kind of a dialled host."""

    LOOPBACK = "loopback"
    PRIVATE = "private"
    PUBLIC = "public"


# host kinds that are never dialled for a stranger, whatever the node's reach
_NEVER = frozenset({"link_local", "multicast", "unspecified", "reserved"})
_ALLOWED = {
    Reach.LOOPBACK: frozenset({"loopback", "private", "public"}),
    Reach.PRIVATE: frozenset({"private", "public"}),
    Reach.PUBLIC: frozenset({"public"}),
}


@dataclass(frozen=True)
class AddressPolicy:
    """What one node dials: its reach, and the operator's URLs (always allowed)."""

    reach: Reach
    trusted: frozenset[str] = frozenset()  # base URLs as `base_url` writes them
    plain_http: bool = True  # whether http:// addresses are dialled at all (a TLS node: no)

    @classmethod
    def for_node(cls, own_url: str, trusted: tuple[str, ...] | frozenset[str] = (), plain_http: bool = True) -> AddressPolicy:
        """The policy of a node whose public URL is `own_url`, with the operator's `trusted` URLs."""
        return cls(reach_of(own_url), frozenset(base_url(url) for url in trusted), plain_http)

    def allows(self, url: str) -> bool:
        try:
            check_dialable(url, self)
        except AddressRefused:
            return False
        return True

    def describe(self) -> dict[str, object]:
        """For /info: the reach and the host kinds dialled for strangers."""
        return {"reach": self.reach.value, "dials": sorted(_ALLOWED[self.reach]), "schemes": ["http", "https"] if self.plain_http else ["https"]}


def base_url(url: str) -> str:
    """`url` as a canonical base URL "scheme://host:port" (lowercase scheme and host); else `AddressRefused`."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not url.isascii() or not url.isprintable() or " " in url:
        raise AddressRefused("address is not a printable ASCII URL of at most 256 characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError:
        raise AddressRefused("address is not a URL with a valid port") from None
    if parts.scheme not in ("http", "https"):
        raise AddressRefused("address scheme is not http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise AddressRefused("address carries user information")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        raise AddressRefused("address has a path, query or fragment: only a base URL is dialled")
    host = parts.hostname
    if not host or port is None or port == 0:
        raise AddressRefused("address lacks a host or an explicit port")
    if not (_HOST_NAME.fullmatch(host) or (":" in host and _ip(host) is not None)):
        raise AddressRefused("address host is neither a DNS name nor an IP address")
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}"


def host_kind(host: str) -> str:
    """"loopback", "private", "public", "link_local", "multicast", "unspecified" or "reserved"."""
    name = host.lower().rstrip(".")
    address = _ip(name)
    if address is None:
        if name == "localhost" or name.endswith(".localhost"):
            return "loopback"
        if name.endswith(".local") or "." not in name:
            return "private"
        return "public"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "private"
    return "public"


def reach_of(own_url: str) -> Reach:
    """The reach of a node whose public URL is `own_url` (a base URL)."""
    kind = host_kind(urlsplit(base_url(own_url)).hostname or "")
    if kind == "loopback":
        return Reach.LOOPBACK
    if kind == "public":
        return Reach.PUBLIC
    return Reach.PRIVATE  # private, and the odd ones (a node bound to 0.0.0.0 without --public-url): treat as a LAN


def check_dialable(url: str, policy: AddressPolicy) -> str:
    """The canonical base URL of `url` if `policy` lets the node dial it; else `AddressRefused`.

    The message names the rule, never what is at the address.
    """
    canonical = base_url(url)
    if not policy.plain_http and canonical.startswith("http:"):
        raise AddressRefused("a plain http address is never dialled by a TLS node: it carries no identity")
    if canonical in policy.trusted:
        return canonical
    kind = host_kind(urlsplit(canonical).hostname or "")
    if kind in _NEVER:
        raise AddressRefused(f"a {kind.replace('_', '-')} address is never dialled for a peer")
    if kind not in _ALLOWED[policy.reach]:
        raise AddressRefused(f"a node on a {policy.reach.value} address does not dial {kind} addresses that peers name")
    return canonical


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP a host string spells, in any form a resolver would take as a literal; None for a name."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if name and all(c in "0123456789abcdefx." for c in name) and (name[0].isdigit()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))  # short and numeric forms: 127.1, 2130706433, 0x7f.1
        except OSError:
            return None
    return None
