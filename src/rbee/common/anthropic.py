"""Anthropic's error shape, for the Messages API paths (`/v1/messages...`) of queen and worker.

Anthropic's clients read `{"type": "error", "error": {"type": ..., "message": ...}}` and pick
their exception by status (401 AuthenticationError, 404 NotFoundError, 529 OverloadedError...);
the error's type is named by the status as Anthropic names it. rbee's own code (`code` of its
OpenAI-shaped errors) and `param` stay beside them, for programs that read them.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from rbee.common.errors import RbeeError

ANTHROPIC_PREFIX = "/v1/messages"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type(status), "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return {"type": "error", "error": error}


def error_response(exc: RbeeError) -> JSONResponse:
    body = error_body(exc.status_code, exc.message, exc.code, exc.param)
    body["error"].update(exc.fields)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def reshape(status: int, content: bytes) -> bytes:
    """An error answer in OpenAI's shape (rbee's, llama.cpp's) in Anthropic's; one already in
    Anthropic's, or not JSON at all, is given its message as is."""
    try:
        data = json.loads(content)
    except ValueError:
        return json.dumps(error_body(status, content.decode(errors="replace")[:500])).encode()
    if isinstance(data, dict) and data.get("type") == "error":
        return content
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = error.get("code")
        param = error.get("param")
        body = error_body(
            status,
            message,
            code if isinstance(code, str) else None,
            param if isinstance(param, str) else None,
        )
    else:
        body = error_body(status, str(error or data))
    return json.dumps(body).encode()


def sse_error(status: int, message: str) -> bytes:
    """An error event in a Messages stream, as Anthropic sends one mid-stream."""
    return f"event: error\ndata: {json.dumps(error_body(status, message))}\n\n".encode()
