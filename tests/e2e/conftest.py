"""What every end-to-end test's daemons share."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # The test machine's cores are shared with the other suites running at the same time, and
    # llama.cpp's threads spinning while they wait starve each other there (stalls of seconds).
    # Workers the tests start, directly or through a hive, inherit this; a worker alone on its
    # cores, spinning, is what bench/worker_bench.py measures.
    os.environ.setdefault("RBEE_WORKER_WAIT_POLICY", "passive")
