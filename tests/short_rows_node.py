"""A node that answers a step asking for all its rows (output "all") with one row too few, for tests.

    python -m tests.short_rows_node <swarm-node arguments>

Everything else is honest (its outputs are computed, sealed and sent as usual). A client must
refuse such an answer whole: speculative decoding reads one row per drafted position. Start it
with tests/nodes.py `start_nodes(..., module="tests.short_rows_node")`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from node import cli, session_socket


def install() -> None:
    honest = session_socket._finish_step

    async def finish_step(state, session, request, done, began):
        async def result():
            outcome = await done
            if request.output != "all" or outcome.hidden.shape[0] < 2:
                return outcome
            return dataclasses.replace(outcome, hidden=outcome.hidden[:-1])

        await honest(state, session, request, asyncio.ensure_future(result()), began)

    session_socket._finish_step = finish_step


def main(argv: list[str] | None = None) -> int:
    install()
    return cli.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
