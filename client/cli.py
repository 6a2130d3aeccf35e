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
from pathlib import Path

from swarm.aliases import DEFAULT_MODEL
from swarm.errors import SwarmError

DTYPES = ("float32", "bfloat16", "float16")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; higher samples more freely")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already seen (1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token: exactly --max-new-tokens tokens (for timing runs)"
    )
    parser.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=True, help="wrap the prompt in the model's chat template (default on)"
    )


def _add_speculation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "speculative decoding",
        "Each step carries the current token and draft tokens that may follow it; the model checks them all in one pass "
        "and the ones it agrees with are kept, so a step yields several tokens where drafts hit (a rewrite, a quote, code). "
        "The output is the same as without it; the number of drafts adapts to how many are kept (none when they miss).",
    )
    group.add_argument(
        "--speculate", action=argparse.BooleanOptionalAction, default=True,
        help="send draft tokens with each step (default on); --no-speculate decodes one token a step",
    )  # fmt: skip
    group.add_argument("--max-draft", type=int, default=8, metavar="N", help="the most draft tokens a step carries, 0 to 32 (default 8; 0 is --no-speculate)")
    group.add_argument(
        "--draft-model", default=None, metavar="MODEL",
        help="draft with this model held here (alias, .gguf file or HF directory with the target's tokenizer) instead of "
        "prompt lookup (n-gram matches in the prompt and reply, no model); the model itself with --draft-blocks N drafts by early exit",
    )  # fmt: skip
    group.add_argument(
        "--draft-blocks", type=int, default=None, metavar="N",
        help="run only the first N blocks of --draft-model (then its head): fewer is faster, more is kept more often (default all)",
    )  # fmt: skip


def _sampling_params(args: argparse.Namespace):
    from client.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_at_eos=not args.ignore_eos,
        speculate=args.speculate,
        max_draft=args.max_draft,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    if args.bootstrap or args.mdns:
        return _generate_swarm(args, params)
    from client.generate import GenerationStats, LocalBlocks, stream_tokens
    from client.local import LocalModel
    from swarm.progress import progress_bar

    with progress_bar("loading the model", unit="part") as show:  # a bar on a terminal only
        model = LocalModel.load(args.model, _dtype(args), args.device, progress=show)
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
    draft = DraftModel.load(args.draft_model, args.draft_blocks, model.device, _dtype(args))
    draft.check_vocabulary(model.head)
    return draft


def _dtype(args: argparse.Namespace):
    """--dtype as a torch dtype; None (the device's default: bfloat16 on a GPU, float32 on the CPU) when not given."""
    import torch

    return getattr(torch, args.dtype) if args.dtype else None


def _generate_swarm(args: argparse.Namespace, params) -> int:
    model = _swarm_model(args)
    return _print_stream(args, model.stream_result(model.head.encode_prompt(args.prompt, chat=args.chat), params, verify=_verify(args)), model.head.device)


def _swarm_model(args: argparse.Namespace, bootstrap: list[str] | None = None):
    from client.session import SessionConfig
    from client.swarm import ClientConfig, SwarmModel
    from swarm.progress import progress_bar

    options = _discovery_options(args)  # all of it (--wait too), not only the bootstrap list
    if bootstrap is not None:
        options = replace(options, bootstrap=tuple(bootstrap))
    if not 0.0 <= args.verify_fraction <= 1.0:
        raise SwarmError(f"--verify-fraction must be in [0, 1], not {args.verify_fraction}")
    session = SessionConfig(remote_head=args.remote_head)  # the last hop's head (client/remote_head.py)
    config = ClientConfig(wire_dtype=args.wire_dtype, transport=_transport(args), verify_fraction=args.verify_fraction, session=session)
    if args.draft_blocks is not None and args.draft_model is None:
        raise SwarmError("--draft-blocks needs --draft-model")
    with progress_bar("loading the model head", unit="part") as show:  # a bar on a terminal only
        return SwarmModel(
            args.model, discovery=options, config=config, dtype=_dtype(args), device=args.device, progress=show,
            draft_model=args.draft_model, draft_blocks=args.draft_blocks,
        )  # fmt: skip


def _transport(args: argparse.Namespace):
    from swarm.membership import Membership
    from swarm.swarm_key import SwarmKey
    from swarm.transport import Transport

    membership = Membership(SwarmKey.load(args.swarm_key)) if args.swarm_key is not None else None  # KeyFileError: a SwarmError
    return Transport(insecure_http=args.insecure_http, membership=membership)


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
    return asyncio.run(chat_loop(_swarm_model(args), _sampling_params(args), _verify(args)))


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
    params = _sampling_params(args)

    async def run() -> int:
        private = ["--swarm-key", str(args.swarm_key)] if args.swarm_key is not None else []
        async with LocalSwarm(args.model, [(0, 10), (10, 20), (20, 30)], private, progress=say, transport=_transport(args)) as swarm:
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


def _add_client(parser: argparse.ArgumentParser, discovery: bool = True, printing: bool = True) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="DEVICE",
        help="where the local part runs: cpu, cuda, cuda:N or auto (default: the first GPU when there is one, else cpu); "
        "with a swarm that is the head (final norm and LM head; the embeddings stay on the CPU), without one the whole model",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="compute dtype of the local part (default bfloat16 on a GPU, float32 on the CPU)"
    )
    parser.add_argument("--wire-dtype", choices=DTYPES, default="bfloat16", help="dtype of hidden states between nodes (default bfloat16)")
    parser.add_argument(
        "--remote-head", choices=("auto", "always", "never"), default="auto",
        help="let a route's last node apply the LM head where it serves it (swarm-node --serve-head): auto (default) when "
        "this client's head is on the CPU. That node then sees each step's likeliest tokens, i.e. the text (README: Serving the head)",
    )  # fmt: skip
    if printing:  # commands that print one generation's text
        parser.add_argument("--json", action="store_true", help="print one JSON object with text, tokens, route and timings instead of streaming")
        parser.add_argument(
            "--verify", action="store_true", help="check every generation: re-run one randomly chosen hop on another replica and print the verdict on stderr"
        )
    else:
        parser.set_defaults(json=False, verify=False)
    parser.add_argument(
        "--verify-fraction", type=float, default=0.25, metavar="F",
        help="share of generations checked on other replicas when --verify is not given (default 0.25; 0 turns checks off)",
    )  # fmt: skip
    if discovery:
        _add_discovery(parser)
    else:
        parser.set_defaults(bootstrap=[], mdns=False, mdns_interface=[], wait=3.0)
        _add_insecure(parser, "also start the demo's nodes on plain http")
        _add_swarm_key(parser, "the demo's nodes form that private swarm")


def _add_swarm_key(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the key of a private swarm (from `swarm keygen > FILE`): prove it to every peer and talk only to peers that prove it back"
        + (f"; {extra}" if extra else ""),
    )


def _add_insecure(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="also dial peers on plain http (no encryption, no identity pinning); by default only https peers are dialled, each pinned to its peer id" + (f"; {extra}" if extra else ""),
    )


def _add_discovery(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[], metavar="URL", help="a swarm peer to ask for the peer table (repeatable)")
    parser.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=False, help="also browse the LAN with mDNS (default off)")
    parser.add_argument("--mdns-interface", action="append", default=[], metavar="IP", help="interface address for mDNS (repeatable; default all)")
    parser.add_argument("--wait", type=float, default=3.0, metavar="SECONDS", help="how long to listen for mDNS answers (default 3)")
    _add_insecure(parser)
    _add_swarm_key(parser)


def _discovery_options(args: argparse.Namespace):
    from client.peers import DiscoveryOptions
    from swarm.discovery.mdns import MdnsConfig

    try:
        mdns = MdnsConfig(interfaces=tuple(args.mdns_interface) or "all", advertise=False) if args.mdns else None
    except ValueError as exc:
        raise SwarmError(f"bad --mdns-interface: {exc}") from None
    return DiscoveryOptions(bootstrap=tuple(u.rstrip("/") for u in args.bootstrap), mdns=mdns, mdns_wait_s=args.wait)


def cmd_serve(args: argparse.Namespace) -> int:
    from client.serve_cli import run_serve

    return run_serve(args, lambda: _swarm_model(args))


def cmd_peers(args: argparse.Namespace) -> int:
    import time

    from client.peers import coverage_lines, discover
    from client.standing import Standing, standing

    async def run():
        transport = _transport(args)
        options = _discovery_options(args)
        async with transport.client_session() as http:
            view = await discover(http, options, transport=transport)
            records = view.table.records(time.time())
            found, convicted = await standing(http, transport, records, options.bootstrap, args.timeout) if args.standing else ({}, {})
            return view, records, found, convicted

    view, records, found, convicted = asyncio.run(run())
    now = time.time()
    private = args.swarm_key is not None
    if args.json:
        print(json.dumps({
            "peers": [
                {
                    "peer_id": r.peer_id,
                    "addresses": list(r.addresses),
                    "model": dict(r.model) if r.model else None,
                    "num_layers": r.num_layers,
                    "span": list(r.span) if r.span else None,
                    "throughput": r.throughput,
                    "load": r.load,
                    "age_s": round(now - r.issued_at, 2),
                    "proven": True,  # listed: the bootstrap peer proved its address (pending records are never listed)
                    **(found[r.peer_id].to_json() if r.peer_id in found else {}),
                }
                for r in records
            ],
            "private_swarm": private,
            "convicted": convicted,
            "coverage": coverage_lines(view.table, now),
            "unreachable": view.unreachable,
        }))
        return 0
    print(f"{'peer':14} {'address':24} {'model':14} {'span':>8} {'blocks/s':>9} {'load':>5} {'age':>6}  {'pinned':8} {'private':7} standing")
    for r in records:
        span = f"{r.span[0]}:{r.span[1]}" if r.span else "-"
        model = (r.model_digest or "-")[:12]
        mine = found.get(r.peer_id, Standing())
        shown = "-" if mine.private is None else ("yes" if mine.private else "no")
        judged = f"convicted by {len(mine.convicted_by)}" if mine.convicted_by else (f"{mine.accusations} accusations" if mine.accusations else "clean")
        print(
            f"{r.peer_id[:12]:14} {r.addresses[0][:24]:24} {model:14} {span:>8} {r.throughput:9.1f} {r.load:5.2f} {now - r.issued_at:5.0f}s"
            f"  {mine.pinned[:8]:8} {shown:7} {judged if args.standing else '-'}"
        )
    for accused, by in sorted(convicted.items()):
        print(f"convicted of wrong outputs, out of the tables: {accused} (by {', '.join(by)})")
    print(f"every peer listed is proven (its address answered a fresh nonce with its key); this is {'a private' if private else 'the open'} swarm")
    for line in coverage_lines(view.table, now):
        print(line)
    for url in view.unreachable:
        print(f"unreachable bootstrap peer: {url}", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new swarm key on stdout; redirected to a file, the file is made private (0600) first."""
    import os
    import stat

    from swarm.swarm_key import SwarmKey

    key = SwarmKey.generate()
    descriptor = sys.stdout.fileno()
    if stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.fchmod(descriptor, 0o600)  # before a byte of the key is in it
    sys.stdout.write(key.to_text())
    sys.stdout.flush()
    print(f"swarm key {key.fingerprint}: give it to every node and client of the swarm with --swarm-key FILE", file=sys.stderr)
    return 0


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
    _add_sampling(gen)
    _add_speculation(gen)
    _add_client(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model served by the swarm", description="An interactive chat with a model served by the swarm (give --bootstrap or --mdns).")
    chat.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    _add_sampling(chat)
    _add_speculation(chat)
    _add_client(chat)
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
    _add_sampling(demo)
    _add_speculation(demo)
    _add_client(demo, discovery=False)
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser(
        "serve",
        help="serve the model over the OpenAI HTTP API (and a web page) through the swarm",
        description="An HTTP server speaking the OpenAI API (POST /v1/chat/completions, POST /v1/completions, GET /v1/models) "
        "for the model served by the swarm found by --bootstrap/--mdns. It listens on loopback unless --host says otherwise; "
        "a server other machines can reach needs an API key (--api-key, --api-key-file) or an explicit --no-api-key.",
    )
    serve.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, help=f"alias, .gguf file or HF directory (default {DEFAULT_MODEL})")
    _add_client(serve, printing=False)
    _add_speculation(serve)  # the default of requests that do not say (the API's `speculate` field)
    from client.serve_cli import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    peers = sub.add_parser(
        "peers",
        help="show the swarm: peers, their spans and which blocks are covered",
        description="Ask bootstrap peers (and/or mDNS) for the swarm's peer table and show it, with a coverage line per model.",
    )
    _add_discovery(peers)
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
