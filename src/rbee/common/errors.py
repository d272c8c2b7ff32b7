"""One exception type per failure the API reports, mapped to OpenAI-shaped JSON in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbee.contracts.errors import ErrorBody

# How much of a client's string an error message quotes: enough to recognise it, never a
# megabyte echoed back (or logged) because a client sent one.
QUOTE_LIMIT = 200
# A body can be wrong in thousands of places at once; the first few say what to fix.
MAX_FIELD_ERRORS = 20


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as `repr` shows it, cut to `limit` characters with a note of the full length."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


class RbeeError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        # The request field at fault, as OpenAI names it (`n`, `messages[1].content`).
        self.param = param
        # More about the error for programs to read, beside OpenAI's own keys (for example
        # `needed_bytes` of an insufficient_memory error).
        self.fields = dict(fields or {})

    def body(self) -> dict[str, Any]:
        body = ErrorBody.of(self.message, self.type, self.code, self.param).model_dump()
        body["error"].update(self.fields)
        return body


class BadRequest(RbeeError):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unsupported(BadRequest):
    """A request field this server understands but cannot honour: refused, never dropped."""

    code = "unsupported_parameter"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


class NotFound(RbeeError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(RbeeError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class TooManyRequests(RbeeError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after_s))})


class BadGateway(RbeeError):
    status_code = 502
    type = "server_error"
    code = "upstream_error"


class Unavailable(RbeeError):
    status_code = 503
    type = "server_error"
    code = "unavailable"


class InsufficientMemory(Unavailable):
    """No device has room for a model: `needed_bytes` is the model's estimate and
    `largest_free_bytes` the most any one device could offer it. `retry_after_s` None: it can
    never fit (bigger than any device, even an empty one), so no `Retry-After`."""

    code = "insufficient_memory"

    def __init__(
        self,
        message: str,
        *,
        needed_bytes: int,
        largest_free_bytes: int,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(
            message,
            headers={"Retry-After": str(max(1, retry_after_s))} if retry_after_s else None,
            fields={"needed_bytes": needed_bytes, "largest_free_bytes": largest_free_bytes},
        )
        self.needed_bytes = needed_bytes
        self.largest_free_bytes = largest_free_bytes
        self.retry_after_s = retry_after_s


def _cut(part: Any) -> Any:
    """A part of a field's location; a string can be a client's own key (an unknown field's
    name), cut like any quote."""
    if isinstance(part, str) and len(part) > QUOTE_LIMIT:
        return f"{part[:QUOTE_LIMIT]}…"
    return part


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": [_cut(part) for part in err.get("loc", ())],
            "msg": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()[:MAX_FIELD_ERRORS]
    ]


def _param(loc: list[Any]) -> str | None:
    """`["body", "messages", 0, "role"]` → `messages[0].role`, OpenAI's way of naming a field."""
    name = ""
    for part in loc[1:] if loc[:1] == ["body"] else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def _summary(errors: list[dict[str, Any]]) -> str:
    parts = [f"{_param(err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as `{"error": {"message", "type", "code", "param"}}`. A request that
    fails validation is a 400, as OpenAI answers it and its clients expect (FastAPI's own is a
    422), with `param` naming the first field at fault and `detail` listing them."""

    @app.exception_handler(RbeeError)
    async def _rbee(_: Request, exc: RbeeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        param = _param(errors[0]["loc"]) if errors else None
        body = ErrorBody.of(_summary(errors), "invalid_request_error", "validation_error", param)
        return JSONResponse({**body.model_dump(), "detail": errors}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server still logs the traceback.
        body = ErrorBody.of(
            f"internal error: {type(exc).__name__}", "server_error", "internal_error"
        )
        return JSONResponse(body.model_dump(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = ErrorBody.of(str(exc.detail), type_, code)
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)
