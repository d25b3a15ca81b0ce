"""Typed errors of the embedding service, each with its HTTP status and an OpenAI-style error body.

The body follows the OpenAI API (``{"error": {"message", "type", "param", "code"}}``), so existing clients surface
the message. Every message names the offending field (``param``, e.g. ``input[3]``) and, where possible, the fix.
These errors cross the deployment-handle boundary intact (Ray re-raises the original exception type), so the model
replica can raise them and the ingress maps them to responses.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """Base: an HTTP status plus an OpenAI-style error body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def __reduce__(self):  # keep param/code/headers when pickled across processes
        return (self.__class__, (self.message, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ServingError):
    """Well-formed JSON whose values this model cannot serve (e.g. dimensions above the model's)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    """An input is longer than the model's max length and the request asked not to truncate."""

    code = "context_length_exceeded"


class SchemaError(ServingError):
    """Malformed JSON or a value of the wrong type/shape.

    400 ``invalid_request_error`` as the OpenAI API answers it, not FastAPI's 422: the ``openai`` client maps 400
    to ``BadRequestError``, which is what code written against OpenAI catches (422 would be
    ``UnprocessableEntityError``)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_schema"


class Unauthorized(ServingError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ServingError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ServingError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(ServingError):
    """Backpressure: the caller should retry after ``Retry-After`` seconds."""

    status = 503
    type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0, status: int = 503):
        super().__init__(message, None, None, {"Retry-After": str(max(1, round(retry_after_s)))})
        self.status = status
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (self.__class__, (self.message, self.retry_after_s, self.status))


class NotReady(Overloaded):
    """The model has not finished loading and warming up."""

    code = "not_ready"
