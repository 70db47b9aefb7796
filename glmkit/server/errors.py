"""Errors of the HTTP API, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the server makes is an `APIError` raised where the problem is found; the app turns it
into a JSON response with its status. Bad input is always a 4xx that names the problem; a 500 means
a bug in the server, never a bad request.
"""

from __future__ import annotations

from typing import Any

# The `type` OpenAI gives each status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
