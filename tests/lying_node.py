"""A lying node for tests: a real `swarm-node` whose session outputs are slightly wrong on some steps.

    python -m tests.lying_node [--lie-every N] [--lie-scale F] <swarm-node arguments>

Every N-th decode step of each session (steps N, 2N, ...; default 3) it adds Gaussian
noise of F (default 0.01) times each row's RMS to the outputs it computed, then
sends, seals and taps them like an honest node: a real liar signs its lies, which is
what makes it accusable. Prefill steps (step 0) and `POST /forward` stay honest.
Start it with tests/nodes.py `start_nodes(..., module="tests.lying_node")`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import torch

from node import cli, session_socket


def lies(step: int, every: int) -> bool:
    return step > 0 and step % every == 0


def perturb(hidden: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """`hidden` [T, D] plus noise of `scale` times each row's RMS (seeded: the same lie every run)."""
    x = hidden.float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (x + scale * rms * noise).to(hidden.dtype)


def install(every: int, scale: float) -> None:
    """Wrap the node's step delivery so that lying steps carry perturbed outputs."""
    honest = session_socket._finish_step

    async def finish_step(state, session, request, done, began):
        async def result():
            outcome = await done
            if not lies(request.step, every):
                return outcome
            return dataclasses.replace(outcome, hidden=perturb(outcome.hidden, scale, request.step))

        await honest(state, session, request, asyncio.ensure_future(result()), began)

    session_socket._finish_step = finish_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--lie-every", type=int, default=3)
    parser.add_argument("--lie-scale", type=float, default=0.01)
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    install(ours.lie_every, ours.lie_scale)
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
