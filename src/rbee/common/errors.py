"""One exception type per failure the API reports, mapped to OpenAI-shaped JSON in one place."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbee.contracts.errors import ErrorBody


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
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        # The request field at fault, as OpenAI names it (`n`, `messages[1].content`).
        self.param = param

    def body(self) -> dict[str, Any]:
        return ErrorBody.of(self.message, self.type, self.code, self.param).model_dump()


class BadRequest(RbeeError):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unsupported(BadRequest):
    """A request field this server understands but cannot honour: refused, never dropped."""

    code = "unsupported_parameter"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


class Unauthorized(RbeeError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_token"


class Forbidden(RbeeError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


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


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
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
    """Every error leaves as `{"error": {"message", "type", "code"}}`; validation adds `detail`."""

    @app.exception_handler(RbeeError)
    async def _rbee(_: Request, exc: RbeeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        param = _param(errors[0]["loc"]) if errors else None
        body = ErrorBody.of(_summary(errors), "invalid_request_error", "validation_error", param)
        return JSONResponse({**body.model_dump(), "detail": errors}, status_code=422)

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
