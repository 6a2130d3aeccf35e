"""A lying replica for tests: a real `swarm-node` whose `POST /forward` answers are slightly wrong.

    python -m tests.lying_replica [--lie-scale F] <swarm-node arguments>

Its sessions stay honest; every stateless forward (what a verifying client asks
a replica to re-run) gets noise of F (default 0.01) times each row's RMS, and is
sealed like an honest answer, so the lie is accusable. Start it with
tests/nodes.py `start_nodes(..., module="tests.lying_replica")`.
"""

from __future__ import annotations

import argparse
import sys

from node import cli
from node.backend import Backend
from tests.lying_node import perturb


def install(scale: float) -> None:
    honest = Backend.forward

    async def forward(self, blocks, hidden):
        return perturb(await honest(self, blocks, hidden), scale, seed=0)

    Backend.forward = forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--lie-scale", type=float, default=0.01)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    install(ours.lie_scale)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
