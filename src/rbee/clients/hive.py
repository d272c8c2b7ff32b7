"""A typed async client for one hive's HTTP API: devices, workers, the catalog and download jobs.

Used by the queen and the `rbee` CLI. Every failure is a `HiveError` (unreachable, or an error
status with the hive's message and code). Pass `transport=` to talk to an in-process app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote_plus

import httpx
from httpx_sse import EventSource
from pydantic import BaseModel

from rbee.clients.base import OwnedHttpClient
from rbee.contracts.errors import read_error
from rbee.contracts.hive_api import (
    Capabilities,
    CatalogList,
    CatalogModel,
    ModelDeleted,
    SpawnRequest,
    SpawnResponse,
    WorkerProcess,
    WorkerProcessList,
    WorkerStopped,
)
from rbee.contracts.jobs import JobCreated, JobEvent, JobInfo, ModelDownloadJob
from rbee.contracts.rpc import RpcServerInfo, RpcServerList, RpcServerRequest, RpcServerStopped

DEFAULT_HIVE_URL = "http://127.0.0.1:7835"


LEND_CONNECT_S = 10.0  # a hive that takes no connection in this long is out of reach


class HiveError(Exception):
    """Anything that went wrong talking to a hive; the message is meant for a person."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class HiveUnreachable(HiveError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no hive answers at {url}: {reason}", code="unreachable")


def _error(response: httpx.Response, body: bytes) -> HiveError:
    message, code = read_error(response.status_code, body)
    return HiveError(message, status=response.status_code, code=code)


class HiveClient(OwnedHttpClient):
    def __init__(
        self,
        base_url: str = DEFAULT_HIVE_URL,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        spawn_timeout: float = 330.0,
    ) -> None:
        super().__init__(base_url, token=token, transport=transport, timeout=timeout)
        self.spawn_timeout = spawn_timeout

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | None = None,
        wait_s: float | None = None,
        connect_s: float | None = None,
    ) -> httpx.Response:
        json_body = body.model_dump(mode="json", exclude_none=True) if body else None
        if json_body is None and method == "POST":
            json_body = {}  # every rbee daemon takes POSTs as application/json only
        timeout = httpx.USE_CLIENT_DEFAULT if wait_s is None else httpx.Timeout(wait_s)
        if wait_s is not None and connect_s is not None:
            timeout = httpx.Timeout(wait_s, connect=connect_s)
        try:
            response = await self._http.request(method, path, json=json_body, timeout=timeout)
        except httpx.ReadTimeout:
            raise HiveError(
                f"the hive at {self.base_url} did not answer {method} {path} in time",
                code="timeout",
            ) from None
        except httpx.TransportError as exc:
            raise HiveUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        if response.is_error:
            raise _error(response, response.content)
        return response

    async def health(self) -> dict[str, str]:
        data: dict[str, str] = (await self._request("GET", "/health")).json()
        return data

    async def capabilities(self) -> Capabilities:
        response = await self._request("GET", "/v1/capabilities")
        return Capabilities.model_validate_json(response.content)

    async def spawn(self, request: SpawnRequest) -> SpawnResponse:
        """Start a worker; returns once it is ready (the hive waits for its model to load)."""
        response = await self._request(
            "POST",
            "/v1/workers/spawn",
            body=request,
            # The hive answers once the model is loaded: wait as long as its deadline allows.
            wait_s=max(self.spawn_timeout, (request.load_timeout_s or 0) + 30),
        )
        return SpawnResponse.model_validate_json(response.content)

    async def workers(self) -> list[WorkerProcess]:
        response = await self._request("GET", "/v1/workers")
        return WorkerProcessList.model_validate_json(response.content).workers

    async def worker_log(self, worker_id: str, lines: int = 200) -> str:
        """The end of a worker's log, running or stopped."""
        response = await self._request("GET", f"/v1/workers/{worker_id}/log?lines={lines}")
        return response.text

    async def stop_worker(self, pid: int, worker_id: str | None = None) -> WorkerStopped:
        """Stop the worker process `pid`; with `worker_id`, only if it is that worker."""
        query = f"?worker_id={quote_plus(worker_id)}" if worker_id is not None else ""
        response = await self._request("POST", f"/v1/workers/{pid}/stop{query}", wait_s=60.0)
        return WorkerStopped.model_validate_json(response.content)

    async def start_rpc_server(self, request: RpcServerRequest) -> RpcServerInfo:
        """Lend devices to a split worker: an RPC server behind the hive's authenticated
        tunnel; returns once the tunnel listens (its `endpoint` goes to the worker)."""
        # A helper listed online whose cable was cut must not hold a request up for long.
        response = await self._request(
            "POST", "/v1/rpc-servers", body=request, wait_s=90.0, connect_s=LEND_CONNECT_S
        )
        return RpcServerInfo.model_validate_json(response.content)

    async def rpc_servers(self) -> list[RpcServerInfo]:
        response = await self._request("GET", "/v1/rpc-servers")
        return RpcServerList.model_validate_json(response.content).rpc_servers

    async def stop_rpc_server(self, key: str) -> RpcServerStopped:
        """Stop an RPC server by its pid or its id (`WORKER@HIVE`)."""
        response = await self._request("POST", f"/v1/rpc-servers/{key}/stop", wait_s=60.0)
        return RpcServerStopped.model_validate_json(response.content)

    async def models(self) -> list[CatalogModel]:
        response = await self._request("GET", "/v1/models")
        return CatalogList.model_validate_json(response.content).models

    async def delete_model(self, model_id: str) -> CatalogModel:
        response = await self._request("DELETE", f"/v1/models/{model_id}")
        return ModelDeleted.model_validate_json(response.content).deleted

    async def start_download(self, model: str) -> JobCreated:
        """Start downloading `org/repo:file.gguf`; follow it with `job_events`."""
        job = ModelDownloadJob(operation="model_download", model=model)
        response = await self._request("POST", "/v1/jobs", body=job)
        return JobCreated.model_validate_json(response.content)

    async def job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate_json(
            (await self._request("GET", f"/v1/jobs/{job_id}")).content
        )

    async def cancel_job(self, job_id: str) -> JobInfo:
        response = await self._request("DELETE", f"/v1/jobs/{job_id}")
        return JobInfo.model_validate_json(response.content)

    async def job_events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event of a job from its first, ending with its final `done` or `error` one."""
        timeout = httpx.Timeout(30.0, read=None)  # a download may be quiet for a while
        try:
            async with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/stream", timeout=timeout
            ) as response:
                if response.is_error:
                    raise _error(response, await response.aread())
                async for sse in EventSource(response).aiter_sse():
                    event = JobEvent.model_validate_json(sse.data)
                    yield event
                    if event.final:
                        return
        except httpx.TransportError as exc:
            raise HiveUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    async def download(self, model: str) -> CatalogModel:
        """Download a model and wait for it; raises `HiveError` if the job ends in error."""
        created = await self.start_download(model)
        async for event in self.job_events(created.job_id):
            if event.type == "done" and event.result is not None:
                return CatalogModel.model_validate(event.result)
            if event.type == "error":
                raise HiveError(event.message, code=event.code or "job_failed")
        raise HiveError(f"job {created.job_id} ended without a result", code="job_failed")
