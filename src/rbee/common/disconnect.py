"""Stop work for a client that left: uvicorn does not cancel a handler when its client goes.

Once a request's body has been read, the ASGI `receive` channel only ever yields
`http.disconnect`, so waiting on it costs nothing and answers at once when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")

# nginx's code for "client closed request"; nobody reads it, it only marks the access log.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before the work was done; the work was cancelled."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T:
    """The result of `work`, which is cancelled (raising `ClientGone`) if the client leaves
    first. Call only after the request body has been read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        # Let the work run its own clean-up (freeing its slot) before going on.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()
