"""`swarm serve`: its flags, its config and its run; client/cli.py adds the subcommand from here."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
from collections.abc import Callable
from pathlib import Path

from client.speculate import MAX_DRAFT
from swarm.errors import KeyFileError, SwarmError


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 and /metrics (the page at / stays open)",
    )
    key.add_argument(
        "--api-key-file",
        metavar="FILE",
        type=Path,
        default=None,
        help="as --api-key, the key read from FILE (keeps it out of the process list)",
    )
    key.add_argument(
        "--no-api-key",
        action="store_true",
        help="serve without a key on a --host other than loopback: anyone who reaches the port then runs generations on the swarm. "
        "Without it, a non-loopback --host needs --api-key or --api-key-file",
    )
    parser.add_argument(
        "--model-id", default="", help="the model name the API lists and requests use (default: the checkpoint's alias)"
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=64,
        metavar="N",
        help="generations running at once; beyond it requests get 429 busy (default 64)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads torch uses for the head (default: torch's choice, one per core); fewer on a box shared with nodes",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=512,
        metavar="N",
        help="new tokens for a request that gives no max_tokens (default 512, capped by the context left)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def serve_config(args: argparse.Namespace):
    """The server's config from its flags; refuses an open server reachable from other machines."""
    from client.serve import ServeConfig

    api_key = args.api_key
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as exc:
            raise KeyFileError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from None
        if not api_key:
            raise KeyFileError(f"--api-key-file {args.api_key_file} is empty")
    if api_key is None and not args.no_api_key and not _loopback(args.host):
        raise SwarmError(
            f"--host {args.host} lets other machines reach the API: give --api-key KEY or --api-key-file FILE, or --no-api-key to serve it to anyone"
        )
    if args.max_concurrent < 1 or args.default_max_tokens < 1:
        raise SwarmError("--max-concurrent and --default-max-tokens must be at least 1")
    if not 0 <= args.max_draft <= MAX_DRAFT:
        raise SwarmError(f"--max-draft must be in [0, {MAX_DRAFT}], not {args.max_draft}")
    return ServeConfig(
        host=args.host,
        port=args.port,
        api_key=api_key or None,
        model_id=args.model_id,
        max_concurrent=args.max_concurrent,
        default_max_tokens=args.default_max_tokens,
        speculate=args.speculate,
        max_draft=args.max_draft,
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def run_serve(args: argparse.Namespace, make_model: Callable[[], object]) -> int:
    """Check the flags, load the model's head, serve until SIGINT or SIGTERM."""
    from client.serve import run_server

    config = serve_config(args)  # before the model loads: a refused flag answers at once
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model = make_model()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_server(
            model,
            config,
            ready=lambda url: print(f"ready url={url} model={config.model_id or model.name}", flush=True),
            stop=stop,
        )

    try:
        asyncio.run(serve())
    except OSError as exc:  # the port is taken, the address is not ours
        raise SwarmError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
