from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.clock import FakeClock

ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_client(clock: FakeClock) -> AsyncIterator[ClientFactory]:
    clients: list[httpx.AsyncClient] = []

    def make(**overrides: object) -> httpx.AsyncClient:
        settings = QueenSettings.model_validate({"heartbeat_timeout": 90, **overrides})
        app = create_app(settings, clock=clock)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9"
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def queen(make_client: ClientFactory) -> httpx.AsyncClient:
    return make_client()
