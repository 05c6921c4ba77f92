"""The service's one error hierarchy and the one place where errors become HTTP responses.

Every failure ends up as `{"error": {"type", "message", "field"?}}` with a status code chosen here:

- bad input (engine `InvalidInput`, our own checks, pydantic/FastAPI validation): 422, naming the field
  as a path such as `refs[0].image` or `n`;
- too much work (engine `Overloaded`, Ray Serve back-pressure, no replica available): 503 with `Retry-After`;
- a deadline passed: 504;
- anything else: 500 with a request id and nothing about the internals (the traceback goes to the log).

`ServiceError`s pickle by value, so a generator or scorer replica can raise one and the router re-raises
it unchanged (the engine's own exceptions are converted with `classify` before they cross a process).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

from hidream_serve.engine.errors import CheckpointError, EngineError, InvalidInput, Overloaded

log = logging.getLogger("hidream_serve.api")

DEFAULT_RETRY_AFTER_S = 5.0


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, field: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.field, self.retry_after_s))

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BadRequest(ServiceError):
    status = 422
    type = "invalid_input"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "payload_too_large"


class Unavailable(ServiceError):
    """Overloaded or not (yet) able to serve: the client should retry later."""

    status = 503
    type = "unavailable"

    def __init__(self, message: str, field: str | None = None, retry_after_s: float | None = DEFAULT_RETRY_AFTER_S):
        super().__init__(message, field, retry_after_s)


class DeadlineExceeded(ServiceError):
    status = 504
    type = "timeout"


class NotFound(ServiceError):
    """A resource named in the path (a job, a job's image) does not exist."""

    status = 404
    type = "not_found"


class Conflict(ServiceError):
    """The request conflicts with an earlier one (an Idempotency-Key reused with another body)."""

    status = 409
    type = "conflict"


class Internal(ServiceError):
    """Anything unexpected: 500, no detail (ServiceError's own status and type)."""


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}


class HTTPError(ServiceError):
    """A routing-level HTTP error (unknown route, wrong method...) in the service's error shape."""

    def __init__(self, message: str, status: int, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = _HTTP_TYPES.get(status, "http_error")
        self._headers = dict(headers or {})

    def __reduce__(self):
        return (type(self), (self.message, self.status, self._headers))

    def headers(self) -> dict[str, str]:
        return {**self._headers, **super().headers()}


def _ray_classes():
    try:
        from ray import exceptions as rex
        from ray.serve import exceptions as sex
    except ImportError:  # the API layer is usable without Ray
        return None
    return rex, sex


def replica_lost(exc: BaseException) -> bool:
    """The replica running the call died or became unreachable (not back-pressure, not bad input): the same
    call can be rerun on another replica."""
    ray = _ray_classes()
    if ray is None:
        return False
    rex, sex = ray
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None and cause is not exc:
            return replica_lost(cause)
    return isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError, sex.ReplicaUnavailableError,
                            rex.RayActorError))  # fmt: skip


def classify(exc: BaseException, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> ServiceError:
    """Any exception -> the ServiceError that decides its HTTP status. Ray wrappers are unwrapped first."""
    if isinstance(exc, ServiceError):
        return exc
    ray = _ray_classes()
    if ray is not None:
        rex, sex = ray
        if isinstance(exc, rex.RayTaskError):
            cause = getattr(exc, "cause", None)
            if cause is not None and cause is not exc:
                return classify(cause, retry_after_s)
        if isinstance(exc, sex.BackPressureError):
            ra = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
            return Unavailable("the service is at capacity; retry later", retry_after_s=ra)
        unavailable = (sex.DeploymentUnavailableError, sex.ReplicaUnavailableError,
                       rex.ActorDiedError, rex.ActorUnavailableError)  # fmt: skip
        if isinstance(exc, unavailable):
            return Unavailable("a model replica is not available; retry later", retry_after_s=retry_after_s)
        if isinstance(exc, (sex.RequestCancelledError, rex.TaskCancelledError)):
            return Unavailable("the request was cancelled", retry_after_s=retry_after_s)
        if isinstance(exc, rex.GetTimeoutError):
            return DeadlineExceeded("the request took too long")
    if isinstance(exc, InvalidInput):
        return BadRequest(exc.message, field=exc.field)
    if isinstance(exc, Overloaded):
        return Unavailable(str(exc) or "the engine is at capacity; retry later", retry_after_s=retry_after_s)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DeadlineExceeded("the request took too long")
    if isinstance(exc, CheckpointError):
        return Internal("the model is misconfigured")
    if isinstance(exc, EngineError):
        return Internal("the engine failed")
    return Internal("internal error")


def from_body(error: dict, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> ServiceError:
    """A stored error body `{type, message, field?}` (a failed job's) -> the ServiceError it was made from, so
    that a call waiting for the job answers with the status the error would have had in that call."""
    kinds = {cls.type: cls for cls in (BadRequest, PayloadTooLarge, NotFound, Conflict, DeadlineExceeded)}
    message, field = error.get("message") or "the job failed", error.get("field")
    if error.get("type") == Unavailable.type:
        return Unavailable(message, field=field, retry_after_s=retry_after_s)
    return kinds.get(error.get("type"), Internal)(message, field=field)


def format_loc(loc: Sequence[Any]) -> str:
    """("body", "refs", 0, "image") -> "refs[0].image"; ("path", "mode") -> "mode"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


def body_parse_error(cause: BaseException | None) -> BadRequest:
    """FastAPI's 400 "There was an error parsing the body" (raised from the decoding error) -> a 422 naming
    `body` that says what is wrong with it, like malformed JSON."""
    if isinstance(cause, UnicodeDecodeError):
        why = f"the body is not valid {cause.encoding.upper()} (byte {cause.start}: {cause.reason})"
    elif isinstance(cause, RecursionError):
        why = "the body's JSON is nested too deeply"
    else:
        why = "the body could not be read as JSON"
    return BadRequest(why, field="body")


_BOUND_ERRORS = ("less_than_equal", "too_long", "string_too_long")


def _over_limit(e: dict, limits) -> str | None:
    """Past the protocol's hard bound of a field the operator limits: the message quotes the server's limit."""
    from .protocol import LIMITED_FIELDS

    loc = list(e.get("loc", ()))
    if limits is None or e.get("type") not in _BOUND_ERRORS or len(loc) != 2 or loc[1] not in LIMITED_FIELDS:
        return None
    limit = getattr(limits, LIMITED_FIELDS[loc[1]][0])
    value = e.get("input")
    if isinstance(value, str):
        got = f"{len(value)} characters"
    elif isinstance(value, (list, tuple)):
        got = f"{len(value)} items"
    else:
        got = repr(value)
    return f"must be at most {limit} (this server's limit), got {got}"


def validation_error(errors: Sequence[dict], limits=None) -> BadRequest:
    """Pydantic/FastAPI validation errors -> one BadRequest naming the first field; all are listed too.
    `limits` (the operator's `Limits`) words the bounds it sets as the server's, not the protocol's."""
    items = []
    for e in errors:
        over = _over_limit(e, limits)
        if over is not None:
            items.append({"field": format_loc(e["loc"]), "message": over})
            continue
        if e.get("type") == "json_invalid":  # FastAPI: loc ("body", character position), ctx {"error": why}
            loc = list(e.get("loc", ()))
            pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
            why = (e.get("ctx") or {}).get("error") or str(e.get("msg", "invalid JSON"))
            where = f" at character {pos}" if pos is not None else ""
            items.append({"field": "body", "message": f"the body is not valid JSON{where}: {why}"})
            continue
        loc = list(e.get("loc", ()))
        if loc == ["body"] and isinstance(e.get("input"), (bytes, bytearray)):  # FastAPI read no JSON: wrong type
            items.append({"field": "body", "message": "the body must be a JSON object sent with "
                          "Content-Type: application/json"})  # fmt: skip
            continue
        # pydantic appends the union member / tag to the loc (e.g. "list[float]"); drop such noise for the name
        loc = [p for p in loc if isinstance(p, int) or "[" not in str(p) and not str(p).startswith("function-")]
        items.append({"field": format_loc(loc), "message": str(e.get("msg", "invalid"))})
    first = items[0] if items else {"field": "body", "message": "invalid request"}
    err = BadRequest(first["message"], field=first["field"])
    err.all_errors = items  # type: ignore[attr-defined]
    return err


def error_response(exc: BaseException, request_id: str | None = None, retry_after_s: float = DEFAULT_RETRY_AFTER_S):
    """THE mapping from an exception to an HTTP response (a Starlette JSONResponse)."""
    from fastapi.responses import JSONResponse

    err = classify(exc, retry_after_s)
    if err.status >= 500 and not isinstance(err, Unavailable):
        log.error("request %s failed", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    body = err.body()
    extra = getattr(err, "all_errors", None)
    if extra and len(extra) > 1:
        body["error"]["errors"] = extra
    if request_id:
        body["error"]["request_id"] = request_id
    return JSONResponse(body, status_code=err.status, headers=err.headers())


def install_error_handlers(app, retry_after_s=lambda: DEFAULT_RETRY_AFTER_S, limits=lambda: None) -> None:
    """Route every error a FastAPI app can produce through `error_response`; `limits()` gives the operator's
    `Limits` that validation messages quote."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    def rid(request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors(), limits()), rid(request), retry_after_s())

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):  # body not decodable
            return error_response(body_parse_error(exc.__cause__), rid(request), retry_after_s())
        err = HTTPError(str(exc.detail), exc.status_code, getattr(exc, "headers", None))
        return error_response(err, rid(request), retry_after_s())

    @app.exception_handler(ServiceError)
    async def _service(request, exc: ServiceError):
        return error_response(exc, rid(request), retry_after_s())

    @app.exception_handler(Exception)
    async def _any(request, exc: Exception):
        return error_response(exc, rid(request), retry_after_s())
