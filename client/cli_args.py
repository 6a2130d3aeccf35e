"""The `swarm` commands' shared flags, and the configs they build (client/cli.py parses them).

Flag groups are added by one function each, so that every command taking, say, the sampling
flags takes them with the same names, defaults and help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from swarm.errors import SwarmError

DTYPES = ("float32", "bfloat16", "float16")


def add_sampling(parser: argparse.ArgumentParser) -> None:
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



def add_speculation(parser: argparse.ArgumentParser) -> None:
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



def sampling_params(args: argparse.Namespace):
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



def dtype_of(args: argparse.Namespace):
    """--dtype as a torch dtype; None (the device's default: bfloat16 on a GPU, float32 on the CPU) when not given."""
    import torch

    return getattr(torch, args.dtype) if args.dtype else None



def transport_of(args: argparse.Namespace):
    from swarm.membership import Membership
    from swarm.swarm_key import SwarmKey
    from swarm.transport import Transport

    membership = Membership(SwarmKey.load(args.swarm_key)) if args.swarm_key is not None else None  # KeyFileError: a SwarmError
    return Transport(insecure_http=args.insecure_http, membership=membership)



def add_client(parser: argparse.ArgumentParser, discovery: bool = True, printing: bool = True) -> None:
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
        "--full-precision", action="store_true",
        help="route only through nodes that compute with the model's full weights (float32, bfloat16, float16), never a "
        "quantized one (swarm-node --quant int8), and re-check hops only on such nodes; fails with no_full_precision_route "
        "where only int8 nodes serve some blocks (default off: int8 nodes are used, and checked within a wider tolerance)",
    )  # fmt: skip
    parser.add_argument(
        "--verify-fraction", type=float, default=0.25, metavar="F",
        help="share of generations checked on other replicas when --verify is not given (default 0.25; 0 turns checks off)",
    )  # fmt: skip
    if discovery:
        add_discovery(parser)
    else:
        parser.set_defaults(bootstrap=[], mdns=False, mdns_interface=[], wait=3.0)
        add_insecure(parser, "also start the demo's nodes on plain http")
        add_swarm_key(parser, "the demo's nodes form that private swarm")



def add_swarm_key(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="the key of a private swarm (from `swarm keygen > FILE`): prove it to every peer and talk only to peers that prove it back"
        + (f"; {extra}" if extra else ""),
    )



def add_insecure(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="also dial peers on plain http (no encryption, no identity pinning); by default only https peers are dialled, each pinned to its peer id" + (f"; {extra}" if extra else ""),
    )



def add_discovery(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[], metavar="URL", help="a swarm peer to ask for the peer table (repeatable)")
    parser.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=False, help="also browse the LAN with mDNS (default off)")
    parser.add_argument("--mdns-interface", action="append", default=[], metavar="IP", help="interface address for mDNS (repeatable; default all)")
    parser.add_argument("--wait", type=float, default=3.0, metavar="SECONDS", help="how long to listen for mDNS answers (default 3)")
    add_insecure(parser)
    add_swarm_key(parser)



def discovery_options(args: argparse.Namespace):
    from client.peers import DiscoveryOptions
    from swarm.discovery.mdns import MdnsConfig

    try:
        mdns = MdnsConfig(interfaces=tuple(args.mdns_interface) or "all", advertise=False) if args.mdns else None
    except ValueError as exc:
        raise SwarmError(f"bad --mdns-interface: {exc}") from None
    return DiscoveryOptions(bootstrap=tuple(u.rstrip("/") for u in args.bootstrap), mdns=mdns, mdns_wait_s=args.wait)
