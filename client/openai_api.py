"""`/v1/*`: the OpenAI HTTP API over the swarm.

A request is checked whole first (client/openai_schema.py), its prompt
tokenized and measured against the model's context, and its `n` choices
registered as running generations, all before any await: so the `busy` limit
(`ServeConfig.max_concurrent`) is exact. Each choice then runs as its own
generation on its own route (`SwarmModel.stream_generation`), concurrently; a
stream answers 200 only once the first token (or error) is in, so a request
the swarm cannot serve gets its status (503 naming the missing blocks) rather
than a stream that fails. When the client goes away the handler is cancelled
(the server runs with `handler_cancellation`), which cancels the choices, and
each closes its route's sessions on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from jinja2 import TemplateError  # what a chat template raises (transformers renders them with jinja2)

from client.generate import GenerationStats, Token
from client.live import Generation, HopSpan
from client.openai_responses import (
    DONE,
    Choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    finish_reason,
    from_swarm_error,
    model_entry,
    response_id,
    sse,
    usage_chunk,
)
from client.openai_schema import ApiError, ApiRequest, invalid, max_new_tokens, parse_chat, parse_completion, parse_json
from client.sampling import SamplingParams
from client.serve import CONFIG, LIVE, METRICS, MODEL, MODEL_IDS, TOKENS, ServeConfig
from client.session import RemoteHop
from client.swarm import SwarmModel
from swarm.aliases import ALIASES
from swarm.errors import BadRequest, ModelNotFound, SwarmError
from swarm.model import resolve_model
from swarm.routing import uncovered

log = logging.getLogger(__name__)


def openai_routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model}", get_model),
    ]


def model_ids(model: SwarmModel, config: ServeConfig) -> tuple[str, ...]:
    """The id the server lists (first), then every other name a request may use for the same
    checkpoint: its aliases, the name it was loaded by, its fingerprint."""
    try:
        path = resolve_model(model.name)
    except ModelNotFound:
        path = None
    aliases = []
    for alias in ALIASES:
        try:
            if path is not None and resolve_model(alias) == path:
                aliases.append(alias)
        except ModelNotFound:
            continue
    primary = config.model_id or (model.name if model.name in ALIASES else aliases[0] if aliases else Path(model.name).name)
    return tuple(dict.fromkeys([primary, *aliases, model.name, str(model.fingerprint)]))


# --- /v1/models ----------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [await _model(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    _check_model(request.app, request.match_info["model"])
    return web.json_response(await _model(request.app))


async def _model(app: web.Application) -> dict[str, Any]:
    ids = app[MODEL_IDS]
    return model_entry(ids[0], int(time.time()), {"aliases": list(ids[1:]), **await _coverage(app[MODEL])})


async def _coverage(model: SwarmModel) -> dict[str, Any]:
    """What the swarm serves of the model, as this server's planner sees it: peers it banned (they
    failed it, e.g. unreachable) do not count until their ban ends."""
    async with model.config.transport.client_session() as http:
        try:
            await model.refresh(http)
        except SwarmError as exc:  # no bootstrap peer answered: say what the last view held
            log.info("swarm view not refreshed: %s", exc)
    planner = model.planner
    banned = planner.measurements.banned(planner.clock())
    candidates = [c for c in model.candidates() if c.peer_id not in banned]
    missing = uncovered(candidates, model.fingerprint.digest, 0, model.num_layers)
    served, at = [], 0
    for start, end in [*missing, (model.num_layers, model.num_layers)]:
        if start > at:
            served.append([at, start])
        at = end
    return {
        "num_layers": model.num_layers,
        "served": served,
        "missing": [list(gap) for gap in missing],
        "peers": len({c.peer_id for c in candidates}),
        "banned_peers": len(banned),
        "fingerprint": str(model.fingerprint),
    }


# --- completions ---------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_completion)


@dataclass
class _Event:
    """What a running choice tells the handler: a token, its end (stats), or its failure."""

    index: int
    token: Token | None = None
    stats: GenerationStats | None = None
    error: BaseException | None = None


async def _complete(request: web.Request, parse: Callable[[dict[str, Any]], ApiRequest]) -> web.StreamResponse:
    app = request.app
    began = time.perf_counter()
    model, config, live = app[MODEL], app[CONFIG], app[LIVE]
    body = parse(parse_json(await request.read()))
    _check_model(app, body.model)
    prompt_ids = _encode(model, body)
    new_tokens = max_new_tokens(body, len(prompt_ids), model.head.config.max_position, config.default_max_tokens)
    params = [body.sampling(new_tokens, i, config.speculate, config.max_draft) for i in range(body.n)]
    if len(live) + body.n > config.max_concurrent:
        raise ApiError(
            429,
            f"The server is running {len(live)} generations, its limit is {config.max_concurrent}: retry later.",
            "rate_limit_exceeded",
            "busy",
        )
    with ExitStack() as running:  # registered before any await, so the limit above holds exactly
        generations = [running.enter_context(live.track(body.kind, len(prompt_ids))) for _ in range(body.n)]
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_run_choice(app, g, i, prompt_ids, p, began, queue), name=f"choice {i} of {request.path}")
            for i, (g, p) in enumerate(zip(generations, params))
        ]
        try:
            if body.stream:
                return await _stream(request, body, len(prompt_ids), queue)
            return await _whole(request, body, len(prompt_ids), queue)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _check_model(app: web.Application, name: str) -> None:
    if name not in app[MODEL_IDS]:
        raise ApiError(
            404,
            f"The model '{name}' does not exist: this server serves '{app[MODEL_IDS][0]}'.",
            "invalid_request_error",
            "model_not_found",
            "model",
        )


def _encode(model: SwarmModel, body: ApiRequest) -> list[int]:
    head = model.head
    try:
        if body.kind == "chat":
            ids = head.encode_chat(list(body.messages))
        elif body.prompt_ids is not None:
            if max(body.prompt_ids) >= head.config.vocab_size:
                raise invalid(f"token ids in prompt must be below the vocabulary size {head.config.vocab_size}.", "prompt")
            ids = list(body.prompt_ids)
        else:
            ids = head.encode_prompt(body.prompt, chat=False)
    except BadRequest as exc:
        raise invalid(str(exc), body.prompt_param) from None
    except (
        TemplateError,
        ValueError,
        TypeError,
        LookupError,
    ) as exc:  # a chat template that refuses these messages (its raise_exception, or bad input)
        raise invalid(f"the model's chat template refused these messages: {exc}", "messages") from None
    if not ids:
        raise invalid("the prompt encodes to no tokens.", body.prompt_param)
    return ids


async def _run_choice(
    app: web.Application,
    generation: Generation,
    index: int,
    prompt_ids: list[int],
    params: SamplingParams,
    began: float,
    queue: asyncio.Queue[_Event],
) -> None:
    """One choice: its own generation on its own route; every token, then its end or failure, goes to `queue`."""
    model, metrics = app[MODEL], app[METRICS]
    stats = GenerationStats()
    last: float | None = None

    def follow(hops: list[RemoteHop]) -> None:
        generation.follow([HopSpan(h.peer_id, h.start, h.end) for h in hops])

    try:
        async with aclosing(model.stream_generation(prompt_ids, params, stats, on_route=follow)) as tokens:
            async for token in tokens:
                if token.id is not None:
                    now = time.perf_counter()
                    generation.new_tokens += 1
                    if last is None:
                        metrics.first_token(now - began)
                    else:
                        metrics.inter_token(now - last)
                    last = now
                queue.put_nowait(_Event(index, token=token))
        queue.put_nowait(_Event(index, stats=stats))
    except Exception as exc:  # noqa: BLE001 - the handler answers it (a status, or an error event mid-stream)
        queue.put_nowait(_Event(index, error=exc))
    finally:
        metrics.tokens(len(prompt_ids), stats.new_tokens)
        if stats.failovers:
            metrics.failovers([f.how for f in stats.failovers])


async def _whole(request: web.Request, body: ApiRequest, prompt_tokens: int, queue: asyncio.Queue[_Event]) -> web.Response:
    texts: list[list[str]] = [[] for _ in range(body.n)]
    tokens: list[list[Token]] = [[] for _ in range(body.n)]
    done: dict[int, GenerationStats] = {}
    while len(done) < body.n:
        event = await queue.get()
        if event.error is not None:
            raise _failed(event.error)
        if event.token is not None:
            texts[event.index].append(event.token.text)
            if body.logprobs is not None and event.token.id is not None:
                tokens[event.index].append(event.token)
        else:
            done[event.index] = event.stats
    choices = [Choice(i, "".join(texts[i]), done[i], tokens[i]) for i in range(body.n)]
    request[TOKENS] = sum(c.stats.new_tokens for c in choices)
    build = chat_response if body.kind == "chat" else completion_response
    decode = _decoder(request.app[MODEL])
    return web.json_response(
        build(response_id(body.kind), int(time.time()), body.model, prompt_tokens, choices, decode, body.logprobs is not None)
    )


async def _stream(request: web.Request, body: ApiRequest, prompt_tokens: int, queue: asyncio.Queue[_Event]) -> web.StreamResponse:
    """SSE as OpenAI frames it: per choice a role delta (chat), content pieces, a chunk with the
    finish_reason; then the usage chunk (include_usage) and `[DONE]`."""
    first = await queue.get()
    if first.error is not None:
        raise _failed(first.error)  # nothing sent yet: a proper status
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        await _events(request, response, body, prompt_tokens, queue, first)
    except ConnectionResetError:  # the client went away; the caller cancels the choices, which close their sessions
        log.info("%s: the client closed the stream", request.path)
    return response


async def _events(
    request: web.Request,
    response: web.StreamResponse,
    body: ApiRequest,
    prompt_tokens: int,
    queue: asyncio.Queue[_Event],
    first: _Event,
) -> None:
    rid, created, decode = response_id(body.kind), int(time.time()), _decoder(request.app[MODEL])
    chat = body.kind == "chat"

    def chunk(index: int, text: str | None, finish: str | None = None, token: Token | None = None) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None and token is not None and token.id is not None:
            logprobs = chat_logprobs([token], decode) if chat else completion_logprobs([token], decode)
        if chat:
            delta = {} if text is None else {"content": text}
            return chat_chunk(rid, created, body.model, index, delta, finish, logprobs, body.include_usage)
        return completion_chunk(rid, created, body.model, index, text or "", finish, logprobs, body.include_usage)

    if chat:
        for index in range(body.n):
            await response.write(
                sse(
                    chat_chunk(
                        rid,
                        created,
                        body.model,
                        index,
                        {"role": "assistant", "content": "", "refusal": None},
                        None,
                        None,
                        body.include_usage,
                    )
                )
            )
    done: dict[int, GenerationStats] = {}
    event: _Event | None = first
    while True:
        if event.error is not None:  # mid-stream: an error event in OpenAI's shape, and the stream ends
            error = _failed(event.error)
            await response.write(sse(error.body()))
            break
        if event.token is not None:
            if event.token.text or (body.logprobs is not None and event.token.id is not None):
                await response.write(sse(chunk(event.index, event.token.text, None, event.token)))
        else:
            done[event.index] = event.stats
            await response.write(sse(chunk(event.index, None, finish_reason(event.stats))))
            if len(done) == body.n:
                completion_tokens = sum(s.new_tokens for s in done.values())
                request[TOKENS] = completion_tokens
                if body.include_usage:
                    await response.write(sse(usage_chunk(body.kind, rid, created, body.model, prompt_tokens, completion_tokens)))
                break
        event = await queue.get()
    await response.write(DONE)
    await response.write_eof()


def _failed(error: BaseException) -> ApiError:
    answer = from_swarm_error(error)
    if answer.status >= 500 and not isinstance(error, SwarmError):
        log.error("generation failed", exc_info=error)
    elif answer.status >= 500:
        log.warning("generation failed: %s", error)
    return answer


def _decoder(model: SwarmModel) -> Callable[[int], str]:
    return lambda token_id: model.head.decode([token_id])


async def api_errors(request: web.Request, handler) -> web.StreamResponse:
    """Middleware for /v1: ApiError and aiohttp's own errors (404, 405, 413) as OpenAI's error JSON;
    anything unexpected is logged and answered 500 without its traceback."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers={"Retry-After": "1"} if exc.status == 429 else None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return web.json_response(ApiError(exc.status, exc.reason, "invalid_request_error", code).body(), status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(from_swarm_error(exc).body(), status=500)
