"""`GET /metrics`: a real node's counters move with real traffic, refusals are counted by code,
a private node's `--metrics-port` answers Prometheus without the key, and `swarm serve`'s
`ApiMetrics` renders and parses."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from client.api_metrics import ApiMetrics, metrics_routes
from client.live import HopSpan, LiveGenerations
from swarm import wire
from swarm.exposition import Exposition, render
from swarm.swarm_key import SwarmKey
from tests.nodes import start_nodes, stop_nodes, swarm_client


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A bootstrap peer and one node with every block (cheap, and enough), rendering every scrape afresh."""
    tmp = tmp_path_factory.mktemp("metrics")
    period = ["--gossip-period", "0.5"]
    (bootstrap,) = start_nodes([["--no-model", *period]], tmp / "bootstrap")
    (node,) = start_nodes([["--blocks", "0:30", "--bootstrap", bootstrap.url, "--metrics-max-age", "0", *period]], tmp)
    yield bootstrap, [node]
    stop_nodes([bootstrap, node])


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        return parse(await response.text())


async def test_node_counters_move_with_a_generation(swarm):
    _, (node,) = swarm
    before = await scrape(node.url)
    assert value(before, "layerswarm_node_sessions") == 0
    client = swarm_client(swarm[0].url)
    result = await client.agenerate("Name a colour.", max_new_tokens=6)
    assert result.stats.new_tokens >= 1
    prompt = result.stats.prompt_tokens
    after = await scrape(node.url)
    # one step per token fed through: the prompt's (one step, its chunks count once) then each new one but the last
    steps = value(after, "layerswarm_node_steps_total") - value(before, "layerswarm_node_steps_total")
    assert steps >= result.stats.new_tokens
    tokens = value(after, "layerswarm_node_tokens_total") - value(before, "layerswarm_node_tokens_total")
    assert tokens >= prompt + result.stats.new_tokens - 1
    for histogram in (
        "layerswarm_node_step_seconds_count",
        "layerswarm_node_queue_seconds_count",
        "layerswarm_node_batch_size_count",
        "layerswarm_node_batch_seconds_count",
    ):
        assert value(after, histogram) > value(before, histogram), histogram
    # at least one step per batch
    assert value(after, "layerswarm_node_batch_size_sum") >= value(after, "layerswarm_node_batch_size_count")
    assert value(after, "layerswarm_node_sessions_opened_total") >= value(before, "layerswarm_node_sessions_opened_total") + 1
    # the client closed its session: nothing held, the whole KV budget free again
    assert value(after, "layerswarm_node_sessions") == 0
    assert value(after, "layerswarm_node_kv_used_bytes") == 0
    assert value(after, "layerswarm_node_kv_free_bytes") == 2 * 2**30
    # the rest of the node: who it is, its table, its gossip
    info = [labels for (name, labels) in after if name == "layerswarm_node_info"]
    assert dict(info[0])["peer_id"] == node.peer_id and dict(info[0])["blocks"] == "0:30"
    assert value(after, "layerswarm_node_peers_known") >= 2  # itself and the bootstrap peer
    assert value(after, "layerswarm_node_peers_proven") >= 1
    assert value(after, "layerswarm_node_gossip_rounds_total") >= 1


async def test_refusals_are_counted_by_code(swarm):
    _, (node,) = swarm
    before = await scrape(node.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{node.url}/forward", data=b"\x00not msgpack", headers={"Content-Type": "application/msgpack"}
        ) as response:
            assert response.status == 400
            assert wire.decode(await response.read())["code"] == "bad_request"
        async with http.ws_connect(f"{node.url}/session") as ws:
            await ws.send_str("text, not a msgpack frame")
            answer = wire.decode(await ws.receive_bytes())
            assert answer["code"] == "bad_request"
            await ws.send_bytes(wire.encode({"type": "step", "session": "nope"}))
            assert wire.decode(await ws.receive_bytes())["type"] == "error"
    after = await scrape(node.url)
    assert (
        value(after, "layerswarm_node_refusals_total", code="bad_request")
        >= value(before, "layerswarm_node_refusals_total", code="bad_request") + 2
    )
    refused = sum(v for (name, _), v in after.items() if name == "layerswarm_node_refusals_total")
    refused_before = sum(v for (name, _), v in before.items() if name == "layerswarm_node_refusals_total")
    assert refused >= refused_before + 3
    assert (
        value(after, "layerswarm_node_forward_requests_total", outcome="refused")
        == value(before, "layerswarm_node_forward_requests_total", outcome="refused") + 1
    )


async def test_metrics_port_of_a_private_node_answers_without_the_key(tmp_path):
    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    (node,) = start_nodes([["--no-model", "--swarm-key", str(key), "--metrics-port", "0"]], tmp_path)
    try:
        metrics_url = next(line.split(" metrics=")[1].split()[0] for line in node.output if line.startswith("ready "))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{node.url}/metrics") as response:  # the node's own port: members only
                assert response.status == 401
                assert wire.decode(await response.read())["code"] == "not_member"
            async with http.get(f"{metrics_url}/info") as response:  # the listener serves /metrics alone
                assert response.status == 404
        samples = await scrape(metrics_url)
        assert value(samples, "layerswarm_node_refusals_total", code="not_member") >= 1  # the 401 above, counted
        info = dict(next(labels for (name, labels) in samples if name == "layerswarm_node_info"))
        assert info["peer_id"] == node.peer_id and info["blocks"] == "none"
    finally:
        stop_nodes([node])


def test_api_metrics_render_parse_and_move():
    live = LiveGenerations()
    metrics = ApiMetrics(live)
    empty = parse(render(metrics.registry)[0].decode())
    assert value(empty, "layerswarm_api_generations_running") == 0
    metrics.request("/v1/chat/completions", 200, 0.4)
    metrics.request("/v1/chat/completions", 400, 0.001)
    metrics.tokens(prompt=12, completion=5)
    metrics.first_token(0.2)
    for _ in range(4):
        metrics.inter_token(0.03)
    metrics.failovers(["splice", "reroute", "splice"])
    with live.track("chat", 12) as generation:
        generation.follow([HopSpan("peer-a", 0, 10), HopSpan("peer-b", 10, 30)])
        samples = parse(render(metrics.registry)[0].decode())
    assert value(samples, "layerswarm_api_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(samples, "layerswarm_api_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert value(samples, "layerswarm_api_request_seconds_count", endpoint="/v1/chat/completions") == 2
    assert value(samples, "layerswarm_api_prompt_tokens_total") == 12
    assert value(samples, "layerswarm_api_completion_tokens_total") == 5
    assert value(samples, "layerswarm_api_generations_total") == 1
    assert value(samples, "layerswarm_api_time_to_first_token_seconds_count") == 1
    assert value(samples, "layerswarm_api_inter_token_seconds_count") == 4
    assert value(samples, "layerswarm_api_inter_token_seconds_bucket", le="0.05") == 4
    assert value(samples, "layerswarm_api_failovers_total", how="splice") == 2
    assert value(samples, "layerswarm_api_failovers_total", how="reroute") == 1
    assert value(samples, "layerswarm_api_generations_running") == 1
    assert value(samples, "layerswarm_api_peer_generations", peer="peer-a") == 1
    after = parse(render(metrics.registry)[0].decode())
    assert value(after, "layerswarm_api_generations_running") == 0


def test_api_metrics_bound_their_labels():
    metrics = ApiMetrics(LiveGenerations())
    for index in range(100):
        metrics.request(f"/no/such/path/{index}", 404, 0.001)
    samples = parse(render(metrics.registry)[0].decode())
    endpoints = {dict(labels)["endpoint"] for (name, labels) in samples if name == "layerswarm_api_requests_total"}
    assert len(endpoints) <= 33 and "other" in endpoints


async def test_api_metrics_route_serves_the_apps_registry():
    from client.serve import METRICS

    app = web.Application()
    app[METRICS] = metrics = ApiMetrics(LiveGenerations())
    app.add_routes(metrics_routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        metrics.request("/v1/models", 200, 0.01)
        samples = await scrape(f"http://{host}:{port}")
        assert value(samples, "layerswarm_api_requests_total", endpoint="/v1/models", status="200") == 1
        openmetrics = {"Accept": "application/openmetrics-text"}  # a scraper that asks for OpenMetrics gets it
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/metrics", headers=openmetrics) as response:
            assert response.content_type == "application/openmetrics-text"
            assert (await response.text()).endswith("# EOF\n")
    finally:
        await runner.cleanup()


def test_an_exposition_renders_at_most_once_per_max_age():
    """A flood of scrapes costs one rendering per format per max_age_s (what a stranger can make a node do)."""
    registry, now = CollectorRegistry(), [0.0]
    counter = Counter("layerswarm_test_things", "things", registry=registry)
    exposition = Exposition(registry, max_age_s=1.0, clock=lambda: now[0])
    first, content_type = exposition.render()
    counter.inc()
    for _ in range(1000):
        assert exposition.render() == (first, content_type)
    exposition.render("application/openmetrics-text")  # another format: its own rendering
    assert exposition.renders == 2
    now[0] = 1.0
    fresh, _ = exposition.render()
    assert fresh != first and value(parse(fresh.decode()), "layerswarm_test_things_total") == 1
    assert exposition.renders == 3


async def test_swarm_serve_metrics_count_a_completion(swarm):
    """`swarm serve` (client/serve.py `run_server`, in this process) on the module's node: /metrics after one request."""
    import client.serve

    run_server = getattr(client.serve, "run_server", None)
    if run_server is None:
        pytest.skip("client/serve.py has no run_server yet (the api branch)")
    ready, stop = asyncio.Event(), asyncio.Event()
    urls: list[str] = []
    server = asyncio.create_task(
        run_server(
            swarm_client(swarm[0].url),
            client.serve.ServeConfig(port=0),
            ready=lambda url: (urls.append(url), ready.set()),
            stop=stop,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 120)
        url = urls[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/models") as response:
                model = (await response.json())["data"][0]["id"]
            async with http.post(
                f"{url}/v1/completions", json={"model": model, "prompt": "One, two,", "max_tokens": 3}
            ) as response:
                assert response.status == 200, await response.text()
                usage = (await response.json())["usage"]
        samples = await scrape(url)
        assert value(samples, "layerswarm_api_requests_total", endpoint="/v1/completions", status="200") == 1
        assert value(samples, "layerswarm_api_request_seconds_count", endpoint="/v1/completions") == 1
        assert value(samples, "layerswarm_api_prompt_tokens_total") == usage["prompt_tokens"]
        assert value(samples, "layerswarm_api_completion_tokens_total") == usage["completion_tokens"]
        assert value(samples, "layerswarm_api_time_to_first_token_seconds_count") == 1
        assert value(samples, "layerswarm_api_inter_token_seconds_count") <= usage["completion_tokens"]
        assert value(samples, "layerswarm_api_generations_running") == 0
    finally:
        stop.set()
        await server
