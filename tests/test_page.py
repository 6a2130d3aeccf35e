"""The web page of `swarm serve` in a real headless Chromium (Debian's, driven by Playwright)
against a real 3-node swarm: the map shows the three nodes and full coverage, the chat streams
an answer (after the page asked for the server's API key), a live route is drawn hop by hop,
and after one node is SIGKILLed the map shows the hole where its blocks were (its signed record
still lives in the bootstrap's table: only the server's probes can tell) and the chat a 503.

This test kills a node, so it starts its own swarm. Chromium missing: skipped, unless CI=true
(then it fails: README's test command installs it). It saves a screenshot of the final page in
its tmp folder; `LAYERSWARM_SCREENSHOT=path` also saves one while an answer streams (how
client/web/screenshot.png was made)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from client.serve import ServeConfig, run_server
from tests.nodes import start_nodes, stop_nodes, swarm_client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_KEY = "s3cret"
WAIT_MS = 30_000  # generous: 2 shared cores, four node processes, a browser


def need_chromium() -> None:
    missing = not os.path.exists(CHROMIUM)
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing = True
    if missing:
        reason = "Debian's chromium and Playwright for Python are needed (apt-get install chromium; pip install '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def swarm(tmp_path: Path):
    """Three nodes; the first is also the bootstrap peer (one process fewer to start on 2 cores)."""
    need_chromium()  # before starting anything
    period = ["--gossip-period", "0.5"]
    (first,) = start_nodes([["--blocks", "0:10", *period]], tmp_path / "first")
    nodes = [first, *start_nodes([["--blocks", span, "--bootstrap", first.url, *period] for span in ("10:20", "20:30")], tmp_path)]
    yield first, nodes
    stop_nodes(nodes)


@pytest.fixture
async def server(swarm):
    """`swarm serve` in this process (client/serve.py run_server) on a free port."""
    bootstrap, _ = swarm
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_server(swarm_client(bootstrap.url), ServeConfig(port=0, api_key=API_KEY, watch_period_s=0.5), ready.set_result, stop))
    yield await asyncio.wait_for(ready, 60)
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_chat_and_live_map_in_chromium(swarm, server, tmp_path: Path) -> None:
    need_chromium()
    from playwright.async_api import async_playwright, expect

    _, nodes = swarm
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(server)

            # the map: three nodes up, every block covered, no hole
            await expect(page.locator("#coverage")).to_have_text("30/30 blocks covered", timeout=WAIT_MS)
            for node in nodes:
                await expect(page.locator(f'[data-node="{node.peer_id}"]')).to_have_attribute("data-state", "up", timeout=WAIT_MS)
            await expect(page.locator("[data-node]")).to_have_count(3)
            await expect(page.locator("[data-hole]")).to_have_count(0)
            assert await page.locator(f'[data-node="{nodes[1].peer_id}"]').get_attribute("data-span") == "10-20"

            # the server has an API key: the page asks for it; a wrong one is refused and asked again
            await expect(page.locator("#api-key-box")).to_be_visible()
            await page.fill("#api-key", "wrong")
            await page.click("#api-key-save")
            await page.fill("#prompt", "Hi")
            await page.press("#prompt", "Enter")
            await expect(page.locator(".msg.error")).to_contain_text("401", timeout=WAIT_MS)
            await expect(page.locator("#api-key-box")).to_be_visible()
            await page.fill("#api-key", API_KEY)
            await page.click("#api-key-save")
            await page.click("#clear")

            # a long answer: its route shows on the map hop by hop while it runs; Stop ends it
            await page.fill("#max-tokens", "200")
            await page.fill("#prompt", "Count from 1 to 100, separated by commas.")
            await page.press("#prompt", "Enter")
            route = page.locator("[data-session] .hop")
            await expect(route).to_have_count(3, timeout=WAIT_MS)
            assert [await hop.get_attribute("data-peer") for hop in await route.all()] == [n.peer_id for n in nodes]
            if os.environ.get("LAYERSWARM_SCREENSHOT"):  # README's picture: the chat streaming, its route on the map
                await expect(page.locator(".msg.assistant")).to_contain_text("12,", timeout=WAIT_MS)
                await expect(page.locator("[data-session] .stats")).not_to_contain_text(" 1 tokens")
                await page.screenshot(path=os.environ["LAYERSWARM_SCREENSHOT"])
            await page.click("#stop")
            await expect(page.locator('.msg.assistant[data-finish="stopped"]')).to_have_count(1)
            await expect(page.locator("[data-session]")).to_have_count(0, timeout=WAIT_MS)  # the server closed it at once

            # the chat streams an answer through the swarm
            await page.fill("#max-tokens", "8")
            await page.fill("#prompt", "What is the capital of France?")
            await page.press("#prompt", "Enter")
            answer = page.locator('.msg.assistant[data-done="true"]').nth(1)
            await expect(answer).to_have_attribute("data-finish", re.compile("^(stop|length)$"), timeout=WAIT_MS)
            await expect(page.locator(".msg.error")).to_have_count(0)
            assert (await answer.text_content()).strip() not in ("", "…")
            await expect(page.locator(".msg.user").nth(1)).to_have_text("What is the capital of France?")
            # the steps of that answer were measured: some node shows a measured speed
            await expect(page.locator('[data-node] .measured:not(:has-text("–"))').first).to_be_visible(timeout=WAIT_MS)

            # a node dies without a goodbye: its blocks become a hole on the map
            nodes[1].kill()
            await expect(page.locator('[data-hole="10-20"]')).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator(f'[data-node="{nodes[1].peer_id}"]')).to_have_attribute("data-state", "down")
            await expect(page.locator("#coverage")).to_have_text("20/30 blocks covered")
            for node in (nodes[0], nodes[2]):
                await expect(page.locator(f'[data-node="{node.peer_id}"]')).to_have_attribute("data-state", "up")
            # and the chat says the swarm cannot serve now (503, OpenAI's error shape)
            await page.fill("#prompt", "Are you there?")
            await page.press("#prompt", "Enter")
            await expect(page.locator(".msg.error")).to_contain_text("503", timeout=WAIT_MS)

            shot = tmp_path / "page.png"
            await page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            await browser.close()

