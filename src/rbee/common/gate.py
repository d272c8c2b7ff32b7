"""The gate every request of every daemon passes first: a plain ASGI middleware (no
BaseHTTPMiddleware: it would copy each streamed chunk through an extra task and queue).

In order, it refuses:
- a `Host` that is not a loopback name or address, nor allowed by `--allowed-host`, when no
  cluster token is set (421): a DNS-rebinding page reaches 127.0.0.1 under its own name;
- a foreign `Origin` on anything but GET/HEAD, CORS preflights included (403): browsers send
  `Origin` on cross-site requests, and no CORS header is ever sent back;
- a caller without the credential the route's audience needs (401, or 403 for an API key
  outside inference). The credential comes as `Authorization: Bearer <secret>`, or, as
  Anthropic's clients send it, `x-api-key: <secret>`: the same secrets, the same roles;
- a POST/PUT/PATCH whose body is not `application/json` (415): a cross-site `text/plain`
  POST needs no preflight, so accepting it would let any web page drive the daemon.
Body size limits are FastAPI's own (`max_body_size`), set by each app factory. Refusals on
Anthropic's paths (`/v1/messages...`) are in Anthropic's error shape, others in OpenAI's.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee.common import anthropic
from rbee.common.access import UNDECIDED, Audience, Caller, decide, endpoints
from rbee.common.errors import RbeeError
from rbee.common.tokens import is_loopback
from rbee.contracts.errors import ErrorBody

SAFE_METHODS = frozenset({"GET", "HEAD"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS = {"http": 80, "https": 443}
API_KEY_SCOPE = "rbee.api_key"  # the scope entry naming the API key a request came with
_HOST_CACHE_MAX = 256


class KeysNotLoaded(Exception):
    """Raised by `KeyLookup.identify` before the store has been read: the gate then waits for
    `load` (a thread reads the disk) and checks the request again."""


class KeyLookup(Protocol):
    """What the gate needs from an API key store (the queen's). `identify` and
    `count_request` run on the event loop for every request: memory only."""

    def identify(self, secret: bytes) -> str | None:
        """The name of the live key with this secret, or None; KeysNotLoaded if not read yet."""
        ...

    def count_request(self, name: str) -> None: ...

    async def load(self) -> None:
        """Read the keys, off the event loop; raises an RbeeError when they cannot be read."""
        ...


def _split_host(value: str, default_port: int) -> tuple[str, int] | None:
    """`host[:port]` (IPv6 in brackets) → (lower-case host, port); None if malformed."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return None


def _refusal(status: int, message: str, type_: str, code: str) -> tuple[int, bytes]:
    return status, json.dumps(ErrorBody.of(message, type_, code).model_dump()).encode()


def _anthropic_refusal(status: int, message: str, type_: str, code: str) -> tuple[int, bytes]:
    return status, json.dumps(anthropic.error_body(status, message, code)).encode()


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes_of: FastAPI,
        table: Mapping[str, Audience],
        token: str | None,
        allowed_hosts: Iterable[str] = (),
        keys: KeyLookup | None = None,
    ) -> None:
        self.app = app
        self._routes_of = routes_of
        self._table = table
        self._token = token.encode() if token else None
        self._allowed = frozenset(h.lower().strip("[]") for h in allowed_hosts)
        self._keys = keys
        self._hosts_ok: dict[bytes, bool] = {}
        self._static: dict[str, Audience] | None = None  # "METHOD /path" of routes without params
        self._dynamic: list[tuple[re.Pattern[str], str, Audience]] = []

    # -- the route's audience ------------------------------------------------------------

    def _index(self) -> dict[str, Audience]:
        # Built at the first request, so routes added after the middleware count too.
        static: dict[str, Audience] = {}
        for endpoint in endpoints(self._routes_of):
            audience = self._table.get(endpoint.key, UNDECIDED)
            if endpoint.regex is None:
                static.setdefault(endpoint.key, audience)
            else:
                self._dynamic.append((endpoint.regex, endpoint.method, audience))
        self._static = static
        return static

    def audience(self, method: str, path: str) -> Audience:
        static = self._static if self._static is not None else self._index()
        method = "GET" if method == "HEAD" else method
        found = static.get(f"{method} {path}")
        if found is not None:
            return found
        for regex, route_method, audience in self._dynamic:
            if route_method == method and regex.match(path):
                return audience
        return UNDECIDED

    # -- the checks ----------------------------------------------------------------------

    def _host_ok(self, host: bytes | None) -> bool:
        if host is None:
            return False
        known = self._hosts_ok.get(host)
        if known is None:
            split = _split_host(host.decode("latin-1"), 0)
            known = split is not None and (is_loopback(split[0]) or split[0] in self._allowed)
            if len(self._hosts_ok) >= _HOST_CACHE_MAX:
                self._hosts_ok.clear()  # many distinct Host values: someone is probing
            self._hosts_ok[host] = known
        return known

    @staticmethod
    def _same_origin(origin: bytes, host: bytes | None, scheme: str) -> bool:
        if host is None:
            return False
        try:
            parts = urlsplit(origin.decode("latin-1"))
            origin_host = (parts.hostname or "").lower()
            origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
        except ValueError:
            return False  # "null" and garbage are foreign
        served = _split_host(host.decode("latin-1"), DEFAULT_PORTS.get(scheme, 0))
        return parts.scheme == scheme and served == (origin_host, origin_port)

    def _identify(
        self, authorization: bytes | None, api_key: bytes | None = None
    ) -> tuple[Caller, str | None]:
        if self._token is None:
            return Caller.NOBODY, None
        if authorization is not None:
            scheme, _, given = authorization.partition(b" ")
            if scheme.lower() != b"bearer":
                return Caller.NOBODY, None
        elif api_key is not None:
            given = api_key  # Anthropic's header
        else:
            return Caller.NOBODY, None
        given = given.strip()
        if secrets.compare_digest(given, self._token):
            return Caller.CLUSTER, None
        if self._keys is not None and (name := self._keys.identify(given)) is not None:
            return Caller.API_KEY, name
        return Caller.NOBODY, None

    def check(self, scope: Scope) -> tuple[int, bytes] | None:
        """The refusal for this request (status, JSON body), or None to let it through."""
        host = origin = content_type = authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
        method: str = scope["method"]
        refusal = _refusal
        if anthropic.is_anthropic_path(scope["path"]):
            refusal = _anthropic_refusal
        if self._token is None and not self._host_ok(host):
            shown = host.decode("latin-1") if host else "(none)"
            return refusal(
                421,
                f"Host {shown!r} is not served here: without a cluster token this daemon "
                "answers only to loopback names (add others with --allowed-host)",
                "invalid_request_error",
                "host_not_allowed",
            )
        if (
            origin is not None
            and method not in SAFE_METHODS
            and not self._same_origin(origin, host, scope.get("scheme", "http"))
        ):
            return refusal(
                403,
                f"requests from the web origin {origin.decode('latin-1')!r} are refused",
                "permission_error",
                "foreign_origin",
            )
        caller, key = self._identify(authorization, api_key)
        audience = self.audience(method, scope["path"])
        status = decide(audience, caller, token_set=self._token is not None)
        if status == 401:
            return refusal(
                401,
                "missing or wrong bearer token or API key (set RBEE_TOKEN, or use a key "
                "from `rbee key create`, as `Authorization: Bearer` or `x-api-key`)",
                "authentication_error",
                "invalid_token",
            )
        if status == 403:
            return refusal(
                403,
                "an API key may only run inference (chat, completions, embeddings, models); "
                "this needs the cluster token",
                "permission_error",
                "forbidden_for_api_key",
            )
        if method in BODY_METHODS:
            media = (content_type or b"").partition(b";")[0].strip().lower()
            if media != b"application/json":
                return refusal(
                    415,
                    f"{method} needs Content-Type: application/json",
                    "invalid_request_error",
                    "unsupported_media_type",
                )
        if key is not None and self._keys is not None:
            self._keys.count_request(key)
            scope[API_KEY_SCOPE] = key
        return None

    async def _load_keys(self, scope_path: str = "") -> tuple[int, bytes] | None:
        """Once per process, at the first request with an API key: read the store in a thread
        (never the disk on the event loop). A store that cannot be read is that request's 503."""
        assert self._keys is not None
        try:
            await self._keys.load()
        except RbeeError as exc:
            if anthropic.is_anthropic_path(scope_path):
                body = anthropic.error_body(exc.status_code, exc.message, exc.code)
                return exc.status_code, json.dumps(body).encode()
            return exc.status_code, json.dumps(exc.body()).encode()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            refusal = self.check(scope)
        except KeysNotLoaded:
            refusal = await self._load_keys(scope["path"])
            if refusal is None:
                refusal = self.check(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, body = refusal
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install_gate(
    app: FastAPI,
    table: Mapping[str, Audience],
    *,
    token: str | None,
    allowed_hosts: Iterable[str] = (),
    keys: KeyLookup | None = None,
) -> None:
    app.add_middleware(
        Gate,
        routes_of=app,
        table=table,
        token=token,
        allowed_hosts=tuple(allowed_hosts),
        keys=keys,
    )
