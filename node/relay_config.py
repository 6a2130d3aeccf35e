"""How a node uses relays and offers relaying: one frozen `RelayConfig`, built from flags in cli.

Two roles, both optional and independent:
- *relayed*: a node that cannot be dialled (behind NAT) holds up to `count` relays and names
  their URLs as its own addresses (node/relay_link.py). `mode` "auto" picks proven peers that
  offer relaying; "urls" uses the operator's `urls`; "off" never relays. A node is relayed only
  when a peer's dial-back found it undialable (node/reachability.py), or always with `always`.
- *relay*: a node that can be dialled relays for at most `capacity` nodes, each limited to
  `connections_per_node` spliced connections (shared fairly among sources) and
  `bytes_per_s_per_node` (node/relay_host.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class RelayTarget(NamedTuple):
    """One relay: its peer id (every dial to it is pinned) and its base URL."""

    peer_id: str
    url: str


@dataclass(frozen=True)
class RelayConfig:
    mode: str = "auto"  # "auto" | "urls" | "off"
    urls: tuple[str, ...] = ()  # operator-given relay URLs (mode "urls"), dialled in this order
    always: bool = False  # relay even when dialable: hides the node's own address (and tests, benchmarks)
    count: int = 2  # relays held at once: each is named in the record, so one dying leaves another in place
    heartbeat_s: float = 5.0  # control websocket heartbeat: a silent relay is noticed within about this
    # --- offering relaying ---
    capacity: int = 16  # nodes relayed for at once; 0: this node relays for nobody
    connections_per_node: int = 32  # spliced connections open at once per relayed node
    bytes_per_s_per_node: int = 8 << 20  # bandwidth per relayed node, both directions together
    dial_timeout_s: float = 5.0  # how long a dialler waits for the relayed node to dial back

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "urls", "off"):
            raise ValueError(f"relay mode is auto, urls or off, not {self.mode!r}")
        if self.mode == "urls" and not self.urls:
            raise ValueError("relay mode urls needs at least one URL")
        if self.count < 1 or self.capacity < 0 or self.connections_per_node < 1 or self.bytes_per_s_per_node < 1:
            raise ValueError("relay count, connections and bandwidth must be positive, capacity not negative")
        if not (self.heartbeat_s > 0 and self.dial_timeout_s > 0):
            raise ValueError("relay heartbeat and dial timeout must be positive")

    def limits(self) -> dict[str, Any]:
        """For /info."""
        return {
            "mode": self.mode,
            "always": self.always,
            "count": self.count,
            "capacity": self.capacity,
            "connections_per_node": self.connections_per_node,
            "bytes_per_s_per_node": self.bytes_per_s_per_node,
            "dial_timeout_s": self.dial_timeout_s,
        }


def relay_config_from_flags(relay: list[str], always: bool, count: int, capacity: int, connections: int, bandwidth: int) -> RelayConfig:
    """`--relay` values ("auto", "off" or URLs, repeatable) and the other relay flags as a config."""
    values = relay or ["auto"]
    words = [v for v in values if v in ("auto", "off")]
    urls = tuple(v for v in values if v not in ("auto", "off"))
    if len(set(words)) > 1 or (words and urls):
        raise ValueError("--relay is auto, off, or one or more URLs: not a mix")
    mode = "urls" if urls else words[0]
    return RelayConfig(mode=mode, urls=urls, always=always, count=count, capacity=capacity, connections_per_node=connections, bytes_per_s_per_node=bandwidth)
