"""`swarm-node`: serve a span of a model's blocks to the swarm.

Only this module parses arguments, configures logging and prints. It prints one
line on stdout when the node is ready to serve:

    ready peer=<id> url=<url> blocks=<start>:<end> model=<id> throughput=<blocks/s> [metrics=<url>]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from node.compute import MainThreadExecutor
from swarm.aliases import DEFAULT_MODEL
from swarm.errors import SwarmError

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


def lock_identity(path: Path):
    """Hold an exclusive lock beside the key for the node's lifetime: two nodes, one identity is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_suffix(path.suffix + ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SwarmError(f"identity {path} is in use by another node on this machine: give this one its own --identity") from None
    return handle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-node",
        description="Serve blocks [START, END) of a model to a layerswarm swarm over HTTP and websockets.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--blocks", type=parse_blocks, default=None, metavar="START:END|auto", help="the blocks to serve, e.g. 0:10, or auto: the --num-blocks where the swarm is weakest, moving when that changes (required unless --no-model)")
    parser.add_argument("--num-blocks", type=int, default=None, metavar="K", help="with --blocks auto: how many contiguous blocks to hold")
    parser.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE", help="with --blocks auto and no --num-blocks: hold as many blocks as fit in SIZE beside --kv-memory")
    parser.add_argument("--rebalance-period", type=float, default=30.0, metavar="SECONDS", help="with --blocks auto: how often to check the swarm's coverage (default 30)")
    parser.add_argument("--min-dwell", type=float, default=120.0, metavar="SECONDS", help="with --blocks auto: never move sooner than this after the last move (default 120)")
    parser.add_argument("--no-model", action="store_true", help="hold no blocks: only help peers find each other (a bootstrap peer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    parser.add_argument("--public-url", default=None, help="URL peers should dial, when it differs from https://HOST:PORT (http:// with --insecure-http)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads torch uses for this node's compute (default: torch's choice, one per core). On a small box "
        "shared with other nodes or a server, fewer threads each waste less time waiting on each other",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="compute dtype (default float32 on cpu, bfloat16 on cuda)")
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
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity on stderr (default warning)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads libgomp: idle OpenMP threads spin only briefly before sleeping. With
    # the default (300k spins) an idle node keeps the cores busy after every step and slows
    # the next hop on the same machine: three loopback hops of ten blocks each took 15 ms a
    # hop instead of 9.5 (2-core CI box). Set GOMP_SPINCOUNT yourself to override.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.blocks is None) == (not args.no_model):
        parser.error("give --blocks START:END, or --no-model for a bootstrap peer that holds no blocks")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.blocks == "auto" and not ((args.num_blocks and args.num_blocks > 0) or args.max_memory):
        parser.error("--blocks auto needs --num-blocks K or --max-memory SIZE")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # see swarm.wire.unpack_tensor
    try:
        config = _node_config(args)
        lock, identity = _identity(args)
        span, fingerprint, loader = _load(args)  # on the main thread, which computes with it (node/compute.py)
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve_beside(args, config, identity, span, fingerprint, loader)
    finally:
        lock.close()


def _identity(args: argparse.Namespace):
    from swarm.identity import Identity

    path = args.identity or default_identity_path()
    lock = lock_identity(path)
    return lock, Identity.load_or_create(path)


def _load(args: argparse.Namespace):
    """(span, fingerprint, loader) of the blocks to serve, or Nones for a bootstrap peer.

    `loader(start, end)` reads another span of the same checkpoint, for `--blocks auto` moves.
    """
    if args.blocks is None:
        return None, None, None
    import torch

    from swarm.model import load_span, open_checkpoint
    from swarm.progress import progress_bar

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    def loader(start: int, end: int):  # a bar on a terminal only (node/cli.py draws; nothing in tests or logs)
        with open_checkpoint(args.model) as checkpoint, progress_bar(f"loading blocks {start}:{end}") as show:
            return load_span(checkpoint, start, end, dtype, device, progress=show)

    with open_checkpoint(args.model) as checkpoint:
        fingerprint = checkpoint.fingerprint()
        blocks = args.blocks if args.blocks != "auto" else _auto_blocks(args, fingerprint.digest, checkpoint.config)
    return loader(*blocks), fingerprint, loader


def _auto_blocks(args: argparse.Namespace, digest: str, config) -> tuple[int, int]:
    """Where the swarm known to the bootstrap peers is weakest (an empty or unreachable swarm: anywhere)."""
    import random

    from node.balance import block_throughput, choose_span
    from swarm.discovery.peers_http import fetch_peers

    async def records():
        found = []
        async with _transport(args).client_session() as http:
            for url in args.bootstrap:
                try:
                    found += await fetch_peers(http, url.rstrip("/"), 5.0)
                except SwarmError as exc:
                    logging.getLogger(__name__).warning("bootstrap %s: %s", url, exc)
        return found

    totals = block_throughput(asyncio.run(records()), digest, config.num_layers)
    return choose_span(totals, args.num_blocks or _blocks_in_memory(args, config), random.Random())


def _blocks_in_memory(args: argparse.Namespace, config) -> int:
    import torch

    from node.balance import blocks_that_fit

    element = torch.empty((), dtype=getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))).element_size()
    count = min(config.num_layers, blocks_that_fit(args.max_memory, config.block_params() * element, args.kv_memory))
    logging.getLogger(__name__).info("--max-memory %d bytes holds %d blocks", args.max_memory, count)
    return count


def _node_config(args: argparse.Namespace):
    from node.backend import BackendConfig
    from node.court import AccusationConfig
    from node.discovery import DiscoveryConfig
    from node.state import NodeConfig, RebalanceConfig
    from swarm.discovery.gossip import GossipConfig
    from swarm.discovery.mdns import MdnsConfig
    from swarm.discovery.proof import ProofConfig
    from swarm.peers import TableConfig

    try:
        proof = ProofConfig(concurrency=args.proof_concurrency, timeout_s=args.proof_timeout)
        gossip = GossipConfig(bootstrap=tuple(args.bootstrap), period_s=args.gossip_period, record_ttl_s=args.record_ttl, anchors=args.gossip_anchors, proof=proof)
        table = TableConfig(
            max_peers=args.max_peers, require_proof=True, max_pending=args.max_pending, source_budget=args.source_budget, source_window_s=args.source_window
        )
        mdns = MdnsConfig(interfaces=tuple(args.mdns_interface) or "all") if args.mdns else None
        accusations = AccusationConfig(
            quorum=args.accusation_quorum, conviction_s=args.conviction_time, false_accuser_s=args.false_accuser_time,
            source_burst=args.accusation_burst, source_interval_s=args.accusation_interval, max_rechecks=args.max_rechecks,
        )  # fmt: skip
    except ValueError as exc:
        raise SwarmError(f"bad discovery option: {exc}") from None
    if mdns is not None:
        _check_local_addresses(args.mdns_interface)
    transport = _transport(args)
    for url in args.bootstrap:
        if not transport.allows(url):
            raise SwarmError(f"--bootstrap {url}: a TLS node dials https only (give an https URL, or --insecure-http)")
    if args.public_url and not args.public_url.lower().startswith(f"{transport.scheme}://"):
        raise SwarmError(f"--public-url {args.public_url}: this node serves {transport.scheme} (--insecure-http: http, else https)")
    return NodeConfig(
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        transport=transport,
        max_frame=args.max_frame,
        session_timeout_s=args.session_timeout,
        drain_timeout_s=args.drain_timeout,
        max_tcp_per_source=args.max_tcp_per_source,
        max_forwards_per_source=args.max_forwards_per_source,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_sockets_per_source=args.max_sockets_per_source,
        max_sessions_per_source=args.max_sessions_per_source,
        socket_idle_timeout_s=args.socket_idle_timeout,
        unstepped_session_grace_s=args.unstepped_session_grace,
        backend=BackendConfig(
            max_sessions=args.max_sessions,
            kv_memory_bytes=args.kv_memory,
            max_length=args.max_length,
            max_batch_tokens=args.max_batch_tokens,
            prefill_chunk_tokens=args.prefill_chunk,
            prefill_share=args.prefill_share,
            max_forwards=args.max_forwards,
            max_forward_tokens=args.max_forward_tokens or args.max_length,
        ),
        discovery=DiscoveryConfig(gossip=gossip, mdns=mdns, table=table),
        rebalance=RebalanceConfig(period_s=args.rebalance_period, dwell_s=args.min_dwell) if args.blocks == "auto" else None,
        accusations=accusations,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        metrics_max_age_s=args.metrics_max_age,
    )


def _transport(args: argparse.Namespace):
    from swarm.membership import Membership
    from swarm.swarm_key import SwarmKey
    from swarm.transport import Transport

    membership = Membership(SwarmKey.load(args.swarm_key)) if args.swarm_key is not None else None  # KeyFileError: a SwarmError
    return Transport(insecure_http=args.insecure_http, membership=membership)


def _check_local_addresses(addresses: list[str]) -> None:
    """Each address must be one of this machine's (zeroconf would fail deep inside with ENODEV)."""
    import socket

    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError as exc:
                raise SwarmError(f"--mdns-interface {address} is not an address of this machine ({exc.strerror})") from None


def _device(name: str):
    """The torch device `--device` names, or `SwarmError` for one this machine cannot use."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SwarmError(f"--device {name!r} is not a device (try cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise SwarmError(f"--device {name}: this machine (or this torch build) has no {device.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise SwarmError(f"--device {name}: there are only {count} {device.type} devices")
    return device


def _serve_beside(args: argparse.Namespace, config, identity, span, fingerprint, loader) -> int:
    """Serve from an event loop in a second thread while this (main) thread runs the model.

    Signals arrive on the main thread; they set the loop's stop event, and the loop
    shuts down gracefully (node/server.py) and then releases the compute thread.
    """
    from node.server import serve

    compute = MainThreadExecutor()
    outcome: dict[str, object] = {}
    control: dict[str, object] = {}

    def ready(state) -> None:
        blocks = f"{span.start}:{span.end}" if span is not None else "none"
        throughput = state.backend.throughput if state.backend else 0.0
        metrics = f" metrics={state.metrics_url}" if state.metrics_url else ""
        print(f"ready peer={state.identity.peer_id} url={state.url} blocks={blocks} model={fingerprint or 'none'} throughput={throughput:.1f}{metrics}", flush=True)

    def event_loop() -> None:
        async def run() -> None:
            control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
            if control.get("stop_requested"):
                control["stop"].set()
            await serve(span, fingerprint, identity, config, ready=ready, stop=control["stop"], executor=compute, loader=loader)

        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
            outcome["error"] = exc
        finally:
            compute.shutdown()

    def request_stop(*_) -> None:
        control["stop_requested"] = True
        loop, stop = control.get("loop"), control.get("stop")
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    thread = threading.Thread(target=event_loop, name="event-loop")
    thread.start()
    compute.run()
    thread.join()
    error = outcome.get("error")
    if isinstance(error, (SwarmError, OSError)):  # OSError: a port in use, an interface gone
        print(f"error: {error}", file=sys.stderr)
        return 2
    if error is not None:
        raise error
    return 0


if __name__ == "__main__":
    sys.exit(main())
