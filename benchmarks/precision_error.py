"""How far honest nodes of different precisions disagree: the numbers behind swarm/precision.py's tolerances.

Verification (client/verification.py, node/court.py) re-runs a hop's inputs on another
replica and compares the outputs, row by row, as the worst row's relative RMS difference
(swarm/seal.py `difference`). Two honest replicas that compute in different precisions
(float32, bfloat16, weight-only int8) differ by more than the wire's rounding: this
measures by how much, over spans of 1 to 30 blocks of the default model, at several
starting blocks, on the hidden states of real prompts (float32 through the blocks before
the span, then rounded to the wire dtype, as a hop receives them).

    python -m benchmarks.precision_error [--wire-dtype float32] [--lengths 1 5 10 15 20 30]

stdout: one JSON object per (pair, span length): the worst error over every start and
prompt (`value`), with the median in params; stderr: a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.common import emit
from swarm import wire
from swarm.model import DEFAULT_MODEL, Segment, load_head, load_span, open_checkpoint
from swarm.seal import difference

# (text, chat template?): chat prompts as clients send them, and plain text, one of it long (rows
# far from the start, where errors gather over the context).
PROMPTS = [
    ("What is the capital of France?", True),
    ("Write a short poem about the sea, the wind and a small boat that will not come home.", True),
    ("Explain how a hash table handles collisions, with an example in Python.", True),
    ("List the planets of the solar system in order from the sun, and one fact about each.", True),
    (
        "The history of the Roman Empire spans more than a thousand years, from the founding of the city to the fall of "
        "Constantinople in 1453. Its legacy in law, language and architecture",
        False,
    ),
    (
        "A hash table stores values in an array of buckets and finds the bucket of a key by hashing it. Two keys may hash "
        "to the same bucket; this is a collision. Separate chaining keeps a small list in every bucket and appends the "
        "colliding entries to it, so a lookup hashes the key and then walks the list comparing keys. Open addressing "
        "instead keeps every entry in the array itself: on a collision it probes other buckets in a fixed order, linear "
        "probing trying the next bucket, quadratic probing jumping by growing steps, double hashing using a second hash "
        "for the step. The load factor, entries divided by buckets, decides how long chains or probe sequences grow; "
        "most tables resize when it passes a threshold such as three quarters, rehashing every entry into a larger "
        "array. Python's dict uses open addressing with a perturbed probe sequence, and since version 3.6 it also keeps "
        "the insertion order in a compact array of entries, the sparse table holding only indices into it. Deletion in "
        "open addressing needs care: an emptied bucket would break the probe sequences passing through it, so it is "
        "marked as a tombstone that lookups skip and insertions reuse.",
        False,
    ),
]
# (name, compute dtype, quant) of each precision measured. int8 here is a CPU node's: float32
# between projections (the kernel rounds each projection's input to bfloat16); q4_1 serves the
# default GGUF's own 4-bit blocks (the same weights float32 dequantizes), CPU only.
PRECISIONS = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None), ("int8", torch.float32, "int8"), ("q4_1", torch.float32, "q4_1")]
PAIRS = [("bfloat16", "float32"), ("int8", "float32"), ("int8", "bfloat16"), ("q4_1", "float32"), ("q4_1", "bfloat16"), ("q4_1", "int8")]


def run(span, x: torch.Tensor, blocks: tuple[int, int], wire_dtype: str) -> torch.Tensor:
    """One stateless prefill of `blocks`, as a node's /forward: input cast to the span's dtype, output to the wire's."""
    h = x.to(span.device, span.dtype)
    out = span(h, [Segment(span.new_cache(x.shape[0], blocks), 0, x.shape[0])], blocks)
    return rounded(out.cpu(), wire_dtype)


def rounded(x: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """`x` as it arrives in wire dtype `wire_dtype`, back in float32."""
    return x.to(wire.wire_dtype(wire_dtype)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the hidden states compared (default float32)")
    parser.add_argument(
        "--device", default="cpu",
        help="where the bfloat16 and int8 spans run (default cpu; cuda: a GPU node's, int8 with bfloat16 activations); float32 always on the CPU",
    )  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 5, 10, 15, 20, 30], help="span lengths in blocks (default 1 5 10 15 20 30)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        layers = checkpoint.config.num_layers
        head = load_head(checkpoint, torch.float32)
        spans = {}
        for name, dtype, quant in PRECISIONS:
            device = "cpu" if name in ("float32", "q4_1") else args.device  # q4_1 runs on the CPU only
            if quant and device != "cpu":
                dtype = torch.bfloat16  # what a GPU int8 node computes with between projections
            spans[name] = load_span(checkpoint, 0, layers, dtype, device, quant=quant)
    reference = spans["float32"]
    # The float32 hidden state entering each block, per prompt, rounded to the wire (what a hop receives).
    entering: list[list[torch.Tensor]] = []
    for prompt, chat in PROMPTS:
        x = head.embed(head.encode_prompt(prompt, chat=chat))
        states = [x]
        for block in range(layers - 1):
            states.append(run(reference, states[-1], (block, block + 1), "float32"))
        entering.append([rounded(s, args.wire_dtype) for s in states])
    for length in args.lengths:
        starts = sorted({0, *range(0, layers - length + 1, 3 if length == 1 else max(1, length // 2)), layers - length})
        errors: dict[tuple[str, str], list[float]] = {pair: [] for pair in PAIRS}
        for start in starts:
            blocks = (start, start + length)
            for states in entering:
                outs = {name: run(span, states[start], blocks, args.wire_dtype) for name, span in spans.items()}
                for a, b in PAIRS:
                    errors[(a, b)].append(difference(outs[a], outs[b]).error)
        for (a, b), values in errors.items():
            worst, median = max(values), statistics.median(values)
            emit(
                "precision_error", worst, "relative RMS (worst row)",
                {"pair": f"{a} vs {b}", "blocks": length, "starts": starts, "prompts": len(PROMPTS), "wire_dtype": args.wire_dtype, "median": median, "device": args.device},
                device=args.device,
                human=f"{a:>10} vs {b:<9} {length:>2} blocks: worst {worst:.4f}, median {median:.4f} over {len(values)} (starts {starts})",
            )  # fmt: skip
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
