"""A node for tests whose signed record claims a speed it never measured.

    python -m tests.claiming_node --claim BLOCKS_PER_S <swarm-node arguments>

It serves honestly; only the `throughput` of every record it signs is replaced by
the claim (a real liar signs its lies). Start it with tests/nodes.py
`start_nodes(..., module="tests.claiming_node")`.
"""

from __future__ import annotations

import argparse
import sys

from node import cli
from swarm.records import PeerRecord


def install(claim: float) -> None:
    """Every record this process signs for a span claims `claim` blocks/s."""
    honest = PeerRecord.create.__func__

    def create(cls, identity, **fields):
        if fields.get("span") is not None:
            fields["throughput"] = claim
        return honest(cls, identity, **fields)

    PeerRecord.create = classmethod(create)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--claim", type=float, required=True)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    install(ours.claim)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
