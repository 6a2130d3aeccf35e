"""Ray Data: a dataset of prompts through swarm clients spread over the swarm's replicas.

    import ray
    from client.ray_data import generate_dataset
    from client.sampling import SamplingParams

    prompts = ray.data.from_items([{"prompt": p} for p in my_prompts])
    answers = generate_dataset(prompts, swarm.bootstrap, concurrency=4, batch_size=16,
                               sampling=SamplingParams(max_new_tokens=64))   # greedy by default
    for row in answers.iter_rows(): print(row["prompt"], row["text"], row["route"])

`generate_dataset` is `Dataset.map_batches` with `SwarmGenerator`, a callable class:
Ray starts `concurrency` actors, each holding one `SwarmModel` (the tokenizer, embeddings
and LM head; the blocks are the swarm's) and one event loop, opened in the actor's
constructor and closed when Ray Data ends the actor. Ray places those actors and
restarts them, retrying a dead actor's batch (Ray Data's defaults for actor pools:
max_restarts=-1, max_task_retries=-1); the swarm keeps its own routing and failover
(client/failover.py).

**Spreading.** Each batch's prompts run at once, one session each, on routes from
`Planner.plan_routes`: spread over the replicas in proportion to their speed, so a
batch of at least as many prompts as replicas uses them all. Between actors, each
planner knows only its own sessions; the other actors' show up in the peers' records
(`load`, a gossip round late), which plans weigh too. Batches smaller than the
number of replicas would all start on the fastest one: keep `batch_size` above it.

**No prompt lost.** A hop that dies mid-generation is routed around by the swarm's
failover and the text goes on unchanged. A generation that fails outright with a
`TransientError`, or a `NoRoute` while nodes restart, runs again from its prompt on a
freshly planned route, up to `attempts` times, after a fresh look at the swarm;
anything else fails the batch, loudly. Greedy generations, and seeded sampling, give
the same text on any route, so a retried prompt's text is the one it would have had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.planner import ClientConfig
from client.sampling import SamplingParams
from client.swarm import GenerationResult, SwarmModel
from swarm.errors import NoRoute, TransientError
from swarm.model import DEFAULT_MODEL
from swarm.swarm_key import SwarmKey

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("text", "new_tokens", "finish_reason", "route", "failovers", "attempts")


class SwarmGenerator:
    """A `map_batches` callable class: every prompt of a batch (column `prompt_column`) generated on the swarm.

    Adds the columns `text`, `new_tokens`, `finish_reason`, `route` (the hops, " -> "),
    `failovers` (hops routed around mid-generation) and `attempts` (1 unless it was re-run)."""

    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        model: str = DEFAULT_MODEL,
        prompt_column: str = "prompt",
        chat: bool = True,  # apply the model's chat template to each prompt
        sampling: SamplingParams | None = None,  # default: greedy, 128 new tokens
        config: ClientConfig | None = None,
        insecure_http: bool = False,
        swarm_key: bytes | None = None,  # a private swarm's key file, as bytes
        verify: bool | None = None,  # as SwarmModel.agenerate's: None checks config.verify_fraction of them
        attempts: int = 4,
        retry_pause_s: float = 1.0,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.prompt_column = prompt_column
        self.chat = chat
        self.sampling = dataclasses.asdict(sampling or SamplingParams())
        self.verify = verify
        self.attempts = attempts
        self.retry_pause_s = retry_pause_s
        key = SwarmKey.from_text(swarm_key.decode(), "swarm key") if swarm_key is not None else None
        self.model = SwarmModel(model, bootstrap=list(bootstrap), config=config, insecure_http=insecure_http, swarm_key=key)
        self._loop = asyncio.new_event_loop()  # one for the actor's life: the planner's measurements and head batching live across batches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch[self.prompt_column]]
        done = self._loop.run_until_complete(self._generate(prompts))
        out: dict[str, Any] = dict(batch)
        out["text"] = np.array([r.text for r, _ in done], dtype=object)
        out["new_tokens"] = np.array([r.stats.new_tokens for r, _ in done], dtype=np.int64)
        out["finish_reason"] = np.array([r.stats.finish_reason for r, _ in done], dtype=object)
        out["route"] = np.array([" -> ".join(r.route) for r, _ in done], dtype=object)
        out["failovers"] = np.array([len(r.stats.failovers) for r, _ in done], dtype=np.int64)
        out["attempts"] = np.array([a for _, a in done], dtype=np.int64)
        return out

    async def _generate(self, prompts: list[str]) -> list[tuple[GenerationResult, int]]:
        async with self.model.config.transport.client_session() as http:
            await self.model.refresh(http)
        try:
            routes = self.model.planner.plan_routes(len(prompts))
        except NoRoute:
            routes = [None] * len(prompts)  # each generation plans its own, and retries
        return list(await asyncio.gather(*(self._one(p, r) for p, r in zip(prompts, routes))))

    async def _one(self, prompt: str, route) -> tuple[GenerationResult, int]:
        for attempt in range(1, self.attempts + 1):
            try:
                result = await self.model.agenerate(prompt, chat=self.chat, route=route, verify=self.verify, **self.sampling)
                return result, attempt
            except (TransientError, NoRoute) as exc:
                if attempt == self.attempts:
                    raise
                log.info("generation failed (%s: %s); running it again on a new route", exc.code, exc)
                route = None
                await asyncio.sleep(self.retry_pause_s)  # a restarting node needs a moment; the next open re-reads the swarm
                async with self.model.config.transport.client_session() as http:
                    await self.model.refresh(http, force=True)
        raise AssertionError("unreachable")

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def generate_dataset(
    dataset,
    bootstrap: Sequence[str],
    *,
    concurrency: int = 2,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,  # > 0: each client's head on a GPU (SwarmModel's device "auto")
    **generator: Any,
):
    """`dataset` (a `ray.data.Dataset` with a prompt column) with the generated columns added:
    `concurrency` `SwarmGenerator` actors of `num_cpus`/`num_gpus` each, batches of `batch_size`.
    `generator`: `SwarmGenerator`'s keyword arguments (model, prompt_column, sampling, config, ...)."""
    if concurrency < 1 or batch_size < 1:
        raise ValueError(f"concurrency and batch_size must be at least 1, got {concurrency} and {batch_size}")
    return dataset.map_batches(
        SwarmGenerator,
        fn_constructor_args=(list(bootstrap),),
        fn_constructor_kwargs=generator,
        concurrency=concurrency,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
