"""What every typed client of ours shares: one owned `httpx.AsyncClient`, closed with it."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

from rbee.common.net import dead_peer_options
from rbee.common.tokens import auth_headers


def dead_peer_transport() -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections notice a vanished peer within seconds
    (see `rbee.common.net`); every client of a remote rbee daemon should use one."""
    return httpx.AsyncHTTPTransport(socket_options=dead_peer_options())


class OwnedHttpClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        transport: httpx.AsyncBaseTransport | None,
        timeout: httpx.Timeout | float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=auth_headers(token),
            transport=transport or dead_peer_transport(),
            timeout=timeout,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
