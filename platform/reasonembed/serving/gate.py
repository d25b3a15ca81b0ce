"""ASGI middleware in front of the routes: API key check (401) and request body limit (413).

Why middleware rather than FastAPI dependencies: FastAPI decodes and validates the body before dependencies can
reject a request, so a client without a key would learn about schema errors (400) first, and an oversized body
would be read in full. Here the key is checked first, then ``Content-Length``, then the body is read with a
running count and cut off as soon as it passes the limit; only then does FastAPI see the request.

Settings are per process (one ingress replica per actor process): the replica calls ``configure_gate`` in its
constructor, and the middleware reads them through ``gate_settings`` on every request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from reasonembed.serving.auth import bearer_ok
from reasonembed.serving.errors import NotReady, PayloadTooLarge, ServingError, Unauthorized


@dataclass(frozen=True)
class GateSettings:
    api_key: str | None
    max_body_bytes: int
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health", "/ready"}))
    on_reject: Callable[[str, int], None] | None = None  # (path, status) of requests the gate answers (metrics)

    def __repr__(self) -> str:  # never print the key
        return f"GateSettings(auth={'on' if self.api_key else 'off'}, max_body_bytes={self.max_body_bytes})"


_SETTINGS: GateSettings | None = None


def configure_gate(settings: GateSettings) -> None:
    global _SETTINGS
    _SETTINGS = settings


def gate_settings() -> GateSettings | None:
    return _SETTINGS


async def send_error(send, err: ServingError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    """Pure ASGI middleware: auth, then body size, then the app (with the buffered body replayed)."""

    def __init__(self, app, settings: Callable[[], GateSettings | None] = gate_settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings()
        if s is None:
            return await send_error(send, NotReady("service is starting", retry_after_s=1.0))
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def reject(err: ServingError) -> None:
            if s.on_reject is not None:
                s.on_reject(path, err.status)
            await send_error(send, err)

        if s.api_key and path not in s.public_paths and not bearer_ok(headers.get("authorization"), s.api_key):
            err = Unauthorized("missing or invalid API key: send the header 'Authorization: Bearer <key>'")
            err.headers["WWW-Authenticate"] = "Bearer"
            return await reject(err)
        too_large = PayloadTooLarge(f"request body exceeds the {s.max_body_bytes}-byte limit "
                                    "(limits.max_body_bytes); send fewer or shorter inputs per request",
                                    param="body")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > s.max_body_bytes:
            return await reject(too_large)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            part = msg.get("body", b"")
            size += len(part)
            if size > s.max_body_bytes:
                return await reject(too_large)
            chunks.append(part)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
