"""`SwarmModel`: a language model served by a swarm, as a Python object.

The client holds the head (tokenizer, embeddings, LM head) of its local copy of
the checkpoint, whose fingerprint picks the peers that serve the same weights.
Each generation finds peers (bootstrap peers, optionally mDNS), plans the
fastest route, opens a session along it and streams tokens. A hop that refuses
(busy, shutting down, unreachable) is excluded and the route planned again.
The head runs on `device` (default: this machine's GPU when it has one); the
generations running at once share its calls (client/head_batch.py).
"Fastest" is what this client measured (client/measure.py): a record's claimed
throughput is only a prior, and a hop that misbehaves is banned for a while.
Planning and session opening live in client/planner.py (`self.planner`).

    model = SwarmModel("smollm2-135m-instruct", bootstrap=["https://10.0.0.5:7000"])  # insecure_http=True for http peers
    print(model.generate("What is the capital of France?"))
    async for piece in model.stream("Tell me a story"): ...
    model.chat([{"role": "user", "content": "Hi"}])
    model.generate_batch(["a", "b", "c"])   # spread over disjoint routes
    SwarmModel(..., swarm_key="swarm.key")  # a private swarm: NotMember where a peer is not in it
    SwarmModel(..., device="cuda")          # the head on this machine's GPU, in bfloat16 (default "auto")
    model.agenerate("...", verify=True)     # check one hop of this generation on other replicas
    model.generate("...", speculate=False)  # one token a step: no drafts (client/speculate.py; on by default)
    SwarmModel(..., draft_model="smollm2-135m-instruct", draft_blocks=8)  # drafts from a model held here
    SwarmModel(..., full_precision=True)    # never route through a quantized (int8) node (swarm/precision.py)

A share of generations (`ClientConfig.verify_fraction`) is verified after its
text is complete (client/verification.py); `verify=True` checks one on request,
`verify=False` never; the outcome is `GenerationResult.stats.verification`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import torch

from client.draft_model import DraftModel
from client.failover import FailoverBlocks
from client.generate import GenerationStats, Token, stream_tokens
from client.head_batch import HeadBatcher
from client.peers import DiscoveryOptions
from client.planner import ClientConfig, Planner, claimed_throughput
from client.remote_head import remote_head_config
from client.sampling import SamplingParams
from client.session import RemoteHop, RouteSession
from client.verification import Verifier
from swarm.discovery.mdns import MdnsConfig
from swarm.membership import Membership
from swarm.model import DEFAULT_MODEL, Head, load_head, open_checkpoint
from swarm.model.device import default_dtype, resolve_device
from swarm.model.tokenizer_cache import default_cache_dir
from swarm.records import PeerRecord
from swarm.routing import Candidate, Route
from swarm.swarm_key import SwarmKey

__all__ = ["ClientConfig", "GenerationResult", "SwarmModel"]

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    route: list[str]


class SwarmModel:
    """A model served by a swarm. Peers are found by `discovery` when given (the CLI builds
    it from its flags), else from `bootstrap` and `mdns`/`mdns_interfaces`."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        bootstrap: Sequence[str] = (),
        mdns: bool = False,
        mdns_interfaces: Sequence[str] = (),
        discovery: DiscoveryOptions | None = None,
        config: ClientConfig | None = None,
        dtype: torch.dtype | None = None,  # the head's; default bfloat16 on a GPU, float32 on the CPU
        device: str | torch.device = "auto",  # the head's: "cpu", "cuda", "cuda:N", or "auto" (a GPU when there is one)
        claims: Callable[[PeerRecord], float] = claimed_throughput,
        insecure_http: bool = False,
        swarm_key: str | Path | SwarmKey | None = None,
        progress: Callable[[int, int], None] | None = None,  # the head's load, part by part (swarm.model.load_head)
        tokenizer_cache: Path | bool = True,  # True: keep a GGUF's built tokenizer in ~/.cache/layerswarm; False: never
        draft_model: str | Path | DraftModel | None = None,  # drafts from this model (its first draft_blocks blocks) instead of prompt lookup
        draft_blocks: int | None = None,
        full_precision: bool | None = None,  # None: the config's (default off); True: no quantized (int8) hops, NoFullPrecisionRoute where only they serve
    ) -> None:
        self.config = config or ClientConfig()
        if full_precision is not None:
            self.config = replace(self.config, full_precision=full_precision)
        where = resolve_device(device)  # SwarmError before anything is read
        if insecure_http:  # also dial plain http peers (pins still hold on https ones)
            self.config = replace(self.config, transport=replace(self.config.transport, insecure_http=True))
        if swarm_key is not None:  # a private swarm's key, or its file (KeyFileError when unusable)
            key = swarm_key if isinstance(swarm_key, SwarmKey) else SwarmKey.load(swarm_key)
            self.config = replace(self.config, transport=replace(self.config.transport, membership=Membership(key)))
        if discovery is None:
            mdns_config = MdnsConfig(interfaces=tuple(mdns_interfaces) or "all", advertise=False) if mdns else None
            discovery = DiscoveryOptions(bootstrap=tuple(u.rstrip("/") for u in bootstrap), mdns=mdns_config)
        self.name = str(model)  # what it was asked for: an alias, a .gguf file or an HF directory
        cache = default_cache_dir() if tokenizer_cache is True else (tokenizer_cache or None)
        with open_checkpoint(model, cache) as checkpoint:
            self.fingerprint = checkpoint.fingerprint()
            self.num_layers = checkpoint.config.num_layers
            # The embeddings stay on the CPU whatever `device`: their rows go straight onto the wire,
            # with no copy to the GPU and back (nor a sync) per step; the norm and LM head go to `device`.
            self.head: Head = load_head(checkpoint, dtype or default_dtype(where), where, progress=progress, embed_device="cpu")
        self.batcher = HeadBatcher(self.head)  # every concurrent generation of this client shares the head's calls
        # Whether last hops serving the head apply it for us (client/remote_head.py): "auto" when ours is on the CPU.
        self.config = remote_head_config(self.config, self.head.device, self.head.config.vocab_size)
        self.planner = Planner(self.fingerprint.digest, self.num_layers, discovery, self.config, claims=claims, model_name=str(self.fingerprint))
        self.verifier = Verifier(self.planner, self.config, logits=self.head.logits)  # logits: checks a last hop's head
        # Speculative decoding's drafter (client/speculate.py): prompt lookup unless a draft model is held here.
        self.draft: DraftModel | None = None
        if draft_model is not None:
            self.draft = draft_model if isinstance(draft_model, DraftModel) else DraftModel.load(str(draft_model), draft_blocks, where, dtype)
            self.draft.check_vocabulary(self.head)  # ModelMismatch: drafts in another vocabulary would never be kept

    @property
    def discovery(self) -> DiscoveryOptions:
        return self.planner.discovery

    @property
    def view(self):
        return self.planner.view

    # --- the swarm (planning lives in client/planner.py) ---------------------------------

    async def refresh(self, http: aiohttp.ClientSession, force: bool = False) -> None:
        """Re-read the swarm when the view is stale (or `force`), and measure round trips."""
        await self.planner.refresh(http, force)

    def candidates(self) -> list[Candidate]:
        return self.planner.candidates()

    def plan(self, exclude: frozenset[str] = frozenset(), start: int = 0, end: int | None = None) -> Route:
        """The best route over blocks [start, end) (default: all) avoiding the peers in `exclude`."""
        return self.planner.plan(exclude, start, end)

    def plan_hops(self, exclude: frozenset[str], start: int, end: int) -> list[RemoteHop]:
        return self.planner.plan_hops(exclude, start, end)

    # --- generation --------------------------------------------------------------------

    async def open_session(self, http: aiohttp.ClientSession, max_length: int, route: Route | None = None, exclude: frozenset[str] = frozenset()) -> RouteSession:
        """A session along `route` (or the best route avoiding `exclude`); refusing hops are excluded and the route re-planned."""
        return await self.planner.open_session(http, max_length, route, exclude)

    async def stream_result(
        self, prompt_ids: Sequence[int], params: SamplingParams, route: Route | None = None, verify: bool | None = None
    ) -> AsyncIterator[tuple[str, GenerationStats, list[str]]]:
        """Yields (text piece, stats so far, route) as tokens are decoded.

        `verify`: None checks the generation with probability `verify_fraction`, True always,
        False never. The check runs after the last token and before the stream ends; its
        outcome is `stats.verification` (None when not selected)."""
        stats = GenerationStats()
        names: list[str] = []

        def follow(hops: list[RemoteHop]) -> None:
            names[:] = map(str, hops)

        async with aclosing(self.stream_generation(prompt_ids, params, stats, route, verify, on_route=follow)) as tokens:
            async for token in tokens:
                yield token.text, stats, list(names)

    async def stream_generation(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stats: GenerationStats,
        route: Route | None = None,
        verify: bool | None = None,
        on_route: Callable[[list[RemoteHop]], None] | None = None,
    ) -> AsyncIterator[Token]:
        """Yields each `Token` as it is decoded, filling `stats`; `on_route(hops)` is called when the
        session opens and whenever failover changes its route. Closing the generator (or cancelling
        its consumer) closes the route's sessions before it returns."""
        max_length = len(prompt_ids) + params.max_new_tokens
        async with self.config.transport.client_session() as http:
            blocks = FailoverBlocks(self.planner, http, max_length, route)
            try:
                await blocks.start()
                stats.failovers = blocks.failovers
                tape = self.verifier.plan(blocks.session, verify)
                seen: list[RemoteHop] = []
                drafter = self.draft.fork() if self.draft is not None and params.drafts else None  # its own cache
                async for token in stream_tokens(self.head, blocks, prompt_ids, params, stats, self.batcher, drafter):
                    if on_route is not None and blocks.session.route != seen:
                        seen = list(blocks.session.route)
                        on_route(seen)
                    yield token
                stats.verification = await self.verifier.check(http, blocks.session, tape, blocks.clean and not blocks.failovers)
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

    async def agenerate(
        self, prompt: str | list[dict[str, str]], *, chat: bool = True, route: Route | None = None, verify: bool | None = None, **sampling
    ) -> GenerationResult:
        pieces, stats, names = [], GenerationStats(), []
        async for piece, stats, names in self.stream_result(self._ids(prompt, chat), SamplingParams(**sampling), route, verify):
            pieces.append(piece)
        return GenerationResult("".join(pieces), stats, names)

    def generate(self, prompt: str, *, chat: bool = True, verify: bool | None = None, **sampling) -> str:
        return asyncio.run(self.agenerate(prompt, chat=chat, verify=verify, **sampling)).text

    def chat(self, messages: list[dict[str, str]], **sampling) -> str:
        return asyncio.run(self.agenerate(messages, **sampling)).text

    async def agenerate_batch(self, prompts: Sequence[str], *, chat: bool = True, **sampling) -> list[GenerationResult]:
        """Each prompt on its own session, sessions spread over disjoint routes where the swarm has them."""
        async with self.config.transport.client_session() as http:
            await self.refresh(http)
        routes = self.planner.plan_routes(len(prompts))
        return list(await asyncio.gather(*(self.agenerate(p, chat=chat, route=r, **sampling) for p, r in zip(prompts, routes))))

    def generate_batch(self, prompts: Sequence[str], *, chat: bool = True, **sampling) -> list[str]:
        return [r.text for r in asyncio.run(self.agenerate_batch(prompts, chat=chat, **sampling))]
