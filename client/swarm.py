"""`SwarmModel`: a language model served by a swarm, as a Python object.

The client holds the head (tokenizer, embeddings, LM head) of its local copy of
the checkpoint, whose fingerprint picks the peers that serve the same weights.
Each generation finds peers (bootstrap peers, optionally mDNS), plans the
fastest route, opens a session along it and streams tokens. A hop that refuses
(busy, shutting down, unreachable) is excluded and the route planned again.

    model = SwarmModel("smollm2-135m-instruct", bootstrap=["http://10.0.0.5:7000"])
    print(model.generate("What is the capital of France?"))
    async for piece in model.stream("Tell me a story"): ...
    model.chat([{"role": "user", "content": "Hi"}])
    model.generate_batch(["a", "b", "c"])   # spread over disjoint routes
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Sequence

import aiohttp
import torch

from client.failover import FailoverBlocks
from client.generate import GenerationStats, SamplingParams, stream_tokens
from client.peers import DiscoveryOptions, SwarmView, discover
from client.session import RemoteHop, RouteSession, SessionConfig
from swarm.discovery.mdns import MdnsConfig
from swarm.errors import NoRoute, TransientError
from swarm.model import DEFAULT_MODEL, Head, load_head, open_checkpoint
from swarm.peers import PeerRecord
from swarm.routing import Candidate, Route, plan_route, plan_routes

log = logging.getLogger(__name__)

UNMEASURED_RTT_S = 0.005  # planning cost of a peer whose round trip we have not measured


@dataclass(frozen=True)
class ClientConfig:
    wire_dtype: str = "bfloat16"
    max_attempts: int = 4  # routes tried when hops refuse (at open, or mid-generation) before giving up
    min_deadline_s: float = 1.0  # a one-token step is given max(this, deadline_factor x its usual time)
    deadline_factor: float = 10.0
    refresh_s: float = 10.0  # re-ask bootstrap peers when the view is older than this
    rtt_probes: int = 32  # at most this many peers get their round trip measured per refresh
    session: SessionConfig = field(default_factory=SessionConfig)


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    route: list[str]


class SwarmModel:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        bootstrap: Sequence[str] = (),
        mdns: bool = False,
        mdns_interfaces: Sequence[str] = (),
        config: ClientConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config or ClientConfig()
        mdns_config = MdnsConfig(interfaces=tuple(mdns_interfaces) or "all", advertise=False) if mdns else None
        self.discovery = DiscoveryOptions(bootstrap=tuple(u.rstrip("/") for u in bootstrap), mdns=mdns_config)
        with open_checkpoint(model) as checkpoint:
            self.fingerprint = checkpoint.fingerprint()
            self.num_layers = checkpoint.config.num_layers
            self.head: Head = load_head(checkpoint, dtype)
        self.view = SwarmView()
        self._refreshed = 0.0
        self._rtt: dict[str, float] = {}  # peer id -> measured round trip, seconds

    # --- the swarm ------------------------------------------------------------------------

    async def refresh(self, http: aiohttp.ClientSession, force: bool = False) -> None:
        """Re-read the swarm when the view is stale (or `force`), and measure round trips."""
        if not force and time.monotonic() - self._refreshed < self.config.refresh_s:
            return
        await discover(http, self.discovery, self.view)
        self._refreshed = time.monotonic()
        mine = [r for r in self.view.table.records(time.time()) if r.model_digest == self.fingerprint.digest and r.span]
        unmeasured = [r for r in mine if r.peer_id not in self._rtt][: self.config.rtt_probes]
        rtts = await asyncio.gather(*(_measure_rtt(http, r) for r in unmeasured))
        for record, rtt in zip(unmeasured, rtts):
            if rtt is not None:
                self._rtt[record.peer_id] = rtt

    def candidates(self) -> list[Candidate]:
        out = []
        for r in self.view.table.records(time.time()):
            if r.model_digest != self.fingerprint.digest or r.span is None or r.num_layers != self.num_layers:
                continue
            out.append(
                Candidate(
                    peer_id=r.peer_id,
                    start=r.span[0],
                    end=r.span[1],
                    per_block_s=1.0 / r.throughput if r.throughput > 0 else 1.0,
                    load=min(1.0, max(0.0, r.load)),
                    rtt_s=self._rtt.get(r.peer_id, UNMEASURED_RTT_S),
                    model=self.fingerprint.digest,
                )
            )
        return out

    def plan(self, exclude: frozenset[str] = frozenset(), start: int = 0, end: int | None = None) -> Route:
        """The best route over blocks [start, end) (default: all) avoiding the peers in `exclude`."""
        candidates = self.candidates()
        if not candidates:
            others = sorted({f"{r.model.get('architecture')}-{r.model.get('shape')}-{r.model_digest[:12]}" for r in self.view.table.records(time.time()) if r.model_digest})
            served = f"; the swarm serves: {', '.join(others)}" if others else ""
            raise NoRoute(f"no peer serves model {self.fingerprint}{served}")
        return plan_route(candidates, self.num_layers, self.fingerprint.digest, start=start, end=end, exclude=exclude)

    def plan_hops(self, exclude: frozenset[str], start: int, end: int) -> list[RemoteHop]:
        """Hops to replace a failed one over [start, end); `NoRoute` when the swarm has none."""
        return self._remote(self.plan(exclude, start, end))

    def _remote(self, route: Route) -> list[RemoteHop]:
        hops = []
        for hop in route.hops:
            record = self.view.table.get(hop.peer_id)
            if record is None:
                raise NoRoute(f"peer {hop.peer_id} left the swarm while planning")
            hops.append(RemoteHop(record.addresses[0], hop.start, hop.end, hop.peer_id))
        return hops

    # --- generation --------------------------------------------------------------------

    async def open_session(self, http: aiohttp.ClientSession, max_length: int, route: Route | None = None, exclude: frozenset[str] = frozenset()) -> RouteSession:
        """A session along `route` (or the best route avoiding `exclude`); refusing hops are excluded and the route re-planned."""
        await self.refresh(http, force=bool(exclude))
        exclude = set(exclude)
        refusals: list[str] = []
        last: Exception | None = None
        for attempt in range(self.config.max_attempts):
            try:
                planned = route if (route is not None and attempt == 0) else self.plan(frozenset(exclude))
            except NoRoute as exc:
                if not refusals:
                    raise
                raise NoRoute(f"{exc}; refused: {'; '.join(refusals)}") from None
            session = RouteSession(http, self._remote(planned), self.fingerprint.digest, max_length, replace(self.config.session, wire_dtype=self.config.wire_dtype))
            try:
                return await session.__aenter__()
            except TransientError as exc:
                last = exc
                failed = exc.hop.peer_id if isinstance(exc.hop, RemoteHop) and exc.hop.peer_id else planned.hops[0].peer_id
                log.info("route %s refused at %s (%s); planning around it", planned, failed, exc)
                exclude.add(failed)
                refusals.append(f"{exc.code}: {exc}")
                await self.refresh(http, force=True)
        raise NoRoute(f"no route worked after {self.config.max_attempts} attempts; last error: {last}")

    async def stream_result(self, prompt_ids: Sequence[int], params: SamplingParams, route: Route | None = None) -> AsyncIterator[tuple[str, GenerationStats, list[str]]]:
        """Yields (text piece, stats so far, route) as tokens are decoded."""
        stats = GenerationStats()
        max_length = len(prompt_ids) + params.max_new_tokens
        async with aiohttp.ClientSession() as http:
            blocks = FailoverBlocks(self, http, max_length, route)
            await blocks.start()
            stats.failovers = blocks.failovers
            try:
                async for token in stream_tokens(self.head, blocks, prompt_ids, params, stats):
                    yield token.text, stats, blocks.route
            finally:
                await blocks.close()

    def _ids(self, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
        if isinstance(prompt, list):
            return self.head.encode_chat(prompt)
        return self.head.encode_prompt(prompt, chat=chat)

    async def stream(self, prompt: str | list[dict[str, str]], *, chat: bool = True, **sampling) -> AsyncIterator[str]:
        """Text pieces as they are decoded. `prompt` is a string or a list of chat messages."""
        async for piece, _, _ in self.stream_result(self._ids(prompt, chat), SamplingParams(**sampling)):
            if piece:
                yield piece

    async def agenerate(self, prompt: str | list[dict[str, str]], *, chat: bool = True, route: Route | None = None, **sampling) -> GenerationResult:
        pieces, stats, names = [], GenerationStats(), []
        async for piece, stats, names in self.stream_result(self._ids(prompt, chat), SamplingParams(**sampling), route):
            pieces.append(piece)
        return GenerationResult("".join(pieces), stats, names)

    def generate(self, prompt: str, *, chat: bool = True, **sampling) -> str:
        return asyncio.run(self.agenerate(prompt, chat=chat, **sampling)).text

    def chat(self, messages: list[dict[str, str]], **sampling) -> str:
        return asyncio.run(self.agenerate(messages, **sampling)).text

    async def agenerate_batch(self, prompts: Sequence[str], *, chat: bool = True, **sampling) -> list[GenerationResult]:
        """Each prompt on its own session, sessions spread over disjoint routes where the swarm has them."""
        async with aiohttp.ClientSession() as http:
            await self.refresh(http)
        routes = plan_routes(self.candidates(), self.num_layers, self.fingerprint.digest, len(prompts))
        return list(await asyncio.gather(*(self.agenerate(p, chat=chat, route=r, **sampling) for p, r in zip(prompts, routes))))

    def generate_batch(self, prompts: Sequence[str], *, chat: bool = True, **sampling) -> list[str]:
        return [r.text for r in asyncio.run(self.agenerate_batch(prompts, chat=chat, **sampling))]


async def _measure_rtt(http: aiohttp.ClientSession, record: PeerRecord, timeout: float = 2.0) -> float | None:
    """Round trip of a small request to the peer (GET /info), or None if it does not answer."""
    began = time.perf_counter()
    try:
        async with http.get(f"{record.addresses[0]}/info", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return None
    return time.perf_counter() - began
