"""`swarm-node`'s flags: the parser and the checks of each value (sizes, block ranges, ports).

node/cli.py turns the parsed flags into the node's frozen configs and runs it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from swarm.aliases import DEFAULT_MODEL

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1g', '1048576' -> bytes (powers of 1024 for the i forms, 1000 otherwise)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)")
    number, unit, suffix = match.groups()
    base = 1024 if (suffix or "").lower() == "ib" or (unit and not suffix) else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def parse_blocks(text: str) -> tuple[int, int] | str:
    if text == "auto":
        return text
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocks must be START:END, e.g. 0:10, not {text!r}") from None
    return start, end


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def default_identity_path() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "layerswarm" / "node.key"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-node",
        description="Serve blocks [START, END) of a model to a layerswarm swarm over HTTP and websockets.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--blocks", type=parse_blocks, default=None, metavar="START:END|auto", help="the blocks to serve, e.g. 0:10, or auto: where the swarm is weakest, as many as --num-blocks or as this node's measured speed earns, moving (and resizing) when that changes (required unless --no-model)")
    parser.add_argument("--num-blocks", type=int, default=None, metavar="K", help="with --blocks auto: how many contiguous blocks to hold (default: the share of the model this node's speed earns beside the swarm's peers, blocks proportional to speed; README)")
    parser.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE", help="with --blocks auto and no --num-blocks: hold at most as many blocks as fit in SIZE beside --kv-memory (default: a GPU's free memory; on cpu the whole model)")
    parser.add_argument("--rebalance-period", type=float, default=30.0, metavar="SECONDS", help="with --blocks auto: how often to check the swarm's coverage (default 30)")
    parser.add_argument("--min-dwell", type=float, default=120.0, metavar="SECONDS", help="with --blocks auto: never move sooner than this after the last move (default 120)")
    parser.add_argument("--no-model", action="store_true", help="hold no blocks: only help peers find each other (a bootstrap peer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    parser.add_argument("--public-url", action="append", default=[], metavar="URL", help="URL peers should dial, when it differs from https://HOST:PORT (http:// with --insecure-http); repeatable: the node's addresses, preferred first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads torch uses for this node's compute (default: torch's choice, one per core). On a small box "
        "shared with other nodes or a server, fewer threads each waste less time waiting on each other; on a Raspberry Pi "
        "give its core count (or one less, to leave a core for the event loop)",
    )
    parser.add_argument(
        "--serve-head",
        action="store_true",
        help="also hold the final norm and LM head, and apply them for clients that ask (a client without a GPU): "
        "only while this node serves the model's last block (ignored by one that never does), and it then sees each step's most likely next tokens, "
        "which is the generated text (README: Serving the head)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="compute dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument(
        "--quant",
        choices=("none", "int8", "q4_1"),
        default="none",
        help="weights: none (the compute dtype's); int8 (weight-only, one float scale per output channel: a quarter of "
        "float32's memory and faster CPU decode, for small boxes); or q4_1 (CPU only, a GGUF whose blocks are Q4_1, "
        "such as the default model: its own 4-bit blocks served as stored, an eighth of float32's memory, the fastest "
        "CPU decode). Activations stay in --dtype; peers see the precision (int8, q4_1) and clients that require full "
        "precision route around it; README: Edge nodes (default none)",
    )
    parser.add_argument("--max-sessions", type=int, default=64, help="concurrent sessions before refusing as busy (default 64)")
    parser.add_argument("--kv-memory", type=parse_size, default=parse_size("2GiB"), metavar="SIZE", help="budget for all KV caches, e.g. 512MiB (default 2GiB)")
    parser.add_argument("--max-length", type=int, default=8192, help="longest session in tokens (default 8192, capped by the model)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS", help="on SIGTERM, keep serving open sessions this long while their clients move them elsewhere (default 10)")
    parser.add_argument("--session-timeout", type=float, default=300.0, metavar="SECONDS", help="free an idle session's cache after this (default 300)")
    parser.add_argument("--max-frame", type=parse_size, default=parse_size("64MiB"), metavar="SIZE", help="largest accepted frame (default 64MiB)")
    limits = parser.add_argument_group("limits", "what one stranger may take (per source: an IPv4 address or an IPv6 /64; 0: no limit); all shown in /info")
    limits.add_argument("--max-tcp-per-source", type=_count, default=64, metavar="N", help="open TCP connections from one source; more are answered busy and closed (default 64)")
    limits.add_argument("--max-sockets-per-source", type=_count, default=64, metavar="N", help="open /session websockets from one source; more are answered busy and closed (default 64)")
    limits.add_argument("--max-sessions-per-source", type=_count, default=32, metavar="N", help="open sessions owned by one source (default 32)")
    limits.add_argument("--max-forwards-per-source", type=_count, default=2, metavar="N", help="concurrent POST /forward from one source (default 2)")
    limits.add_argument("--max-forwards", type=_positive, default=4, metavar="N", help="POST /forward in the node at once, from all sources; more are answered busy (default 4)")
    limits.add_argument("--max-forward-tokens", type=_positive, default=None, metavar="N", help="longest POST /forward in tokens (default: --max-length, since a client's failover replays a whole session prefix through it)")
    limits.add_argument("--max-batch-tokens", type=_positive, default=8192, metavar="N", help="tokens in one batched forward, summed over sessions (default 8192)")
    limits.add_argument("--prefill-chunk", type=_positive, default=32, metavar="N", help="longer steps and forwards run in chunks of N tokens behind one-token steps, so a long prompt delays others by one chunk at most (default 32, for CPU; a GPU takes 512 or more)")
    limits.add_argument("--prefill-share", type=_share, default=0.5, metavar="FRACTION", help="while one-token steps come, chunks of long steps take at most this share of compute time (default 0.5; 1: no pause)")
    limits.add_argument("--header-timeout", type=_seconds, default=20.0, metavar="SECONDS", help="a connection's request headers must arrive within this; also how long an idle connection stays open, so keep it above clients' keep-alive (aiohttp: 15 s) (default 20)")
    limits.add_argument("--body-timeout", type=_seconds, default=30.0, metavar="SECONDS", help="a request's body must arrive within this (default 30)")
    limits.add_argument("--socket-idle-timeout", type=_seconds, default=120.0, metavar="SECONDS", help="close a /session websocket that owns no session and sent nothing for this long (default 120)")
    limits.add_argument("--unstepped-session-grace", type=_seconds, default=30.0, metavar="SECONDS", help="free a session that was opened but never stepped after this (default 30)")
    peers = parser.add_argument_group("peer admission", "how records of new peers are proven and budgeted (see swarm/peers.py); all shown in /info")
    peers.add_argument("--max-peers", type=_positive, default=10_000, metavar="N", help="peers held, proven and pending together (default 10000)")
    peers.add_argument("--max-pending", type=_positive, default=256, metavar="N", help="records of new peers awaiting their proof, all sources together (default 256)")
    peers.add_argument("--source-budget", type=_positive, default=64, metavar="N", help="new peers one source (an IP, or the peer that answered) may propose per --source-window (default 64)")
    peers.add_argument("--source-window", type=_seconds, default=10.0, metavar="SECONDS", help="the window of --source-budget (default 10)")
    peers.add_argument("--proof-timeout", type=_seconds, default=2.0, metavar="SECONDS", help="how long a new peer's address has to answer our nonce with its key (default 2)")
    peers.add_argument("--proof-concurrency", type=_positive, default=16, metavar="N", help="proofs in flight at once (default 16)")
    peers.add_argument("--gossip-anchors", type=_count, default=2, metavar="N", help="peers of longest standing gossiped with every round, besides bootstrap and random peers (default 2)")
    court = parser.add_argument_group("accusations", "how this node judges accusations of wrong outputs (see node/court.py)")
    court.add_argument("--accusation-quorum", type=_positive, default=2, metavar="N", help="for blocks this node does not hold, believe a conviction only with verdicts of N distinct proven peers holding them (default 2)")
    court.add_argument("--conviction-time", type=_seconds, default=30 * 86400.0, metavar="SECONDS", help="how long a convicted peer stays out of this node's table (default 2592000: 30 days)")
    court.add_argument("--false-accuser-time", type=_seconds, default=3600.0, metavar="SECONDS", help="how long an accuser whose charge did not hold is refused (default 3600)")
    court.add_argument("--accusation-burst", type=_positive, default=4, metavar="N", help="accusations one source may send at once; then one per --accusation-interval; more are answered busy (default 4)")
    court.add_argument("--accusation-interval", type=_seconds, default=10.0, metavar="SECONDS", help="see --accusation-burst (default 10)")
    court.add_argument("--max-rechecks", type=_positive, default=1, metavar="N", help="accusations re-run on this node's blocks at once; more are answered busy (default 1)")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="URL", help="a peer to announce to and gossip with, e.g. https://10.0.0.5:7000 (repeatable)")
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve and advertise plain http, and dial http peers too (no encryption, no identity pinning); "
        "by default the node serves TLS with a certificate carrying its identity key and dials only https peers, each pinned to its peer id",
    )
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="join the private swarm of this key (made by `swarm keygen > FILE`, chmod 600): every request, websocket "
        "and gossip exchange then proves the key, peers without it are refused and never listed, and mDNS reveals "
        "nothing of the swarm; default: the open swarm",
    )
    parser.add_argument("--gossip-period", type=float, default=5.0, metavar="SECONDS", help="seconds between gossip rounds (default 5)")
    parser.add_argument("--record-ttl", type=float, default=60.0, metavar="SECONDS", help="lifetime of this node's signed record; a dead node leaves every table within about this (default 60)")
    parser.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=False, help="advertise and browse on the LAN with mDNS (default off: it multicasts on your network)")
    parser.add_argument("--mdns-interface", action="append", default=[], metavar="IP", help="address of an interface for mDNS (repeatable; default all interfaces)")
    parser.add_argument("--identity", type=Path, default=None, metavar="PATH", help=f"Ed25519 key file, created on first start (default {default_identity_path()})")
    metrics = parser.add_argument_group("metrics", "Prometheus text format at GET /metrics (the names: README, Metrics)")
    metrics.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="also serve /metrics, and nothing else, on plain HTTP at --metrics-host:PORT (0: any free port; its URL ends the ready line). "
        "/metrics is always on the node's own port too, but in a private swarm (--swarm-key) every route there needs the key, "
        "which Prometheus cannot prove: scrape this port instead (default: off)",
    )
    metrics.add_argument(
        "--metrics-max-age",
        type=_non_negative,
        default=1.0,
        metavar="SECONDS",
        help="reuse a rendering of /metrics for this long, however many scrapes come: anyone can ask an open node for it (default 1; 0: render every scrape)",
    )
    metrics.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST", help="address of the --metrics-port listener (default 127.0.0.1: this machine only)")
    relaying = parser.add_argument_group(
        "relaying",
        "for nodes that cannot be dialled (behind NAT): connections reach them through relays, end to end encrypted (README, Behind NAT)",
    )
    relaying.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="auto|off|URL",
        help="auto (default): if a peer's dial-back finds this node undialable, hold relays among proven peers that offer relaying; "
        "URL (repeatable): use these relays; off: never use a relay",
    )
    relaying.add_argument("--relay-always", action="store_true", help="hold relays even when this node can be dialled: its record then names only the relays, not its own address")
    relaying.add_argument("--relay-count", type=_positive, default=2, metavar="N", help="relays held at once, all named in the record: one dying leaves the others (default 2)")
    relaying.add_argument("--relay-capacity", type=_count, default=16, metavar="N", help="relay for at most N nodes that cannot be dialled, when this node can be (default 16; 0: relay for nobody)")
    relaying.add_argument("--relay-connections", type=_positive, default=32, metavar="N", help="connections open at once through this relay to one relayed node; when all are taken, a source holding fewer than the top one closes that one's oldest, others are closed (default 32)")
    relaying.add_argument("--relay-bandwidth", type=parse_size, default=parse_size("8MiB"), metavar="SIZE", help="bytes per second relayed for one node, both directions together; more waits (default 8MiB)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity on stderr (default warning)")
    return parser
