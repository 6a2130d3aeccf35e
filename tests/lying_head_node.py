"""A node whose LM head lies, for tests: a real `swarm-node --serve-head` that hides the likeliest token.

    python -m tests.lying_head_node <swarm-node arguments>

Its blocks are honest (their outputs are sent and sealed as usual); only the candidates it
derives from them leave out the top token, steering a greedy client to the runner-up. Start
it with tests/nodes.py `start_nodes(..., module="tests.lying_head_node")`.
"""

from __future__ import annotations

import sys

import torch

from node import cli
from node.head_service import LMHead, TopK


def install() -> None:
    honest = LMHead.top_batch

    def top_batch(self: LMHead, hidden: torch.Tensor, ks: list[int]) -> list[TopK]:
        return [TopK(a.ids[1:], a.logits[1:], a.logsumexp) for a in honest(self, hidden, [k + 1 for k in ks])]

    LMHead.top_batch = top_batch  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    install()
    return cli.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
