"""The dashboard a newcomer opens (issue 27, item 7), in a real headless Chromium against a real
queen, hive and SmolLM2 worker: charts of the last hour that a reload keeps, each worker's
fields and log, the playground streaming an answer, and load/unload with the cluster token."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

from .conftest import ARTIFACTS, Cluster, start_cluster
from .test_dashboard import browser, wait_until

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the module-scoped Chromium, shared with the other dashboard tests

TOKEN = "dashboard-hour-token"
DOCS = Path(__file__).resolve().parents[3] / "docs"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A token-protected cluster sampling its history every second, with one SmolLM2 worker."""
    flags = ["--summary-interval", "1", "--stats-interval", "0.5", "--history-interval", "1"]
    for cluster in start_cluster(tmp_path_factory.mktemp("hour"), *flags, token=TOKEN):
        cluster.spawn_worker()
        yield cluster


def open_board(page: Any, cluster: Cluster) -> None:
    page.goto(cluster.queen_url)
    page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    page.fill("#token", TOKEN)
    page.click("#login button")
    page.wait_for_selector("body[data-queen='live']", timeout=10_000)


def test_an_hour_of_charts_workers_playground_and_actions(browser: Any, served: Cluster) -> None:
    cluster = served
    [worker] = cluster.workers()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    open_board(page, cluster)

    # A worker's row: its model, context, slots, memory (from its hive), tokens/s.
    row = f'tr[data-worker-id="{worker["id"]}"]'
    page.wait_for_selector(f'{row} td.status[data-status="ready"]', timeout=15_000)
    wait_until(page, f"document.querySelector('{row} td.memory').textContent.includes('MiB')", 15)
    assert page.inner_text(f"{row} td.model") == DEFAULT_MODEL
    assert page.inner_text(f"{row} td.ctx") == f"{worker['ctx_size']:,} tokens"
    assert page.inner_text(f"{row} td.load") == f"0 / {worker['slots']} slots"

    # The tail of its log, read through the queen from its hive.
    page.click(f'{row} button[data-action="log"]')
    log_cell = f'tr[data-log-of="{worker["id"]}"] pre.log'
    wait_until(page, f"document.querySelector('{log_cell}')?.textContent.includes('llama')", 15)

    # Traffic before the reload, so the last hour has something to keep.
    with cluster.client() as client:
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Count from one to ten."}],
            "max_tokens": 32,
            "stream": True,
        }
        client.post("/v1/chat/completions", json=body).raise_for_status()
    wait_until(page, "cluster.history?.samples.some(s => s.tokens_per_s > 0)", 20, every_s=0.3)

    # A reload keeps the charts: they come back from the queen, not from the page's memory.
    page.reload()
    page.wait_for_selector("body[data-queen='live']", timeout=10_000)
    wait_until(page, "cluster.history !== null", 10)
    assert page.evaluate("cluster.history.samples.some(s => s.tokens_per_s > 0)")
    points = page.get_attribute("#hist-tokens_per_s svg", "data-points")
    assert points is not None
    assert int(points) > 1
    assert page.locator("#hist-tokens_per_s svg polyline").count() >= 1
    assert page.locator("#hist-memory svg polyline").count() >= 1
    assert cluster.hive_id in page.inner_text("#hist-memory")

    # Unload and load with the token the page holds: the queen's jobs do it, the page shows it.
    model_row = f'tr[data-model-id="{DEFAULT_MODEL}"]'
    page.click(f'{model_row} button[data-action="unload"]')
    page.wait_for_selector(".job[data-operation='model_unload'][data-state='done']", timeout=60_000)
    page.wait_for_selector(f'{row} td.status[data-status="stopped"]', timeout=30_000)
    assert cluster.workers() == []
    page.click(f'{model_row} button[data-action="load"]')
    page.wait_for_selector(".job[data-operation='model_load'][data-state='done']", timeout=120_000)
    deadline = time.monotonic() + 30
    while not [w for w in cluster.workers() if w["status"] == "ready"]:
        assert time.monotonic() < deadline, "no worker after load"
        time.sleep(0.2)
    [loaded] = cluster.workers()
    page.wait_for_selector(
        f'tr[data-worker-id="{loaded["id"]}"] td.status[data-status="ready"]', timeout=15_000
    )
    # The playground streams an answer from the model just loaded, piece by piece, then says
    # how fast it was.
    page.select_option("#chat-model", DEFAULT_MODEL)
    page.fill("#chat-system", DEFAULT_SYSTEM_PROMPT)
    page.evaluate(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('chat-log'), {subtree: true, childList: true,"
        " characterData: true})"
    )
    page.fill("#chat-max", "24")
    page.fill("#chat-temp", "0")
    page.fill("#chat-prompt", "What is the capital of France?")
    page.click("#chat-send")
    page.wait_for_selector(".msg-assistant[data-state='done']", timeout=60_000)
    answer = page.inner_text(".msg-assistant .text")
    assert answer.strip(), "the playground showed no answer"
    assert "tokens/s" in page.inner_text("#chat-stats")
    assert page.evaluate("window.updates") > 3, "the answer came in one piece, not streamed"

    page.wait_for_timeout(1500)  # one more history sample, for the screenshot
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-actions.png"), full_page=True)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)
    context.close()


def test_actions_need_the_token(browser: Any, served: Cluster) -> None:
    """A page with a wrong token gets no data and can run no job."""
    page = browser.new_page()
    page.goto(served.queen_url)
    page.evaluate("sessionStorage.setItem('rbee.token', 'not-the-token')")
    page.reload()
    page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    status = page.evaluate(
        "fetch('/v1/jobs', {method: 'POST', headers: {'Content-Type': 'application/json',"
        " Authorization: 'Bearer not-the-token'}, body: JSON.stringify({operation:"
        " 'model_unload', model: 'x'})}).then(r => r.status)"
    )
    assert status == 401
    history = page.evaluate(
        "fetch('/v1/dashboard/history', {headers: {Authorization: 'Bearer not-the-token'}})"
        ".then(r => r.status)"
    )
    assert history == 401
    page.close()
