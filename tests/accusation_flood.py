"""The attacker of the accusation flood test (tests/test_accusations.py), run in its own network namespace.

    python -m tests.accusation_flood NODE_URL PEER_ID JUDGE_URL

It runs one tapped session on the node (which holds every block) to get real seals,
so each of its charges is well formed and validly sealed, and each prefix of the
transcript is a different charge that would need its own re-run. It prints `ready`,
then posts such charges, each under a fresh accuser key, from four workers until
stdin gives a line, to the judge (another node holding every block); then it prints one
JSON line: the answers by status or error code, the slowest `busy`, how long it
flooded, and the judge's own counts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter

import aiohttp
import torch

from swarm import wire
from swarm.identity import Identity
from tests.sealed_session import TappedChain

WORKERS = 4
PAUSE_S = 0.02  # between one worker's posts: a flood, but one that leaves this machine's cores to the others


async def main(url: str, peer_id: str, judge: str) -> None:
    seen: dict[str, object] = {"answers": Counter(), "slowest_busy_s": 0.0}
    async with aiohttp.ClientSession() as http:
        info = await (await http.get(f"{url}/info")).json()
        generator = torch.Generator().manual_seed(0)
        chain = TappedChain(http, [(url, tuple(info["span"]), peer_id)], info["model"]["digest"], dtype="bfloat16")
        async with chain:
            await chain.step(torch.randn(4, info["hidden_size"], generator=generator))
            for _ in range(8):
                await chain.step(torch.randn(1, info["hidden_size"], generator=generator))
        print("ready", flush=True)
        stop = asyncio.Event()
        prefixes = itertools.cycle(range(1, 10))
        began = time.monotonic()

        async def worker() -> None:
            while not stop.is_set():
                body = wire.encode(chain.accusation(0, Identity.generate(), next(prefixes)).to_wire())
                sent = time.monotonic()
                async with http.post(f"{judge}/accusations", data=body, headers={"Content-Type": "application/msgpack"}) as response:
                    answer = wire.decode(await response.read())
                kind = answer.get("status") if answer.get("type") == "judgement" else answer.get("code")
                seen["answers"][kind] += 1
                if kind == "busy":
                    seen["slowest_busy_s"] = max(seen["slowest_busy_s"], time.monotonic() - sent)
                await asyncio.sleep(PAUSE_S)

        workers = [asyncio.ensure_future(worker()) for _ in range(WORKERS)]
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop.set()
        await asyncio.gather(*workers)
        seen["seconds"] = time.monotonic() - began
        seen["court"] = await (await http.get(f"{judge}/accusations")).json()
        seen["court"].pop("accusations")
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
