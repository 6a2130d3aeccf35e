"""The OpenAI HTTP API's answers: responses, stream chunks, model entries and errors.

Pure: the builders produce OpenAI's exact JSON shapes, so the official clients
parse them unchanged. Requests are checked by client/openai_schema.py.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from client.generate import GenerationStats, Token
from client.openai_schema import FINISH_REASONS, ApiError, invalid
from swarm.errors import LengthExceeded, ModelMismatch, NoRoute, NotMember, SwarmError, TransientError

# --- responses -----------------------------------------------------------------------------------


def response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def finish_reason(stats: GenerationStats) -> str:
    return FINISH_REASONS.get(stats.finish_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Choice:
    """What one choice produced: its text, stats and (when asked) per-token log-probabilities."""

    index: int
    text: str
    stats: GenerationStats
    tokens: list[Token] = field(default_factory=list)  # only tokens with ids, only when logprobs were asked


def chat_response(
    rid: str, created: int, model: str, prompt_tokens: int, choices: list[Choice], decode, logprobs: bool
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(c.tokens, decode) if logprobs else None,
                "finish_reason": finish_reason(c.stats),
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.stats.new_tokens for c in choices)),
        "system_fingerprint": None,
    }


def completion_response(
    rid: str, created: int, model: str, prompt_tokens: int, choices: list[Choice], decode, logprobs: bool
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.tokens, decode) if logprobs else None,
                "finish_reason": finish_reason(c.stats),
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.stats.new_tokens for c in choices)),
        "system_fingerprint": None,
    }


def chat_logprobs(tokens: list[Token], decode) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}; `decode(id) -> str`."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
            for t in tokens
            if t.id is not None and t.logprob is not None
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[Token], decode, offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: parallel lists, and the text offset of each token."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        if t.id is None or t.logprob is None:
            continue
        text = decode(t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({decode(i): lp for i, lp in t.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# --- streaming -----------------------------------------------------------------------------------


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _chunk("chat.completion.chunk", rid, created, model, choice, include_usage)


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return _chunk("text_completion", rid, created, model, choice, include_usage)


def _chunk(kind: str, rid: str, created: int, model: str, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    chunk = {"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": None, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None  # every chunk but the last says null, as OpenAI's do
    return chunk


def usage_chunk(kind: str, rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, the whole request's usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def model_entry(model_id: str, created: int, coverage: dict[str, Any]) -> dict[str, Any]:
    """One entry of GET /v1/models: OpenAI's fields, then the swarm's coverage of it."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "layerswarm", **coverage}


def from_swarm_error(exc: BaseException) -> ApiError:
    """What a failed generation answers: the swarm's typed errors as OpenAI-shaped statuses."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LengthExceeded):  # a node holds fewer positions per session than the model's context
        return invalid(f"The swarm cannot hold this many tokens: {exc}", None, "context_length_exceeded")
    if isinstance(exc, (NoRoute, TransientError, ModelMismatch, NotMember)):
        return ApiError(503, f"The swarm cannot serve this request now: {exc}", "service_unavailable", exc.code)
    if isinstance(exc, SwarmError):
        return ApiError(500, f"The swarm failed: {exc}", "server_error", exc.code)
    return ApiError(500, "The server had an error while processing your request.", "server_error", "internal_error")
