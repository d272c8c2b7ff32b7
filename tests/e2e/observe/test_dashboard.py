"""The dashboard in a real headless Chromium, driven by Playwright, against real daemons."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee.hive import rpc
from rbee_testing import netns
from rbee_testing.lan_cluster import LanCluster
from rbee_testing.processes import ServerProcess, console_script, free_port

from .conftest import ARTIFACTS, Cluster, start_cluster

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "dashboard-e2e-token"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian: chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def empty_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A token-protected queen and hive, and no worker yet."""
    flags = ["--summary-interval", "2", "--stats-interval", "0.5"]
    yield from start_cluster(tmp_path_factory.mktemp("dashboard"), *flags, token=TOKEN)


def wait_until(page: Any, expression: str, timeout_s: float, every_s: float = 0.02) -> None:
    """Poll a JavaScript expression. Playwright's wait_for_function compiles its predicate with
    eval, which the page's Content-Security-Policy rightly forbids; evaluate() is not eval."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true within {timeout_s}s: {expression}"
        time.sleep(every_s)


def test_live_workers_with_a_token(browser: Any, empty_cluster: Cluster) -> None:
    cluster = empty_cluster
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(cluster.queen_url)
    # With a token set, the page asks for it; a wrong one is refused and asked for again.
    page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    page.fill("#token", "wrong-token")
    page.click("#login button")
    page.wait_for_selector("#login-error:not([hidden])", timeout=10_000)
    assert "refused" in page.inner_text("#login-error")
    page.fill("#token", TOKEN)
    page.click("#login button")
    page.wait_for_selector(f'tr[data-hive-id="{cluster.hive_id}"]', timeout=10_000)
    assert page.is_visible("#board")
    assert "cpu:0" in page.inner_text(f'tr[data-hive-id="{cluster.hive_id}"]')
    # Kept for this tab's session only: never in the URL, never in a cookie.
    assert page.evaluate("sessionStorage.getItem('rbee.token')") == TOKEN
    assert TOKEN not in page.url
    assert context.cookies() == []

    # A worker spawned after the page loaded shows up, with no reload.
    spawned = cluster.spawn_worker()
    worker_id = spawned["worker_id"]
    page.wait_for_selector(
        f'tr[data-worker-id="{worker_id}"] td.status[data-status="ready"]', timeout=10_000
    )
    row = page.inner_text(f'tr[data-worker-id="{worker_id}"]')
    assert f"127.0.0.1:{spawned['port']}" in row
    assert f"0 / {cluster.workers()[0]['slots']} slots" in row
    page.wait_for_selector('tr[data-model-id] td.status[data-status="loaded"]', timeout=10_000)

    # Traffic moves the live figures.
    with cluster.client() as client:
        for _ in range(3):
            body = {
                "model": cluster.workers()[0]["model_id"],
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 16,
                "stream": True,
            }
            client.post("/v1/chat/completions", json=body).raise_for_status()
    wait_until(
        page,
        "cluster.series.requests_per_s.some(v => v > 0)"
        " && cluster.series.tokens_per_s.some(v => v > 0)",
        timeout_s=10,
    )
    page.wait_for_timeout(600)  # one more stats event, so the charts have a shape
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # Stopping the worker changes its status on the page within a second of the queen knowing.
    stopper = threading.Thread(target=cluster.stop_worker, args=(worker_id,))
    stopper.start()
    try:
        with cluster.client(10) as client:
            deadline = time.monotonic() + 30
            while True:
                response = client.get(f"/v1/workers/{worker_id}")
                if response.status_code == 404 or response.json()["status"] != "ready":
                    break
                assert time.monotonic() < deadline, "the worker never left ready"
                time.sleep(0.02)
        queen_knew = time.monotonic()
        cell = f"document.querySelector('tr[data-worker-id=\"{worker_id}\"] td.status')"
        wait_until(page, f"['stopping', 'stopped'].includes({cell}?.dataset.status)", 1.0)
        assert time.monotonic() - queen_knew < 1.0
    finally:
        stopper.join(60)
    page.wait_for_selector(
        f'tr[data-worker-id="{worker_id}"] td.status[data-status="stopped"]', timeout=10_000
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-stopped.png"), full_page=True)
    context.close()


def test_without_a_token_it_opens_at_once_and_shows_a_lost_queen(
    browser: Any, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("queen-rbee"), "--port", str(port)]
    page = browser.new_page()
    with ServerProcess(args, health_url=f"{url}/health") as queen:
        page.goto(url)
        page.wait_for_selector("body[data-queen='live']", timeout=10_000)
        assert page.is_hidden("#login")
        assert page.is_visible("#board")
        assert page.is_hidden("#unreachable")
        queen.stop()
        page.wait_for_selector("#unreachable:not([hidden])", timeout=5_000)
        assert "unreachable" in page.inner_text("#unreachable")
        page.screenshot(path=str(ARTIFACTS / "dashboard-unreachable.png"))
    with ServerProcess(args, health_url=f"{url}/health"):
        page.wait_for_selector("body[data-queen='live']", timeout=15_000)
        assert page.is_hidden("#unreachable")
    page.close()


def test_page_is_public_and_locked_down(empty_cluster: Cluster) -> None:
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
        response = httpx.get(f"{empty_cluster.queen_url}{path}", timeout=10)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    missing = httpx.get(f"{empty_cluster.queen_url}/dashboard/nope.js", timeout=10)
    assert missing.status_code == 404


def test_a_split_worker_shows_its_hives_and_what_each_part_holds(
    browser: Any, tmp_path: Path
) -> None:
    if (reason := netns.unavailable_reason()) is not None:
        pytest.skip(reason)
    if not Path(rpc.default_rpc_server()).is_absolute():
        pytest.skip("no ggml-rpc-server next to llama-server (run ./dev)")
    # Two machines whose memory limits each hold too little of SmolLM2, together enough (as in
    # tests/e2e/multihost/test_split.py): the model is split over both.
    with netns.Lan(["queen", "box1", "box2"]) as lan:
        cluster = LanCluster(lan, tmp_path)
        cluster.start_queen("--split-across-hives", "--ctx-size", "2048", "--slots", "1")
        for box in ("box1", "box2"):
            cluster.start_hive(box, 1.0, "--memory-limit", "230MiB")
        loaded = cluster.run_job({"operation": "model_load", "model": DEFAULT_MODEL}, 600)
        assert loaded["type"] == "done", loaded
        (worker,) = cluster.workers()
        hives = list(dict.fromkeys(p["hive_id"] for p in worker["parts"]))
        assert len(hives) == 2

        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.goto(cluster.queen_url)
        page.wait_for_selector("#login:not([hidden])", timeout=10_000)
        page.fill("#token", cluster.token)
        page.click("#login button")
        cell = f'tr[data-worker-id="{worker["id"]}"] td.hive.split'
        page.wait_for_selector(cell, timeout=15_000)
        shown = page.inner_text(cell)
        # One worker, its main hive first, then the hive lending it memory, with each part.
        assert page.get_attribute(cell, "data-split") == "+".join(hives)
        assert " + ".join(hives) in shown
        for part in worker["parts"]:
            mib = int(part["bytes"] / 2**20 + 0.5)
            assert f"{part['hive_id']} {part['device']} {mib} MiB" in shown, shown
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-split.png"), full_page=True)
        page.close()
