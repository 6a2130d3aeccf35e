"""`swarm`: the command-line client.

Only this module parses arguments, configures logging and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import replace

from client.cli_admin import cmd_keygen, cmd_peers
from client.cli_args import (
    add_client,
    add_discovery,
    add_sampling,
    add_speculation,
    discovery_options,
    dtype_of,
    sampling_params,
    transport_of,
)
from swarm.aliases import DEFAULT_MODEL
from swarm.errors import SwarmError


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if args.bootstrap or args.mdns:
        return _generate_swarm(args, params)
    from client.generate import GenerationStats, LocalBlocks, stream_tokens
    from client.local import LocalModel
    from swarm.progress import progress_bar

    with progress_bar("loading the model", unit="part") as show:  # a bar on a terminal only
        model = LocalModel.load(args.model, dtype_of(args), args.device, progress=show)
    prompt_ids = model.head.encode_prompt(args.prompt, chat=args.chat)
    blocks = LocalBlocks(model.span, len(prompt_ids) + params.max_new_tokens)
    drafter = _local_drafter(args, model) if params.drafts else None

    async def pieces():
        stats = GenerationStats()
        async for token in stream_tokens(model.head, blocks, prompt_ids, params, stats, model.batcher, drafter):
            yield token.text, stats, ["local"]

    return _print_stream(args, pieces(), model.head.device)


def _local_drafter(args: argparse.Namespace, model):
    """--draft-model for a local run: the model itself shares its weights (early exit), another is loaded."""
    if args.draft_model is None:
        if args.draft_blocks is not None:
            raise SwarmError("--draft-blocks needs --draft-model")
        return None
    from client.draft_model import DraftModel
    from swarm.model import resolve_model

    if resolve_model(args.draft_model) == resolve_model(args.model):
        return model.drafter(args.draft_blocks or model.span.num_blocks)
    draft = DraftModel.load(args.draft_model, args.draft_blocks, model.device, dtype_of(args))
    draft.check_vocabulary(model.head)
    return draft


def _generate_swarm(args: argparse.Namespace, params) -> int:
    model = _swarm_model(args)
    return _print_stream(args, model.stream_result(model.head.encode_prompt(args.prompt, chat=args.chat), params, verify=_verify(args)), model.head.device)


def _swarm_model(args: argparse.Namespace, bootstrap: list[str] | None = None):
    from client.session import SessionConfig
    from client.swarm import ClientConfig, SwarmModel
    from swarm.progress import progress_bar

    options = discovery_options(args)  # all of it (--wait too), not only the bootstrap list
    if bootstrap is not None:
        options = replace(options, bootstrap=tuple(bootstrap))
    if not 0.0 <= args.verify_fraction <= 1.0:
        raise SwarmError(f"--verify-fraction must be in [0, 1], not {args.verify_fraction}")
    session = SessionConfig(remote_head=args.remote_head)  # the last hop's head (client/remote_head.py)
    config = ClientConfig(
        wire_dtype=args.wire_dtype, transport=transport_of(args), verify_fraction=args.verify_fraction, session=session, full_precision=args.full_precision
    )
    if args.draft_blocks is not None and args.draft_model is None:
        raise SwarmError("--draft-blocks needs --draft-model")
    with progress_bar("loading the model head", unit="part") as show:  # a bar on a terminal only
        return SwarmModel(
            args.model, discovery=options, config=config, dtype=dtype_of(args), device=args.device, progress=show,
            draft_model=args.draft_model, draft_blocks=args.draft_blocks,
        )  # fmt: skip


def _verify(args: argparse.Namespace) -> bool | None:
    """--verify checks every generation; otherwise a share of them (--verify-fraction) is drawn."""
    return True if args.verify else None


def _print_stream(args: argparse.Namespace, pieces, device=None) -> int:
    return asyncio.run(_print_stream_async(args, pieces, device))


async def _print_stream_async(args: argparse.Namespace, pieces, device=None) -> int:
    """Stream text to stdout (or collect it for --json); then a timing line on stderr at info level.

    `device`: where the head ran (for a local run, the whole model), named in the JSON."""
    chunks, stats, route = [], None, []
    async for piece, stats, route in pieces:
        chunks.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(chunks)
    if args.json:
        print(json.dumps({
            "text": text,
            "tokens": stats.token_ids,
            "finish_reason": stats.finish_reason,
            "route": route,
            "prompt_tokens": stats.prompt_tokens,
            "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
            "round_trips": stats.round_trips,
            "drafted": stats.drafted,
            "accepted": stats.accepted,
            "device": str(device) if device is not None else None,
            "verification": stats.verification.to_json() if getattr(stats, "verification", None) else None,
        }))
    else:
        sys.stdout.write("\n")
        logging.getLogger(__name__).info(
            "route %s: %d tokens, first after %.3f s, %.1f tokens/s; %d round trips, %d of %d drafts kept", " -> ".join(route),
            stats.new_tokens, stats.time_to_first_token_s, stats.decode_tokens_per_s, stats.round_trips, stats.accepted, stats.drafted,
        )  # fmt: skip
    _report_verification(args, stats)
    return 0


def _report_verification(args: argparse.Namespace, stats) -> None:
    """One line on stderr: always under --verify, otherwise only when a check found something."""
    from client.verify import Verdict

    outcome = getattr(stats, "verification", None)
    if outcome is not None and not args.json and (getattr(args, "verify", False) or outcome.verdict not in (Verdict.AGREE, Verdict.SKIPPED)):
        print(outcome.summary(), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    return asyncio.run(chat_loop(_swarm_model(args), sampling_params(args), _verify(args)))


async def _read_line(prompt: str) -> str | None:
    """input() in a daemon thread, so the loop keeps running and Ctrl-C never waits on the terminal."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def read() -> None:
        try:
            line: str | None = input(prompt)
        except (EOFError, KeyboardInterrupt):
            line = None
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(line))

    threading.Thread(target=read, daemon=True).start()
    return await future


async def chat_loop(model, params, verify: bool | None = None) -> int:
    """An interactive chat: history, the model's template, streaming; /reset, /route, /quit.

    Ctrl-C during a reply stops that reply (the chat goes on); at the prompt, Ctrl-C or Ctrl-D ends the chat.
    """
    messages: list[dict[str, str]] = []
    route: list[str] = []
    loop = asyncio.get_running_loop()
    print("chat with the swarm: /reset forgets the conversation, /route shows the last route, /quit or Ctrl-D ends", file=sys.stderr)
    while True:
        line = await _read_line("> ")
        if line is None or line.strip() in ("/quit", "/exit"):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if line == "/route":
            print(" -> ".join(route) if route else "(no reply yet)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})

        async def reply() -> str:
            nonlocal route
            pieces = []
            stats = None
            async for piece, stats, route in model.stream_result(model.head.encode_chat(messages), params, verify=verify):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            if stats is not None and stats.verification is not None and (verify or stats.verification.verdict.value not in ("agree", "skipped")):
                print(f"\n{stats.verification.summary()}", file=sys.stderr)
            return "".join(pieces)

        task = asyncio.ensure_future(reply())
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            text = await task
        except asyncio.CancelledError:
            print("\n(interrupted)", file=sys.stderr)
            messages.pop()
            continue
        except SwarmError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        print()
        messages.append({"role": "assistant", "content": text})


def cmd_demo(args: argparse.Namespace) -> int:
    """A local swarm: a bootstrap peer and three nodes as real processes, then one answer (or a chat)."""
    from client.launcher import LocalSwarm

    say = (lambda message: print(message, file=sys.stderr)) if not args.quiet else None
    params = sampling_params(args)

    async def run() -> int:
        private = ["--swarm-key", str(args.swarm_key)] if args.swarm_key is not None else []
        async with LocalSwarm(args.model, [(0, 10), (10, 20), (20, 30)], private, progress=say, transport=transport_of(args)) as swarm:
            model = _swarm_model(args, bootstrap=[swarm.bootstrap_url])
            if args.prompt is None:
                return await chat_loop(model, params, _verify(args))
            shown = False

            async def pieces():
                nonlocal shown
                async for piece, stats, route in model.stream_result(model.head.encode_prompt(args.prompt, chat=args.chat), params, verify=_verify(args)):
                    if say and not shown:
                        say(f"route: {' -> '.join(route)}")
                        shown = True
                    yield piece, stats, route

            return await _print_stream_async(args, pieces(), model.head.device)

    return asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    from client.serve_cli import run_serve

    return run_serve(args, lambda: _swarm_model(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="layerswarm client: run a language model whose blocks are spread over a swarm of nodes.",
    )
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="log verbosity on stderr (default warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a reply to one prompt, streaming tokens as they come",
        description="Generate a reply to PROMPT through the swarm found by --bootstrap/--mdns. Without them the whole "
        "model runs in this process (the local baseline).",
    )
    gen.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    add_sampling(gen)
    add_speculation(gen)
    add_client(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model served by the swarm", description="An interactive chat with a model served by the swarm (give --bootstrap or --mdns).")
    chat.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    add_sampling(chat)
    add_speculation(chat)
    add_client(chat)
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser(
        "demo",
        help="start a local swarm (a bootstrap peer and 3 nodes) and answer PROMPT through it",
        description="Start a bootstrap peer and three nodes holding blocks [0,10), [10,20), [20,30) of the model as real "
        "processes on loopback, answer PROMPT through the swarm (or open a chat without one), then stop them all.",
    )
    demo.add_argument("prompt", metavar="PROMPT", nargs="?", default=None, help="the prompt (omit it to chat)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    demo.add_argument("--quiet", action="store_true", help="print only the answer")
    add_sampling(demo)
    add_speculation(demo)
    add_client(demo, discovery=False)
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser(
        "serve",
        help="serve the model over the OpenAI HTTP API (and a web page) through the swarm",
        description="An HTTP server speaking the OpenAI API (POST /v1/chat/completions, POST /v1/completions, GET /v1/models) "
        "for the model served by the swarm found by --bootstrap/--mdns. It listens on loopback unless --host says otherwise; "
        "a server other machines can reach needs an API key (--api-key, --api-key-file) or an explicit --no-api-key.",
    )
    serve.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    add_client(serve, printing=False)
    add_speculation(serve)  # the default of requests that do not say (the API's `speculate` field)
    from client.serve_cli import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    peers = sub.add_parser(
        "peers",
        help="show the swarm: peers, their spans and which blocks are covered",
        description="Ask bootstrap peers (and/or mDNS) for the swarm's peer table and show it, with a coverage line per model.",
    )
    add_discovery(peers)
    peers.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    peers.add_argument(
        "--standing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also dial every peer as a route would (TLS pinned to its peer id: pinned, private) and ask the bootstrap "
        "peers whom they hold accused or convicted (default on; --no-standing lists only)",
    )
    peers.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="for each standing dial (default 3)")
    peers.set_defaults(func=cmd_peers)

    keygen = sub.add_parser(
        "keygen",
        help="print a new private swarm key: swarm keygen > swarm.key",
        description="Print a new random swarm key. Nodes and clients given it (--swarm-key FILE) form a private swarm: "
        "every request proves the key, and peers without it are refused. Redirected to a file, the file is made readable "
        "by its owner only.",
    )
    keygen.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads libgomp (no import above loads it): idle OpenMP threads spin only briefly,
    # as in a node (node/cli.py says why); a server's head beside nodes on one box slowed them.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # see swarm.wire.unpack_tensor
    try:
        return args.func(args)
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
