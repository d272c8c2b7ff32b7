"""Error bodies in OpenAI's shape, used on every rbee endpoint."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

    @classmethod
    def of(cls, message: str, type_: str, code: str | None = None) -> ErrorBody:
        return cls(error=ErrorDetail(message=message, type=type_, code=code))
