"""A real llm-worker-rbee process whose engine costs nothing: for benchmarks of what sits in front.

    python -m rbee_testing.fake_worker --model fake --port PORT --queen-url URL [--slots 32]

It takes the worker's own flags and serves the worker's own app (heartbeats, slots, OpenAI
routes) with `FakeEngine` in place of llama.cpp, so the time a request takes is the HTTP path
alone. Product code never starts one.
"""

from __future__ import annotations

import sys

from rbee.common.serve import parse_settings, serve
from rbee.worker.app import create_app
from rbee.worker.settings import WorkerSettings
from rbee_testing.fake_engine import FakeEngine

PROG = "rbee-fake-worker"


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(WorkerSettings, PROG, argv)
    app = create_app(settings, engine_factory=FakeEngine)
    sys.exit(serve(app, prog=PROG, host=settings.host, port=settings.port))


if __name__ == "__main__":
    main()
