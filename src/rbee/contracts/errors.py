"""Error bodies in OpenAI's shape, used on every rbee endpoint."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    """OpenAI's error object. Some codes add keys of their own, kept when one is read here:
    `insufficient_memory` has `needed_bytes` (the model's estimate) and `largest_free_bytes`
    (the most any one device could offer it)."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

    @classmethod
    def of(
        cls, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> ErrorBody:
        return cls(error=ErrorDetail(message=message, type=type_, code=code, param=param))


def read_error(status: int, body: bytes) -> tuple[str, str | None]:
    """(message, code) of an error answer from any rbee component, or from anything else."""
    message, code = f"HTTP {status}", None
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode(errors="replace").strip()[:300]
        return (text or message), None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        raw_code = error.get("code")
        code = str(raw_code) if raw_code is not None else None
    elif isinstance(data, dict) and "detail" in data:
        message = str(data["detail"])
    return message, code
