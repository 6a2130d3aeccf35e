"""What a node computes with, as its signed record declares it, and how far two honest nodes may then disagree.

A node's record carries its precision in the `model` mapping (swarm/records.py): one of
PRECISIONS, the span's `Span.precision`. Routing matches on the model digest only, so
nodes of every precision serve one model together; a client may require full precision
(`ClientConfig.full_precision`), which plans no quantized hop.

- "Full precision" is "not quantized": float32, bfloat16 and float16 hold the
  checkpoint's weights (rounded to the dtype; bfloat16 is what every GPU node runs).
  int8 (weight-only, per-channel scales: swarm/model/quant.py) rounds every weight to
  one of 255 steps of its row; q4_1 serves a GGUF's own 4-bit blocks with a 4-bit kernel
  (`--quant q4_1`, CPU only). Both are quantized: a client that requires full precision
  plans neither.
- A record without the key declares float32: records signed before the key existed, and
  float32 nodes' records now (the key is on the wire only when it is not float32, so a
  float32 node's record is byte for byte what peers that predate the key accept).
- A precision outside PRECISIONS is refused with the whole record (`RecordRejected`), not
  read as "the lowest": we cannot say how far an unknown precision's outputs may stray,
  so no verification could be fair to it, and a record that bends the rules in one field
  is not worth routing through.

`tolerance` is the verification rule. Two honest outputs of the same blocks on the same
inputs differ by the wire's rounding when both parties compute alike (WIRE_TOLERANCE,
as strict as before precisions were declared); across precisions they differ by much
more. Measured on the default model by benchmarks/precision_error.py (worst row's
relative RMS difference over 6 texts, 4 chat prompts and 2 plain texts, one of 238
tokens, at every few starting blocks; float32 wire):

    blocks                      1      5      10     15     20     30
    bfloat16 vs float32       0.030  0.071  0.162  0.053  0.035  0.059
    int8 vs float32           0.038  0.042  0.050  0.052  0.089  0.147
    int8 vs bfloat16          0.049  0.070  0.152  0.062  0.083  0.119
    q4_1 vs float32           0.016         0.023                0.054
    q4_1 vs int8              0.040         0.072                0.183

The median row is 5-10x smaller (0.005-0.05): the worst rows are single positions whose
state a few blocks amplify, above all the first position of a plain text (the attention
sink: 0.162 after blocks [0, 10) in bfloat16, back to 0.05 after [0, 15)). q4_1 on the default
model holds the very weights float32 dequantizes from the file, so it differs from float32
by its kernel's bfloat16 activations only. The tails of
bfloat16 and int8 are alike (a CPU int8 node rounds each projection's input to bfloat16
too), so one rule covers every pair of different precisions, and two int8 nodes (whose
activations may differ: float32 on a CPU, bfloat16 on a GPU):
CROSS_BASE + CROSS_PER_BLOCK * blocks, 0.16 for one block, 0.25 for ten (1.5x the worst
measured, at the sink row), 0.45 for thirty (2.5x the worst, q4_1 vs int8).

That is also what a liar gets: a node that declares another precision than its replica's
may send outputs that far off and pass. The client therefore re-runs a hop on replicas of
its own precision first (strict), and a client that requires full precision plans no
int8 node; a bfloat16 node checked against a float32 replica still gets the room.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "q4_1")  # what a record may declare
FULL_PRECISIONS = frozenset({"float32", "bfloat16", "float16"})  # not quantized
DEFAULT_PRECISION = "float32"  # what a record without the key declares
MAX_PRECISION_CHARS = 16  # longer than any name: refused as oversized before it is looked up

# Largest relative RMS difference per row between two honest computations alike whose
# outputs were rounded to the wire dtype. bfloat16 keeps 8 significant bits: one
# rounding is at most 2^-9 relative per element (~0.2%), two independent ones
# and a different summation order stay well under 0.5%; a 1% perturbation does not.
WIRE_TOLERANCE = {"float32": 1e-3, "float16": 2e-3, "bfloat16": 5e-3}
# Relative RMS (worst row) allowed on top of the wire's rounding between two parties of different
# precisions, or two int8 parties; see the module doc for the measurements.
CROSS_BASE, CROSS_PER_BLOCK = 0.15, 0.01


def is_full(precision: str) -> bool:
    return precision in FULL_PRECISIONS


def declared(model: Mapping[str, str] | None) -> str:
    """The precision a record's `model` mapping declares (a record without a model computes nothing: float32)."""
    if model is None:
        return DEFAULT_PRECISION
    return model.get("precision", DEFAULT_PRECISION)


def model_entry(fingerprint: Mapping[str, str], precision: str) -> dict[str, str]:
    """A record's `model` mapping: the fingerprint, and the precision unless it is the default."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    return dict(fingerprint) if precision == DEFAULT_PRECISION else {**fingerprint, "precision": precision}


def tolerance(wire_dtype: str, a: str, b: str, blocks: int) -> float:
    """The largest worst-row relative RMS difference between honest outputs of `blocks` blocks computed
    in precisions `a` and `b` and sent in `wire_dtype`. Equal full precisions: the wire's rounding alone."""
    wire = WIRE_TOLERANCE.get(wire_dtype, WIRE_TOLERANCE["float32"])
    if a == b and is_full(a):
        return wire
    return wire + CROSS_BASE + CROSS_PER_BLOCK * blocks


def uncovered(spans: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of blocks [start, end) that no span covers, in order."""
    gaps, at = [], start
    for first, last in sorted(spans):
        if first > at:
            gaps.append((at, min(first, end)))
        at = max(at, last)
        if at >= end:
            break
    if at < end:
        gaps.append((at, end))
    return [(a, b) for a, b in gaps if a < b]
