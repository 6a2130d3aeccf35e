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
import signal
import sys
import threading
import warnings
from pathlib import Path

from node.compute import MainThreadExecutor
from node.flags import build_parser, default_identity_path
from node.relay_config import RelayConfig, relay_config_from_flags
from swarm.errors import SwarmError


def lock_identity(path: Path):
    """Hold an exclusive lock on the key file for the node's lifetime: two nodes, one identity is an error.

    The key itself, opened read-only, not a file beside it: flock needs no write access, so a key
    mounted read-only in a directory the node cannot write (a container's /run/secrets) locks too."""
    handle = open(path, "rb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SwarmError(f"identity {path} is in use by another node on this machine: give this one its own --identity") from None
    return handle


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
    if args.num_blocks is not None and args.num_blocks < 1:
        parser.error("--num-blocks must be at least 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # see swarm.wire.unpack_tensor
    try:
        config = _node_config(args)
        lock, identity = _identity(args)
        span, fingerprint, loader = _load(args)  # on the main thread, which computes with it (node/compute.py)
        head = _load_head(args, span) if args.serve_head and span is not None else None
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve_beside(args, config, identity, span, fingerprint, loader, head)
    finally:
        lock.close()


def _identity(args: argparse.Namespace):
    from swarm.identity import Identity

    path = args.identity or default_identity_path()
    identity = Identity.load_or_create(path)  # creating is race-free (swarm/identity.py); then the lock says who holds it
    return lock_identity(path), identity


def _load(args: argparse.Namespace):
    """(span, fingerprint, loader) of the blocks to serve, or Nones for a bootstrap peer.

    `loader(start, end)` reads another span of the same checkpoint, for `--blocks auto` moves.
    """
    if args.blocks is None:
        return None, None, None
    import torch

    from swarm.model import load_span, open_checkpoint
    from swarm.model.quant import release_freed_memory
    from swarm.progress import progress_bar

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    def loader(start: int, end: int):  # a bar on a terminal only (node/cli.py draws; nothing in tests or logs)
        with open_checkpoint(args.model) as checkpoint, progress_bar(f"loading blocks {start}:{end}") as show:
            span = load_span(checkpoint, start, end, dtype, device, progress=show, quant=args.quant)
        release_freed_memory()
        return span

    with open_checkpoint(args.model) as checkpoint:
        fingerprint = checkpoint.fingerprint()
        blocks = args.blocks if args.blocks != "auto" else _auto_blocks(args, fingerprint.digest, checkpoint, dtype, device)
    return loader(*blocks), fingerprint, loader


def _auto_blocks(args: argparse.Namespace, digest: str, checkpoint, dtype, device) -> tuple[int, int]:
    """Where the swarm known to the bootstrap peers is weakest (an empty or unreachable swarm: anywhere),
    `--num-blocks` of them, or as many as this node's measured speed earns (node/balance.py)."""
    import random

    from node.balance import block_throughput, choose_span, peer_speeds, speed_share
    from node.speed import block_speed
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

    layers = checkpoint.config.num_layers
    found = asyncio.run(records())
    count = args.num_blocks
    if count is None:
        speed, peers = block_speed(checkpoint, dtype, device, quant=args.quant), peer_speeds(found, digest, layers)
        count = min(speed_share(speed, peers, layers), _block_cap(args, checkpoint.config))
        logging.getLogger(__name__).info("%.1f blocks/s beside %d peers of this model: %d blocks", speed, len(peers), count)
    return choose_span(block_throughput(found, digest, layers), count, random.Random())


def _block_cap(args: argparse.Namespace, config) -> int:
    """The most blocks this node may hold: what fits in --max-memory beside --kv-memory, else in the
    GPU's free memory; a CPU node without --max-memory may hold the whole model. A block counts
    the bytes it really takes with --quant (int8: about a quarter of float32)."""
    import torch

    from node.balance import blocks_that_fit
    from swarm.model.quant import block_bytes

    device = _device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    memory = args.max_memory
    if memory is None and device.type == "cuda":
        memory = torch.cuda.mem_get_info(device)[0]  # free bytes now, before this node loads anything
    if memory is None:
        return config.num_layers
    count = min(config.num_layers, blocks_that_fit(memory, block_bytes(config, dtype, args.quant, device), args.kv_memory))
    logging.getLogger(__name__).info("%d bytes of memory hold %d blocks", memory, count)
    return count


def _node_config(args: argparse.Namespace):
    from node.court import AccusationConfig
    from node.discovery import DiscoveryConfig
    from node.state import NodeConfig
    from node.steps import BackendConfig
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
    for url in args.public_url:
        if not url.lower().startswith(f"{transport.scheme}://"):
            raise SwarmError(f"--public-url {url}: this node serves {transport.scheme} (--insecure-http: http, else https)")
    return NodeConfig(
        host=args.host,
        port=args.port,
        public_url=args.public_url[0] if args.public_url else None,
        extra_urls=tuple(args.public_url[1:]),
        transport=transport,
        relay=_relay_config(args),
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
        rebalance=_rebalance_config(args),
        accusations=accusations,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        metrics_max_age_s=args.metrics_max_age,
    )


def _rebalance_config(args: argparse.Namespace):
    """`--blocks auto`: move where the swarm is weakest; without --num-blocks also resize by speed, within memory."""
    from node.state import RebalanceConfig

    if args.blocks != "auto":
        return None
    if args.num_blocks is not None:
        return RebalanceConfig(period_s=args.rebalance_period, dwell_s=args.min_dwell)
    from swarm.model import open_checkpoint

    with open_checkpoint(args.model) as checkpoint:
        cap = _block_cap(args, checkpoint.config)
    return RebalanceConfig(period_s=args.rebalance_period, dwell_s=args.min_dwell, resize=True, max_blocks=cap)


def _transport(args: argparse.Namespace):
    from swarm.membership import Membership
    from swarm.swarm_key import SwarmKey
    from swarm.transport import Transport

    membership = Membership(SwarmKey.load(args.swarm_key)) if args.swarm_key is not None else None  # KeyFileError: a SwarmError
    return Transport(insecure_http=args.insecure_http, membership=membership)


def _relay_config(args: argparse.Namespace) -> RelayConfig:
    try:
        return relay_config_from_flags(args.relay, args.relay_always, args.relay_count, args.relay_capacity, args.relay_connections, args.relay_bandwidth)
    except ValueError as exc:
        raise SystemExit(f"swarm-node: {exc}") from None


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


def _load_head(args: argparse.Namespace, span):
    """`--serve-head`: the final norm and LM head, beside the blocks (same device and dtype); None for a
    fixed span that does not end at the model's last block (one flag for a whole fleet: only the
    nodes at the end take it). With --blocks auto the head is held wherever the span goes."""
    from node.head_service import load_lm_head
    from swarm.model import open_checkpoint

    num_layers = span.config.num_layers
    if args.blocks != "auto" and span.end != num_layers:
        logging.getLogger(__name__).warning("--serve-head ignored: blocks %d:%d do not end at the model's last block (%d)", span.start, span.end, num_layers)
        return None
    with open_checkpoint(args.model) as checkpoint:
        return load_lm_head(checkpoint, span.dtype, span.device)


def _serve_beside(args: argparse.Namespace, config, identity, span, fingerprint, loader, head=None) -> int:
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
            await serve(span, fingerprint, identity, config, ready=ready, stop=control["stop"], executor=compute, loader=loader, head=head)

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
