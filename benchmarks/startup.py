"""How long a node takes to start, and what reading the GGUF header costs in it.

Two figures on the default model, in one run:
- the checkpoint's header (metadata and tensor table): `swarm.model.gguf_file.GGUFFile`
  (what nodes and clients use) against gguf-py's `GGUFReader` (what they used before), the
  median of `--repeats` reads each, and their ratio;
- a real node process from spawn to its ready line (`--blocks 0:10`, `--threads 1`, plain
  http on loopback), the median of `--repeats` starts one after another.

Run: `python benchmarks/startup.py [--repeats 3]`. JSON lines on stdout, a human line each on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from swarm.model import DEFAULT_MODEL  # noqa: E402
from swarm.model.gguf_file import GGUFFile  # noqa: E402
from swarm.model.weights import resolve_model  # noqa: E402
from tests.nodes import start_nodes, stop_nodes  # noqa: E402


def timed(make, repeats: int) -> float:
    """The median seconds of `repeats` calls of `make`."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        make()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="reads and node starts per figure (default 3)")
    args = parser.parse_args()
    import gguf

    path = resolve_model(DEFAULT_MODEL)
    print(f"reading the header of {path.name} ...", file=sys.stderr, flush=True)
    ours = timed(lambda: GGUFFile(path), args.repeats)
    theirs = timed(lambda: gguf.GGUFReader(path), args.repeats)
    params = {"model": DEFAULT_MODEL, "repeats": args.repeats}
    emit("gguf_header_read_s", ours, "s", {**params, "reader": "swarm.model.gguf_file"}, human=f"header: ours {ours * 1e3:.1f} ms")
    emit("gguf_header_read_s", theirs, "s", {**params, "reader": "gguf.GGUFReader"}, human=f"header: GGUFReader {theirs * 1e3:.0f} ms")
    emit("gguf_header_read_speedup", theirs / ours, "ratio", params, human=f"header: {theirs / ours:.0f}x faster")
    print(f"starting a node {args.repeats} times ...", file=sys.stderr, flush=True)
    starts = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            began = time.perf_counter()
            nodes = start_nodes([["--blocks", "0:10"]], Path(folder))
            starts.append(time.perf_counter() - began)
            stop_nodes(nodes)
    ready = statistics.median(starts)
    emit("node_ready_s", ready, "s", {**params, "blocks": "0:10", "threads": 1}, human=f"node: spawn to ready {ready:.2f} s (median)")


if __name__ == "__main__":
    main()
