"""The OpenAI HTTP API's requests, checked whole, and its error shape.

Pure: no network, no model. `parse_chat` / `parse_completion` check a whole
request body before anything runs and refuse what we do not support with a 400
naming the `param`, the way OpenAI does. The answers (responses, stream chunks,
errors from the swarm's) are built by client/openai_responses.py;
client/openai_api.py runs what these describe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from client.sampling import SamplingParams
from swarm.errors import BadRequest

MAX_N = 8
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs`; completions' `logprobs` allows 5, as OpenAI's
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Accepted but without effect: they change nothing in what is generated.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
# Known, and refused unless they carry their "off" value (checked by `_refuse_unsupported`).
_UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": 'only response_format {"type": "text"} is supported',
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of other than 1 is not supported",
}
# `speculate` (bool) is ours, an extra body field: false sends no draft tokens (client/speculate.py); absent, the server's default.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "presence_penalty", "frequency_penalty", "stream", "speculate"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


@dataclass(frozen=True)
class ApiRequest:
    """A checked request. Exactly one of `messages` (chat), `prompt` or `prompt_ids` (completions) is set."""

    kind: Literal["chat", "completion"]
    model: str
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_tokens: int | None = None  # None: the server's default, capped by the context left
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; else how many top alternatives per token
    stream: bool = False
    include_usage: bool = False
    speculate: bool | None = None  # None: the server's default
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def sampling(self, max_new_tokens: int, choice: int, speculate: bool = True, max_draft: int = 8) -> SamplingParams:
        """The sampling of choice `choice` (0..n-1): choices of a seeded request get seed + choice.
        `speculate`, `max_draft`: the server's defaults (a request's `speculate` overrides the first)."""
        greedy = self.temperature == 0 or self.top_p == 0  # top_p -> 0 keeps only the most likely token
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=0.0 if greedy else self.temperature,
                top_p=1.0 if greedy else self.top_p,
                seed=None if self.seed is None else self.seed + choice,
                stop=self.stop,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logprobs=self.logprobs,
                speculate=speculate if self.speculate is None else self.speculate,
                max_draft=max_draft,
            )
        except BadRequest as exc:  # parse_* checked every field already: this is a bug, but say it as a 400
            raise invalid(str(exc)) from None


# --- parsing -------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def parse_chat(body: dict[str, Any]) -> ApiRequest:
    _check_fields(body, _CHAT_FIELDS)
    messages = _messages(_required(body, "messages"))
    if (
        "max_tokens" in body
        and "max_completion_tokens" in body
        and body["max_tokens"] is not None
        and body["max_completion_tokens"] is not None
    ):
        raise invalid("Give max_tokens or max_completion_tokens, not both.", "max_tokens")
    max_tokens = (
        _int(body, "max_completion_tokens", 1) if body.get("max_completion_tokens") is not None else _int(body, "max_tokens", 1)
    )
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs needs logprobs: true.", "top_logprobs")
    return ApiRequest(kind="chat", messages=messages, max_tokens=max_tokens, logprobs=logprobs, **_common(body))


def parse_completion(body: dict[str, Any]) -> ApiRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    prompt, prompt_ids = _prompt(_required(body, "prompt"))
    return ApiRequest(
        kind="completion",
        prompt=prompt,
        prompt_ids=prompt_ids,
        max_tokens=_int(body, "max_tokens", 1),
        logprobs=_int(body, "logprobs", 0, 5),
        **_common(body),
    )


def _check_fields(body: dict[str, Any], accepted: set[str]) -> None:
    for name, value in body.items():
        if name in accepted or name in _IGNORED:
            continue
        if name in _UNSUPPORTED:
            if not _is_off(name, value):
                raise invalid(f"{_UNSUPPORTED[name]} by this server.", name, "unsupported_parameter")
            continue
        raise invalid(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _is_off(name: str, value: Any) -> bool:
    """Whether a field we do not support carries the value that asks for nothing."""
    if value is None:
        return True
    if name in ("tools", "functions", "logit_bias"):
        return not value  # [] or {}
    if name in ("tool_choice", "function_call"):
        return value == "none"
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if name == "modalities":
        return value == ["text"]
    if name == "echo":
        return value is False
    if name == "best_of":
        return value == 1
    return False


def _common(body: dict[str, Any]) -> dict[str, Any]:
    model = _required(body, "model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string.", "model")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream: true.", "stream_options")
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object.", "stream_options")
        include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    return {
        "model": model,
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
        "stop": _stop(body.get("stop")),
        "seed": _int(body, "seed", -(2**63), 2**63 - 1),
        "n": _int(body, "n", 1, MAX_N) or 1,
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "stream": stream,
        "include_usage": include_usage,
        "speculate": None if body.get("speculate") is None else _bool(body, "speculate"),
    }


def _required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise invalid(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    return body[name]


def _bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be a boolean.", param or name)
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer.", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{name} must be {bound}, not {value}.", name, "integer_out_of_range" if name != "n" else None)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a number.", name)
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low:g} and {high:g}, not {value}.", name, "decimal_out_of_range")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings.", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"stop may hold at most {MAX_STOP} sequences, not {len(stops)}.", "stop")
    if any(not s for s in stops):
        raise invalid("stop sequences must not be empty.", "stop")
    return tuple(stops)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list.", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object.", where)
        role = message.get("role")
        if role not in ROLES:
            if role in ("tool", "function"):
                raise invalid(
                    f"{where}: role '{role}' needs tool calls, which are not supported by this server.",
                    f"{where}.role",
                    "unsupported_parameter",
                )
            raise invalid(f"{where}.role must be one of system, developer, user, assistant.", f"{where}.role")
        for name in message:
            if name not in ("role", "content", "name"):
                raise invalid(f"{where}.{name} is not supported by this server.", f"{where}.{name}", "unsupported_parameter")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A string, or a list of text parts (joined); images, audio and files are refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise invalid(f"{where} must be a string or a non-empty list of text parts.", where)
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise invalid(
                    f"{where}[{j}]: content of type '{kind}' is not supported by this server (text only).",
                    f"{where}[{j}].type",
                    "unsupported_parameter",
                )
            raise invalid(f'{where}[{j}] must be {{"type": "text", "text": string}}.', f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _prompt(value: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """A string, a list of one string, or a list of token ids (a list of one such list too)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
        if isinstance(value, str):
            return value, None
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if min(value) < 0:
            raise invalid("token ids in prompt must be >= 0.", "prompt")
        return None, tuple(value)
    raise invalid(
        "prompt must be a string, a list of one string, or a non-empty list of token ids (batches of prompts are not supported).",
        "prompt",
    )


# --- limits that need the model -------------------------------------------------------------------


def max_new_tokens(request: ApiRequest, prompt_tokens: int, context: int, default: int) -> int:
    """How many tokens to generate: the request's max_tokens, or `default` capped by the context left;
    `context_length_exceeded` when the prompt plus max_tokens do not fit the model's context."""
    if request.max_tokens is None:
        if prompt_tokens >= context:
            raise _too_long(request, prompt_tokens, context, f"your prompt has {prompt_tokens} tokens")
        return min(default, context - prompt_tokens)
    if prompt_tokens + request.max_tokens > context:
        raise _too_long(
            request,
            prompt_tokens,
            context,
            f"you requested {prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the prompt, {request.max_tokens} for the completion)",
        )
    return request.max_tokens


def _too_long(request: ApiRequest, prompt_tokens: int, context: int, what: str) -> ApiError:
    return invalid(
        f"This model's maximum context length is {context} tokens. However, {what}. Please reduce the length of the prompt or of max_tokens.",
        request.prompt_param,
        "context_length_exceeded",
    )
