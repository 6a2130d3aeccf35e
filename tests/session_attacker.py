"""Processes for the per-source limit test, each run inside its own network namespace.

    python -m tests.session_attacker flood URL DIGEST SOCKETS SESSIONS
        Opens SOCKETS websockets and one more (expects `busy`, then close 1013), then
        SESSIONS sessions on the first and one more (expects `busy`); prints one JSON
        line of what it saw, then holds everything until stdin closes.
    python -m tests.session_attacker generate URL PEER_ID NEW_TOKENS
        Greedy tokens through the node (one hop over every block); prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import warnings

import aiohttp
import torch

from client.session import RemoteHop, RouteSession, SessionConfig
from swarm import wire
from swarm.model import DEFAULT_MODEL, load_head, open_checkpoint

PROMPT = "Write a short poem about the moon."


async def flood(url: str, digest: str, sockets: int, sessions: int) -> None:
    seen: dict[str, object] = {}
    async with aiohttp.ClientSession() as http:
        held = [await http.ws_connect(f"{url}/session") for _ in range(sockets)]
        extra = await http.ws_connect(f"{url}/session")
        msg = await asyncio.wait_for(extra.receive(), 30)
        seen["socket_refusal"] = wire.decode(msg.data)["code"] if msg.type == aiohttp.WSMsgType.BINARY else str(msg.type)
        await asyncio.wait_for(extra.receive(), 30)
        seen["socket_close_code"] = extra.close_code
        codes = []
        for index in range(sessions + 1):
            open_ = {
                "type": "open", "session": f"flood{index}", "blocks": [0, 30], "max_length": 16, "dtype": "float32",
                "model": digest, "nonce": secrets.token_bytes(16), "token": secrets.token_urlsafe(16),
            }  # fmt: skip
            await held[0].send_bytes(wire.encode(open_))
            reply = wire.decode((await asyncio.wait_for(held[0].receive(), 30)).data)
            codes.append(reply["type"] if reply["type"] != "error" else reply["code"])
        seen["sessions"] = codes
        print(json.dumps(seen), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # hold until told
        for ws in held:
            await ws.close()


async def generate(url: str, peer_id: str, new_tokens: int) -> None:
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        head = load_head(checkpoint, torch.float32)
        digest = checkpoint.fingerprint().digest
    ids = head.encode_prompt(PROMPT, chat=True)
    tokens = []
    async with aiohttp.ClientSession() as http:
        hop = RemoteHop(url, 0, 30, peer_id)
        async with RouteSession(http, [hop], digest, len(ids) + new_tokens, SessionConfig(wire_dtype="float32")) as session:
            out = await session.forward(head.embed(ids), 0)
            for index in range(new_tokens):
                token = int(head.logits(out).argmax(-1)[-1])
                tokens.append(token)
                out = await session.forward(head.embed([token]), len(ids) + index)
    print(json.dumps({"tokens": tokens}), flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    mode, *args = sys.argv[1:]
    if mode == "flood":
        asyncio.run(flood(args[0], args[1], int(args[2]), int(args[3])))
    else:
        asyncio.run(generate(args[0], args[1], int(args[2])))
