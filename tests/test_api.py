"""`swarm serve` end to end: the official `openai` package against a real 3-node swarm.

One module-scoped swarm (a bootstrap peer and [0,10) [10,20) [20,30)) and one
server on it, run in-process (`run_server` on port 0, in its own thread and
event loop) with an API key and `max_concurrent=2`; the client code is the
`openai` package's, unchanged but for `base_url`, the key and no retries. The
last test kills a node to show the 503 for a missing span.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from client.serve import ServeConfig, run_server
from swarm.model import DEFAULT_MODEL
from tests.nodes import module_swarm, swarm_client

KEY = "test-key-5b1e"
PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]

swarm = module_swarm("api", ["0:10", "10:20", "20:30"])


class ServerThread:
    """`run_server` in its own thread and event loop, so the tests can use the blocking `openai` client."""

    def __init__(self, model, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.url = ""
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()

            def ready(url: str) -> None:
                self.url = url
                self.ready.set()

            await run_server(self.model, self.config, ready=ready, stop=self.stop)

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - shown by start() instead of a silent hang
            self.error = exc
            self.ready.set()

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(60), "server did not start"
        if self.error is not None:
            raise self.error
        return self

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(swarm):
    bootstrap, _ = swarm
    model = swarm_client(bootstrap.url)  # float32 wire, like `swarm generate --wire-dtype float32` below
    running = ServerThread(model, ServeConfig(host="127.0.0.1", port=0, api_key=KEY, max_concurrent=2)).start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _sessions(nodes) -> list[int]:
    out = []
    for node in nodes:
        with urllib.request.urlopen(f"{node.url}/info", timeout=10) as response:
            out.append(json.load(response)["sessions"])
    return out


def _logged(caplog, start: str) -> bool:
    return any(r.name == "client.serve" and r.getMessage().startswith(start) for r in caplog.records)


def _status(url: str, key: str | None = None, body: bytes | None = None) -> int:
    return _call(url, key, body)[0]


def _call(url: str, key: str | None = None, body: bytes | None = None) -> tuple[int, dict | None]:
    """(status, JSON body or None) of a GET, or of a POST when `body` is given."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, data=body, headers={**headers, "Content-Type": "application/json"} if body is not None else headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def test_models_lists_the_model_and_full_coverage(api):
    (model,) = api.models.list().data
    assert model.id == DEFAULT_MODEL and model.owned_by == "layerswarm"
    extra = model.model_extra
    assert extra["num_layers"] == 30 and extra["served"] == [[0, 30]] and extra["missing"] == [] and extra["peers"] == 3


def test_chat_completion_has_openai_shape_and_usage(api, server, caplog):
    caplog.set_level(logging.INFO, logger="client.serve")
    reply = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == DEFAULT_MODEL
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(server.model.head.encode_chat(MESSAGES))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 16
    assert _logged(caplog, f"POST /v1/chat/completions 200 {reply.usage.completion_tokens} tokens ")  # one line per request


def test_streaming_pieces_join_to_the_same_text_with_usage_last(api):
    whole = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_cuts_the_text(api):
    whole = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0).choices[0].message.content
    stop = "Paris"
    assert stop in whole
    reply = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_n_2_returns_both_choices(api):
    reply = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy: the same text twice
    assert reply.usage.completion_tokens == 2 * 8 or reply.choices[0].finish_reason == "stop"
    sampled = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in sampled:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts.values())


def test_completions_endpoint_and_logprobs(api):
    reply = api.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    (choice,) = reply.choices
    assert choice.text and len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chat = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_errors_in_openai_shape(api, server):
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4, tools=[{"type": "function", "function": {"name": "f"}}])
    assert caught.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=9000)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, n=9)
    assert caught.value.body["param"] == "n"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"
    assert _status(f"{server.url}/metrics") == 401 and _status(f"{server.url}/v1/models") == 401
    assert _status(f"{server.url}/v1/models", KEY) == 200 and _status(f"{server.url}/") != 401  # the page stays open
    status, body = _call(f"{server.url}/v1/chat/completions", KEY, b"x" * (2 << 20))  # over aiohttp's 1 MiB body limit
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _call(f"{server.url}/v1/chat/completions", KEY, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _call(f"{server.url}/v1/embeddings", KEY, b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_closes_sessions_and_busy_beyond_the_limit(api, server, swarm, caplog):
    caplog.set_level(logging.INFO, logger="client.serve")
    _, nodes = swarm
    stream = api.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=400, temperature=0, n=2, stream=True
    )
    pieces = iter(stream)
    next(pieces), next(pieces), next(pieces)  # two role deltas, then content: both generations run
    assert all(count >= 1 for count in _sessions(nodes))
    with pytest.raises(openai.RateLimitError) as caught:  # max_concurrent=2, both taken
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4)
    assert caught.value.code == "busy"
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 60  # far less than 400 tokens take: they closed on the disconnect
    while _sessions(nodes) != [0, 0, 0] or not _logged(caplog, "POST /v1/chat/completions 499"):
        assert time.monotonic() < deadline, _sessions(nodes)
        time.sleep(0.1)
    # 499: the handler was cancelled by the disconnect, it did not run its 2 x 400 tokens to the end
    assert _logged(caplog, "POST /v1/chat/completions 429 0 tokens")
    reply = api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4, temperature=0)  # room again
    assert reply.choices[0].message.content


def test_swarm_serve_greedy_text_equals_swarm_generate(swarm, tmp_path):
    """Both CLIs as subprocesses, started together: `swarm serve` answers through the openai package
    with the text `swarm generate` prints, and exits 0 on SIGTERM."""
    bootstrap, _ = swarm
    client = ["--bootstrap", bootstrap.url, "--insecure-http", "--wire-dtype", "float32", "--verify-fraction", "0"]
    (tmp_path / "api.key").write_text("file-key\n")
    serve = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "serve", *client, "--port", "0", "--api-key-file", str(tmp_path / "api.key")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    generate = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "generate", PROMPT, *client, "--max-new-tokens", "20", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = serve.stdout.readline()
        assert line.startswith("ready url=http://127.0.0.1:"), (line, serve.stderr.read() if serve.poll() is not None else "")
        url = line.split()[1].removeprefix("url=")
        served = openai.OpenAI(base_url=f"{url}/v1", api_key="file-key", max_retries=0, timeout=120)
        assert served.models.list().data[0].id == DEFAULT_MODEL
        reply = served.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
        out, err = generate.communicate(timeout=300)
        assert generate.returncode == 0, err
        assert reply.choices[0].message.content == json.loads(out)["text"]
    finally:
        generate.kill()
        serve.terminate()
        assert serve.wait(30) == 0


def test_serve_refuses_an_open_server_reachable_from_other_machines():
    refused = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "--api-key" in refused.stderr  # refused before loading anything


def test_missing_span_is_503_naming_the_blocks(api, swarm):
    """Last: it kills the [10, 20) node, first under a running stream, which ends in an error event."""
    _, nodes = swarm
    middle = next(n for n in nodes if n.blocks == (10, 20))
    stream = api.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=400, temperature=0, stream=True
    )
    pieces = iter(stream)
    next(pieces), next(pieces)
    middle.kill()
    with pytest.raises(openai.APIError) as caught:  # the error event mid-stream: the status was 200 already
        for _ in pieces:
            pass
    assert "swarm" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4)
    assert caught.value.status_code == 503
    assert "[10, 20)" in caught.value.message, caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:  # streamed: the status comes before any chunk
        api.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4, stream=True)
    assert caught.value.status_code == 503
    (model,) = api.models.list().data
    assert model.model_extra["missing"] == [[10, 20]]
