"""A client process for the network-namespace failover test.

Usage: python -m tests.failover_client BOOTSTRAP_URL AVOID_PEER_ID NEW_TOKENS
Plans a route that avoids AVOID_PEER_ID (so the test knows which replica is in
use), prints `token N` as tokens come, then one JSON line with the token ids and
the failovers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import warnings

from client.sampling import SamplingParams
from client.swarm import ClientConfig, SwarmModel
from swarm.model import DEFAULT_MODEL
from tests.nodes import refresh

PROMPT = "Write a long story about a dragon who learns to cook."


async def main(bootstrap: str, avoid: str, new_tokens: int) -> None:
    model = SwarmModel(DEFAULT_MODEL, insecure_http=True, bootstrap=[bootstrap], config=ClientConfig(wire_dtype="float32"))
    await refresh(model)
    route = model.plan(exclude=frozenset({avoid}))
    print(f"route {route}", flush=True)
    stats = None
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    async for _, stats, _ in model.stream_result(model.head.encode_prompt(PROMPT, chat=True), params, route):
        print(f"token {len(stats.token_ids)}", flush=True)
    print(json.dumps({"tokens": stats.token_ids, "failovers": [dataclasses.asdict(f) for f in stats.failovers]}), flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
