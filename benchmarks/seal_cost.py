"""What sealing a step costs a hop: the digests of its input and output, the chain, the Ed25519 signature.

This is the work node/session_socket.py adds to every step (`seal_step`, then one
`sign`), measured alone for one-token decode steps and a 128-token prefill of the
default model's hidden size, in each wire dtype. The step path with and without it
is `step_path.py` run in a tree before sealing and in this one.

Run: `python benchmarks/seal_cost.py [--repeats 5000]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from swarm import wire  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.seal import Transcript, digest_of, seal_payload  # noqa: E402

HIDDEN = 576  # the default model's hidden size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5000)
    args = parser.parse_args()
    identity = Identity.generate()
    for dtype in ("bfloat16", "float32"):
        for tokens in (1, 128):
            repeats = args.repeats if tokens == 1 else max(1, args.repeats // 10)
            given = torch.randn(tokens, HIDDEN).to(wire.WIRE_DTYPES[dtype])
            sent = torch.randn(tokens, HIDDEN).to(wire.WIRE_DTYPES[dtype])
            transcript = Transcript("m" * 32, (0, 10), "session", identity.peer_id)
            for step in range(50):  # warm-up
                identity.sign(seal_payload(transcript.update(step, step, digest_of(given, dtype), digest_of(sent, dtype))))
            began = time.perf_counter()
            for step in range(repeats):
                identity.sign(seal_payload(transcript.update(step, step, digest_of(given, dtype), digest_of(sent, dtype))))
            per_step = (time.perf_counter() - began) / repeats
            emit("seal_step_us", per_step * 1e6, "us", {"dtype": dtype, "tokens": tokens, "hidden": HIDDEN, "repeats": repeats},
                 human=f"seal one step of {tokens} x {HIDDEN} {dtype}: {per_step * 1e6:.1f} us")  # fmt: skip


if __name__ == "__main__":
    main()
