"""The TCP options of `rbee.common.net` on a real link: a peer that is slow but alive keeps its
connection for as long as it takes; a peer whose cable is pulled is found dead in seconds."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from rbee.common.net import DEAD_PEER_S, dead_peer_options
from rbee_testing import netns

pytestmark = pytest.mark.e2e

if (reason := netns.unavailable_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)

PORT = 18500
SILENCE_S = 2 * DEAD_PEER_S  # longer than the dead-peer bound: only probes keep it alive

# A server that reads a request, says nothing for a while, then answers: a busy worker working
# through a long prompt.
SLOW_SERVER = f"""
import http.server, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep({SILENCE_S})
        self.send_response(200)
        self.send_header("content-length", "4")
        self.end_headers()
        self.wfile.write(b"done")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", {PORT}), Slow).serve_forever()
"""


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.Lan(["box"]) as lan:
        lan.popen("box", [sys.executable, "-c", SLOW_SERVER], stdout=subprocess.DEVNULL)
        url = f"http://{lan.address('box')}:{PORT}/"
        deadline = time.monotonic() + 30  # a Python server may take seconds to start here
        while True:
            try:
                httpx.head(url, timeout=0.5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"nothing answered at {url}"
                time.sleep(0.1)
        yield lan


def client() -> httpx.Client:
    # The queen's own read timeout for workers is 600 s; only TCP may end the wait sooner.
    transport = httpx.HTTPTransport(socket_options=dead_peer_options())
    return httpx.Client(transport=transport, timeout=httpx.Timeout(5, read=600))


def test_a_slow_peer_that_is_alive_is_waited_for(lan: netns.Lan) -> None:
    started = time.monotonic()
    with client() as http:
        response = http.get(f"http://{lan.address('box')}:{PORT}/")
    assert response.text == "done"
    assert time.monotonic() - started >= SILENCE_S


def test_a_peer_whose_cable_is_pulled_is_found_dead_within_seconds(lan: netns.Lan) -> None:
    with client() as http:
        url = f"http://{lan.address('box')}:{PORT}/"
        request = http.build_request("GET", url)
        cut = threading.Timer(1.0, lan.cut, args=("box",))
        cut.start()
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            http.send(request)
        took = time.monotonic() - started
        cut.join()
    # 1 s until the cut, then about DEAD_PEER_S; without the options it would be 600 s.
    assert took < 1.0 + DEAD_PEER_S + 5, f"the dead peer was noticed only after {took:.1f}s"
    print(f"dead peer noticed {took - 1.0:.1f}s after the cable was pulled")
