"""What every typed client of ours shares: one owned `httpx.AsyncClient`, closed with it."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

from rbee.common.tokens import auth_headers


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
            transport=transport,
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
