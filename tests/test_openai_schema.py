"""The OpenAI API's shapes (client/openai_schema.py) and the sampling it maps to, without a network."""

from __future__ import annotations

import json

import pytest
import torch

from client.generate import GenerationStats, Token
from client.openai_responses import (
    DONE,
    Choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    from_swarm_error,
    sse,
    usage_chunk,
)
from client.openai_schema import ApiError, max_new_tokens, parse_chat, parse_completion, parse_json
from client.sampling import Sampler, SamplingParams
from swarm.errors import BadRequest, Busy, LengthExceeded, NoRoute, PeerUnavailable, SwarmError

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat({"model": "m", "messages": MSG, **fields})


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    return caught.value


# --- parsing ---------------------------------------------------------------------------------------


def test_chat_defaults_follow_openai():
    request = chat()
    assert (request.kind, request.model, request.messages) == ("chat", "m", ({"role": "user", "content": "hi"},))
    assert request.temperature == 1.0 and request.top_p == 1.0 and request.n == 1 and request.max_tokens is None
    assert not request.stream and request.logprobs is None


def test_chat_maps_every_supported_field():
    request = chat(
        max_completion_tokens=7, temperature=0.5, top_p=0.9, stop="END", seed=3, n=2, presence_penalty=0.5, frequency_penalty=-1,
        stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=4, user="u-1",
    )  # fmt: skip
    assert request.max_tokens == 7 and request.stop == ("END",) and request.include_usage and request.logprobs == 4
    params = request.sampling(7, choice=1)
    assert params == SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=4,
        stop=("END",),
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logprobs=4,
    )  # seed + choice


def test_greedy_by_temperature_zero_or_top_p_zero():
    assert chat(temperature=0).sampling(4, 0).temperature == 0
    assert chat(top_p=0).sampling(4, 0).temperature == 0


def test_content_parts_join_and_developer_is_system():
    request = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
    ]})  # fmt: skip
    assert request.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": 1.5}, "seed"),
        ({"whatever": 1}, "whatever"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ],
)
def test_chat_refuses_with_the_param(fields, param):
    assert refused(parse_chat, {"model": "m", "messages": MSG, **fields}).param == param


def test_off_values_of_unsupported_fields_are_accepted():
    chat(
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        logit_bias={},
        parallel_tool_calls=False,
        metadata={"a": "b"},
    )


def test_missing_fields():
    assert refused(parse_chat, {"messages": MSG}).code == "missing_required_parameter"
    assert refused(parse_chat, {"model": "m"}).param == "messages"
    assert refused(parse_completion, {"model": "m"}).param == "prompt"


def test_completion_prompts():
    assert parse_completion({"model": "m", "prompt": "x"}).prompt == "x"
    assert parse_completion({"model": "m", "prompt": ["x"]}).prompt == "x"
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt_ids == (1, 2, 3)
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}).prompt_ids == (1, 2)
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 2, "echo": False, "best_of": 1}).logprobs == 2
    for prompt in (["a", "b"], [], [-1], [1, "a"], 5, [True]):
        assert refused(parse_completion, {"model": "m", "prompt": prompt}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "echo": True}).param == "echo"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "suffix": "y"}).param == "suffix"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "logprobs": 6}).param == "logprobs"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "messages": MSG}).param == "messages"


def test_bad_json():
    assert "JSON" in refused(parse_json, b"{nope").message
    assert refused(parse_json, b"[1]").message
    assert refused(parse_json, b"\xff\xfe").message


def test_context_length():
    assert max_new_tokens(chat(max_tokens=10), 20, 100, 512) == 10
    assert max_new_tokens(chat(), 20, 100, 512) == 80  # the default, capped by the context left
    assert max_new_tokens(chat(), 20, 1000, 512) == 512
    for request, prompt in ((chat(max_tokens=81), 20), (chat(), 100)):
        with pytest.raises(ApiError) as caught:
            max_new_tokens(request, prompt, 100, 512)
        assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"


def test_swarm_errors_map_to_statuses():
    cases = {
        NoRoute("no peer serves blocks [10, 20)"): 503,
        PeerUnavailable("x"): 503,
        Busy("x"): 503,
        LengthExceeded("x"): 400,
        SwarmError("x"): 500,
    }
    for error, status in cases.items():
        assert from_swarm_error(error).status == status
    assert "[10, 20)" in from_swarm_error(NoRoute("no peer serves blocks [10, 20)")).message
    hidden = from_swarm_error(RuntimeError("secret traceback detail"))
    assert hidden.status == 500 and "secret" not in hidden.message
    assert set(hidden.body()["error"]) == {"message", "type", "param", "code"}


# --- responses ---------------------------------------------------------------------------------------


def _stats(new_tokens: int, reason: str) -> GenerationStats:
    return GenerationStats(prompt_tokens=5, new_tokens=new_tokens, finish_reason=reason)


def test_chat_response_shape():
    choices = [Choice(0, "a", _stats(3, "eos")), Choice(1, "b", _stats(4, "length"))]
    body = chat_response("chatcmpl-1", 10, "m", 5, choices, str, logprobs=False)
    assert body["object"] == "chat.completion" and body["created"] == 10
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["choices"][1]["message"] == {"role": "assistant", "content": "b", "refusal": None}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    text = completion_response("cmpl-1", 10, "m", 5, [Choice(0, "x", _stats(1, "stop"))], str, logprobs=False)
    assert (
        text["object"] == "text_completion"
        and text["choices"][0]["text"] == "x"
        and text["choices"][0]["finish_reason"] == "stop"
    )


def test_logprobs_shapes():
    tokens = [Token(7, "ab", -0.5, ((7, -0.5), (8, -1.5))), Token(None, "tail")]
    decode = {7: "ab", 8: "c"}.get
    content = chat_logprobs(tokens, decode)["content"]
    assert content == [{"token": "ab", "logprob": -0.5, "bytes": [97, 98], "top_logprobs": [
        {"token": "ab", "logprob": -0.5, "bytes": [97, 98]}, {"token": "c", "logprob": -1.5, "bytes": [99]}]}]  # fmt: skip
    legacy = completion_logprobs(tokens + [Token(8, "c", -2.0)], decode)
    assert legacy == {
        "tokens": ["ab", "c"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"ab": -0.5, "c": -1.5}, {}],
        "text_offset": [0, 2],
    }


def test_stream_frames():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and DONE == b"data: [DONE]\n\n"
    chunk = chat_chunk("chatcmpl-1", 10, "m", 0, {"content": "x"}, include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]
    assert "usage" not in chat_chunk("chatcmpl-1", 10, "m", 0, {})
    last = usage_chunk("chat", "chatcmpl-1", 10, "m", 5, 3)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 8
    json.dumps(last)


# --- the sampling OpenAI's fields map to -----------------------------------------------------------------


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([3.0, 2.5, 0.0])
    assert Sampler(SamplingParams())(logits, [0, 0], [0, 0]) == 0
    # token 0 generated twice: 3.0 - 2 * 0.3 = 2.4 < 2.5
    assert Sampler(SamplingParams(frequency_penalty=0.3))(logits, [0, 0], [0, 0]) == 1
    assert Sampler(SamplingParams(frequency_penalty=0.3))(logits, [0], [0]) == 0  # once: 2.7 > 2.5
    assert Sampler(SamplingParams(presence_penalty=0.6))(logits, [0], [0]) == 1  # once is enough: 2.4
    assert Sampler(SamplingParams(presence_penalty=0.6))(logits, [0, 0], []) == 0  # only generated tokens count, not the prompt
    assert Sampler(SamplingParams(presence_penalty=-2.0))(logits, [1], [1]) == 1  # negative: encourages repeats
    with pytest.raises(BadRequest):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(BadRequest):
        SamplingParams(logprobs=21)
