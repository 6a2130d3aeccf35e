"""A client process for the relay-over-the-internet test, run inside the client's namespace.

Usage: python -m tests.relay_client BOOTSTRAP_URL NEW_TOKENS [WAIT_AT]
Waits until it can route over every block, prints `route URL...` (its hops' addresses),
then `token N` as tokens come; at token WAIT_AT it prints `waiting` and reads a line from
stdin before going on (the test kills a relay then). Ends with one JSON line: the token
ids, the failovers and the final hops' addresses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import warnings

from client.generate import GenerationStats
from client.sampling import SamplingParams
from client.swarm import ClientConfig, SwarmModel
from swarm.model import DEFAULT_MODEL
from tests.nodes import until_routed

PROMPT = "Write a long story about a dragon who learns to cook."


async def main(bootstrap: str, new_tokens: int, wait_at: int) -> None:
    model = SwarmModel(DEFAULT_MODEL, bootstrap=[bootstrap], config=ClientConfig(wire_dtype="float32"))
    await until_routed(model)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False, speculate=False)
    stats = GenerationStats()
    hops: list = []

    def follow(seen) -> None:
        hops[:] = seen
        print("route " + " ".join(f"{h.peer_id}@{h.url}" for h in seen), flush=True)

    ids = model.head.encode_prompt(PROMPT, chat=True)
    async for _ in model.stream_generation(ids, params, stats, on_route=follow):
        print(f"token {len(stats.token_ids)}", flush=True)
        if len(stats.token_ids) == wait_at:
            print("waiting", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    result = {"tokens": stats.token_ids, "failovers": [dataclasses.asdict(f) for f in stats.failovers], "hops": [f"{h.peer_id}@{h.url}" for h in hops]}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else -1))
