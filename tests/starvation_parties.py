"""The two parties of the starvation attack test (tests/test_attack_starvation.py), each run
inside its own network namespace.

    python -m tests.starvation_parties legit BOOTSTRAP_URL NEW_TOKENS
        generates greedily; prints one JSON line: tokens, seconds (generation only)
    python -m tests.starvation_parties attack NODE_URL [NODE_URL...] --sessions N --forwards N
        --forward-tokens N --connections N --partial N --header-timeout S
        prints `ready {...}` once its pressure is on, then keeps it on until stdin closes,
        then one JSON line of what it saw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import uuid
import warnings

import aiohttp
import torch

from swarm import wire

PROMPT = "Write a long story about a dragon who learns to cook."


async def legit(bootstrap: str, new_tokens: int) -> None:
    from client.sampling import SamplingParams
    from client.swarm import ClientConfig, SwarmModel
    from swarm.errors import NoRoute
    from swarm.model import DEFAULT_MODEL
    from tests.nodes import refresh

    model = SwarmModel(DEFAULT_MODEL, insecure_http=True, bootstrap=[bootstrap], config=ClientConfig(wire_dtype="float32"))
    deadline = time.monotonic() + 60
    while True:  # until gossip has brought every span to the bootstrap peer
        await refresh(model)
        try:
            model.plan()
            break
        except NoRoute:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    began = time.perf_counter()
    stats = None
    async for _, stats, _ in model.stream_result(model.head.encode_prompt(PROMPT, chat=True), params):
        pass
    print(json.dumps({"tokens": stats.token_ids, "seconds": time.perf_counter() - began}), flush=True)


async def attack(args: argparse.Namespace) -> None:
    seen: dict[str, object] = {"sessions_opened": 0, "session_refusals": {}, "forward_answers": {}, "slowest_refusal_s": 0.0,
                               "connections_refused": 0, "closed_by_node": 0, "closed_after_s": 0.0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        infos = []
        for url in args.nodes:
            async with http.get(f"{url}/info") as response:
                infos.append(await response.json())
        digest = infos[0]["model"]["digest"]
        sockets = await _hoard_sessions(http, args, infos, digest, seen)
        stop = asyncio.Event()
        floods = [asyncio.ensure_future(_flood_forwards(http, args.nodes[0], infos[0], digest, args, seen, stop)) for _ in range(args.forwards)]
        await _until_forwards_busy(seen)
        raw = asyncio.ensure_future(_hoard_connections(args, seen))
        print("ready " + json.dumps(seen), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the test writes a line when done
        stop.set()
        await asyncio.gather(*floods)
        for ws in sockets:
            await ws.close()
        await raw
    print(json.dumps(seen), flush=True)


async def _hoard_sessions(http, args, infos, digest, seen) -> list:
    """Open sessions on every node (one websocket per session, never stepped) until refused or N."""
    sockets = []
    refusals: dict[str, int] = seen["session_refusals"]
    for url, info in zip(args.nodes, infos):
        for _ in range(args.sessions):
            ws = await http.ws_connect(f"{url}/session")
            sockets.append(ws)
            began = time.perf_counter()
            await ws.send_bytes(wire.encode({
                "type": "open", "session": uuid.uuid4().hex, "model": digest, "blocks": info["span"], "max_length": 512, "dtype": "float32",
                "nonce": secrets.token_bytes(16), "token": secrets.token_urlsafe(16),
            }))  # fmt: skip
            msg = await ws.receive(timeout=30)
            seen["slowest_refusal_s"] = max(seen["slowest_refusal_s"], time.perf_counter() - began)
            answer = wire.decode(msg.data) if msg.type == aiohttp.WSMsgType.BINARY else {"type": str(msg.type)}
            if answer["type"] == "opened":
                seen["sessions_opened"] += 1
            else:
                code = answer.get("code", answer["type"])
                refusals[code] = refusals.get(code, 0) + 1
                break
    return sockets


async def _hoard_connections(args, seen) -> None:
    """Idle connections and slow partial requests to the first node: more than the per-source limit."""
    host, port = args.nodes[0].removeprefix("http://").rsplit(":", 1)
    held = []
    for index in range(args.connections):
        reader, writer = await asyncio.open_connection(host, int(port))
        if index < args.partial:
            writer.write(b"POST /forward HTTP/1.1\r\nHost: x\r\nContent-")  # and never the rest
        held.append((reader, writer))
    began = time.perf_counter()

    async def outcome(reader) -> None:
        data = await asyncio.wait_for(reader.read(), 4 * args.header_timeout + 30)
        if data.startswith(b"HTTP/1.1 503"):
            body = wire.decode(data.split(b"\r\n\r\n", 1)[1])
            assert body["code"] == "busy", body
            seen["connections_refused"] += 1
        elif data == b"":
            seen["closed_by_node"] += 1
            seen["closed_after_s"] = max(seen["closed_after_s"], time.perf_counter() - began)

    await asyncio.gather(*(outcome(reader) for reader, _ in held))
    for _, writer in held:
        writer.close()


async def _flood_forwards(http, url, info, digest, args, seen, stop) -> None:
    """Large forwards, again and again; tally the answers and how long a refusal took."""
    answers: dict[str, int] = seen["forward_answers"]
    hidden = torch.randn(args.forward_tokens, info["hidden_size"])
    body = wire.encode({"type": "forward", "model": digest, "blocks": info["span"], "hidden": wire.pack_tensor(hidden, "float32")})
    while not stop.is_set():
        began = time.perf_counter()
        try:
            async with http.post(f"{url}/forward", data=body, headers={"Content-Type": "application/msgpack"}, timeout=aiohttp.ClientTimeout(total=300)) as response:
                answer = wire.decode(await response.read())
            code = "ok" if answer["type"] == "result" else answer.get("code", "?")
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # `busy` answered before the body was read, then the connection closed under the
            # rest of our upload: the refusal itself may be lost to the reset
            code = "reset"
        answers[code] = answers.get(code, 0) + 1
        if code != "ok":
            seen["slowest_refusal_s"] = max(seen["slowest_refusal_s"], time.perf_counter() - began)
            await asyncio.sleep(0.05)  # a refused attacker retries at once, nearly


async def _until_forwards_busy(seen) -> None:
    while not seen["forward_answers"].get("busy"):
        await asyncio.sleep(0.05)


def main() -> None:
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="party", required=True)
    p = sub.add_parser("legit")
    p.add_argument("bootstrap")
    p.add_argument("new_tokens", type=int)
    a = sub.add_parser("attack")
    a.add_argument("nodes", nargs="+")
    for name, default in (("--sessions", 16), ("--forwards", 4), ("--forward-tokens", 4096), ("--connections", 70), ("--partial", 8)):
        a.add_argument(name, type=int, default=default)
    a.add_argument("--header-timeout", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(legit(args.bootstrap, args.new_tokens) if args.party == "legit" else attack(args))


if __name__ == "__main__":
    main()
