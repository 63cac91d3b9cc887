"""Errors as clients see them: one OpenAI-shaped body, one way to quote an exception.

Owns: :class:`ApiError` (status, message, param, code, extra headers such as
``Retry-After``), :func:`error_body` (``{"error": {message, type, param, code}}``, the
shape the ``openai`` SDK parses), :func:`public_reason` (an exception's first line
without paths or URIs, cut short) and :func:`shorten` (a client's value as echoed
back). Used by the ingress, its middleware and the retriever app alike. Does not own:
deciding which status a failure gets (the code that raises).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from loraplex.errors import first_line

TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# URIs and absolute paths never go out in an error: they describe the deployment
_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered to the client: status, message, the offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


def public_reason(e: BaseException | str, limit: int = 300) -> str:
    """What a failure says, for a client: its first line with URIs and absolute paths
    replaced (they describe the deployment), at most ``limit`` characters."""
    text = e if isinstance(e, str) else first_line(e, 2000)
    return _PATH.sub("<path>", _URI.sub("<uri>", text))[:limit]


def shorten(value: Any, limit: int = 80) -> str:
    """A client's value as quoted back in an error or a log line: repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
