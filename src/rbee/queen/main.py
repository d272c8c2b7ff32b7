"""`queen-rbee`: the daemon's entry point."""

from __future__ import annotations

import sys

from rbee.common.serve import fail, parse_settings, serve
from rbee.common.tokens import refuse_open_bind
from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings

PROG = "queen-rbee"


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(QueenSettings, PROG, argv)
    if reason := refuse_open_bind(settings.host, settings.token):
        fail(PROG, reason)
    sys.exit(
        serve(
            create_app(settings),
            prog=PROG,
            host=settings.host,
            port=settings.port,
            tls=settings.tls,
        )
    )
