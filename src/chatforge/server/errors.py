"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through :class:`APIError`, so clients
(the ``openai`` package included) see the same shape and the right status:
4xx for what the client can fix, 429/503 with ``Retry-After`` for "not now",
5xx only for our own faults.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# The ``type`` OpenAI uses for each status we produce.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error response: status, message, and OpenAI's ``type``/``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"`` (OpenAI's spelling)."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[str]", "function-after[_check(), str]"):
            continue  # pydantic names the union member it tried; not a field
        else:
            out += ("." if out else "") + str(p)
    return out or None


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming its parameter."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    param = param_from_loc(err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        message = f"missing required parameter: {param!r}"
    elif err.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif msg.startswith("Value error, "):
        message = msg[len("Value error, ") :]
    else:
        got = err.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        message = f"invalid value for {param!r}: {msg} (got {shown})"
    return APIError(400, message, param=param)


def install(app: Any) -> None:
    """Route every error the app can raise into OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "no such route; see GET /v1/models, POST /v1/chat/completions"
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # our fault: say so
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
