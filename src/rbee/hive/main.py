"""`rbee-hive`: the daemon's entry point."""

from __future__ import annotations

import logging
import sys

from rbee.common.serve import fail, parse_settings, serve
from rbee.common.tokens import refuse_open_bind
from rbee.hive.app import create_app
from rbee.hive.devices import limit_problem, memory_devices
from rbee.hive.settings import HiveSettings

PROG = "rbee-hive"


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(HiveSettings, PROG, argv)
    if reason := refuse_open_bind(settings.host, settings.token):
        fail(PROG, reason)
    try:
        settings.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(PROG, f"--models-dir {settings.models_dir}: {exc.strerror or exc}")
    if settings.memory_limit is not None and (
        reason := limit_problem(settings.memory_limit, memory_devices())
    ):
        fail(PROG, reason)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    sys.exit(
        serve(
            create_app(settings),
            prog=PROG,
            host=settings.host,
            port=settings.port,
            tls=settings.tls,
        )
    )
