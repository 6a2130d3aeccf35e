"""The internet on one machine: an "inet" namespace that routes nothing, and sites behind it.

    inet namespace "<tag>inet": lo up, the public address 10.214.X.1/32 on lo; one link per
        site, inet side 10.214.X.(4s+1)/30; ip_forward=0, so a packet from one site to
        another is dropped here: sites reach inet's own addresses, never each other.
    site namespace "<tag>s<i>": eth0 = 10.214.X.(4s+2)/30, default route via inet.
    A site made `behind_nat` drops nothing outgoing but rejects every new inbound TCP
    connection (nftables, conntrack: established and related traffic passes), as a home
    router does: nobody can dial a server there, not inet, not another site. It rejects
    with a TCP reset instead of dropping silently, so a dial-back fails in a round trip
    rather than a timeout (routers do either; the node must handle both, and a timeout
    only costs the check's 3 s).

Same rule as tests/netns.py: every connection starts inside a namespace; the root
namespace never connects to these addresses.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from tests.netns import Namespaces, ip, require

_ids = itertools.count()
NAT_RULES = """
table inet home_router {
    chain input {
        type filter hook input priority 0; policy accept;
        iif "lo" accept
        ct state established,related accept
        tcp flags & (syn | ack) == syn reject with tcp reset
    }
}
"""


@dataclass(frozen=True)
class Site:
    namespace: str
    address: str  # on eth0
    link: str  # the inet side of its link (what a capture listens on)
    behind_nat: bool


class Internet(Namespaces):
    """`sites` namespaces behind one routing-free inet namespace; `nat[i]`: site i rejects inbound TCP."""

    def __init__(self, nat: Sequence[bool]) -> None:
        require()
        super().__init__()
        self.tag = f"lsi{os.getpid() % 10000}x{next(_ids)}"
        self.inet = f"{self.tag}inet"
        octet = (os.getpid() + next(_ids)) % 200 + 20
        self.prefix = f"10.214.{octet}"
        self.public = f"{self.prefix}.1"  # inet's own address: where relays and the bootstrap peer listen
        self.sites = [Site(f"{self.tag}s{i}", f"{self.prefix}.{4 * i + 6}", f"l{i}", flag) for i, flag in enumerate(nat)]

    def _build(self) -> None:
        self._add_namespace(self.inet)
        ip("link", "set", "lo", "up", namespace=self.inet)
        ip("addr", "add", f"{self.public}/32", "dev", "lo", namespace=self.inet)
        self.run(self.inet, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=True)
        for i, site in enumerate(self.sites):
            self._add_namespace(site.namespace)
            ip("link", "set", "lo", "up", namespace=site.namespace)
            ip("link", "add", site.link, "type", "veth", "peer", "name", "eth0", "netns", site.namespace, namespace=self.inet)
            inet_side = f"{self.prefix}.{4 * i + 5}"
            ip("addr", "add", f"{inet_side}/30", "dev", site.link, namespace=self.inet)
            ip("link", "set", site.link, "up", namespace=self.inet)
            ip("addr", "add", f"{site.address}/30", "dev", "eth0", namespace=site.namespace)
            ip("link", "set", "eth0", "up", namespace=site.namespace)
            ip("route", "add", "default", "via", inet_side, namespace=site.namespace)
            if site.behind_nat:
                subprocess.run(["ip", "netns", "exec", site.namespace, "nft", "-f", "-"], input=NAT_RULES, text=True, check=True, timeout=10)

    def run(self, namespace: str, argv: Sequence[str], check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion inside `namespace`."""
        return subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, timeout=60, check=check)
