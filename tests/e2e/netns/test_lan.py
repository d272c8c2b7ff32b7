"""The test LAN itself: machines reach each other, a cut cable cuts, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from rbee_testing import netns
from rbee_testing.processes import free_port

pytestmark = pytest.mark.e2e

reason = netns.unavailable_reason()
if reason is not None:
    pytest.skip(reason, allow_module_level=True)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def serve(lan: netns.Lan, host: str, port: int) -> str:
    url = f"http://{lan.address(host)}:{port}/"
    lan.popen(
        host,
        [sys.executable, "-m", "http.server", "--bind", lan.address(host), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # A Python server may take seconds to start on a busy machine.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered at {url}")


def test_machines_reach_each_other_and_a_cut_cable_cuts() -> None:
    port = free_port()
    with netns.Lan(["a", "b"]) as lan:
        assert lan.address("a") != lan.address("b") != lan.gateway
        url = serve(lan, "a", port)
        assert httpx.get(url, timeout=3).status_code == 200
        fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=3).status)"
        assert lan.run("b", [sys.executable, "-c", fetch]).stdout.strip() == "200"

        lan.cut("a")
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=1.5)
        lan.restore("a")
        assert httpx.get(url, timeout=5).status_code == 200
        prefix = lan.prefix
        assert f"{prefix}-a" in namespaces()
    assert f"{prefix}-" not in namespaces()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"{prefix}gw" not in links


def test_everything_is_removed_when_a_test_fails_inside() -> None:
    made: dict[str, object] = {}

    def failing_test() -> None:
        with netns.Lan(["a"]) as lan:
            made["proc"] = lan.popen("a", ["sleep", "600"])
            made["prefix"] = lan.prefix
            raise RuntimeError("a failing test")

    with pytest.raises(RuntimeError):
        failing_test()
    proc, prefix = made["proc"], made["prefix"]
    assert isinstance(proc, subprocess.Popen)
    assert proc.poll() is not None
    assert f"{prefix}-" not in namespaces()
