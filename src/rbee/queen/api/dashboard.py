"""The dashboard: a static page shipped in the package, fed by the queen's live stream.

The page and its files are public (they hold no data); every call the page makes for data needs
the cluster token when one is set, which the page asks for. A strict Content-Security-Policy
keeps the page to its own files and its own queen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbee.queen.history import History
from rbee.queen.state import get_state

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", headers=SECURITY_HEADERS)


@router.get("/v1/dashboard/history")
async def history(request: Request) -> dict[str, Any]:
    """The last hour of figures, one sample per `--history-interval`, oldest first: what the
    page's charts start from, so a reload loses nothing."""
    get_state(request)  # only a queen's app has this route
    kept: History = request.app.state.history
    return kept.view()


class _Hardened:
    """Adds the page's security headers to every static file."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """The page, its files, and the history its charts read (sampled by `history_loop`)."""
    app.state.history = History(get_settings_interval(app))
    app.include_router(router)
    app.mount("/dashboard", _Hardened(StaticFiles(directory=DASHBOARD_DIR)), name="dashboard")


def get_settings_interval(app: FastAPI) -> float:
    interval: float = app.state.queen.settings.history_interval
    return interval
