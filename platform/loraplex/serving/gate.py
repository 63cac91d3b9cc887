"""The ingress's front gate: who is calling, how big the body is, whether the key may
start another request. An ASGI middleware, as Ray Serve LLM's ``middleware.py`` does.

Owns: :class:`Gate`, run before every endpoint of the app: with keys, a bearer key
(401 without a valid one); without keys (``auth.allow_anonymous``), loopback clients
that name this machine in ``Host`` only (403 otherwise: a remote client, or a web page
reaching in through DNS rebinding); the key's limits (``limits.KeyLimiter``: 429 with
``Retry-After``), applied before the body is read; the body read once, at most
``http.max_body_bytes`` (413 beyond) within ``http.body_read_s`` (408 after it).
It leaves the key's record (what it may use and read) and the limiter in
``request.state`` for the endpoints, and counts the request out when its response
(a stream too) has ended. :func:`build_fastapi_app` assembles the FastAPI app: the
gate, CORS only for ``http.cors_origins``, and an error handler that answers any
unexpected failure with a 500 naming the request id, never the exception text.
Does not own: what a key may do with a model or a collection (the ingress and
``grounding`` check the record).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from loraplex.errors import ConfigError
from loraplex.serving.config import ServingConfig
from loraplex.serving.errors import ApiError, error_body
from loraplex.serving.keys import hash_key
from loraplex.serving.limits import KeyLimiter

log = logging.getLogger("ray.serve.loraplex")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def loopback_refusal(client: str | None, host_header: str) -> ApiError | None:
    """Why keyless serving refuses this caller (None: it is this machine, by name)."""
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    if (client is not None and client not in LOOPBACK_NAMES) or name not in LOOPBACK_NAMES:
        return ApiError(
            403,
            "this endpoint serves without API keys and answers loopback clients only "
            "(Host 127.0.0.1 or localhost)",
            code="permission_denied",
        )
    return None


def refuse_open_anonymous() -> None:
    """Keyless serving binds loopback only: called by a keyless app's replicas as they
    start, it refuses (the replica fails, so the application does not start) when Ray
    Serve's HTTP proxies listen on anything else (``serve run --host 0.0.0.0``, a
    RayService)."""
    from ray.serve.context import _get_global_client

    host = _get_global_client().http_config.host
    if host not in LOOPBACK_NAMES:
        raise ConfigError(
            f"no API keys (auth.allow_anonymous) but Ray Serve listens on {host}: anonymous "
            "serving binds 127.0.0.1 only; add keys, or start Serve with host 127.0.0.1"
        )


def bearer_record(keys: dict[str, dict[str, Any]], authorization: str) -> dict[str, Any]:
    """The record of the key in an ``Authorization`` header; ApiError 401 otherwise."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing API key: send the header Authorization: Bearer <key>",
            code="invalid_api_key",
        )
    record = keys.get(hash_key(token.strip()))
    if record is None:
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    return record


class _BodyTooLarge(Exception):
    pass


class Gate:
    """ASGI middleware: authenticate, bound the body, apply the key's limits."""

    def __init__(
        self,
        app: Any,
        *,
        keys: dict[str, dict[str, Any]],
        anonymous: dict[str, Any],
        max_body_bytes: int,
        share: float = 1.0,
        body_read_s: float = 30.0,
    ) -> None:
        self.app = app
        self.keys = keys
        self.anonymous = anonymous
        self.max_body_bytes = max_body_bytes
        self.body_read_s = body_read_s
        self.limiter = KeyLimiter(share)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # every path, whatever the route prefix: nothing of the app is reachable around it
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflight: outside
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            record = self._identify(scope, headers)
            # admitted before the body is read: a body that trickles in holds one of its
            # own key's slots, and only for body_read_s
            self.limiter.admit(record)
        except ApiError as e:
            await e.response()(scope, receive, send)
            return
        try:
            try:
                async with asyncio.timeout(self.body_read_s):
                    receive = await self._bounded_body(receive, headers)
            except TimeoutError:
                raise ApiError(
                    408,
                    f"the request body did not arrive within {self.body_read_s:g} s "
                    "(http.body_read_s)",
                    code="request_timeout",
                ) from None
        except ApiError as e:
            self.limiter.release(record)
            await e.response()(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["key"] = record
        state["limiter"] = self.limiter
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(record)

    def _identify(self, scope: dict, headers: dict[str, str]) -> dict[str, Any]:
        if not self.keys:
            client = scope.get("client")
            refusal = loopback_refusal(client[0] if client else None, headers.get("host", ""))
            if refusal is not None:
                raise refusal
            return self.anonymous
        return bearer_record(self.keys, headers.get("authorization", ""))

    async def _bounded_body(self, receive: Any, headers: dict[str, str]) -> Any:
        """Read the whole body (at most max_body_bytes) and replay it to the app."""
        limit = self.max_body_bytes
        too_large = ApiError(
            413,
            f"the request body is over {limit} bytes (http.max_body_bytes)",
            code="request_too_large",
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the endpoint will see an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(parts)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            try:
                return await receive()  # http.disconnect, when it comes
            except Exception:  # Serve cancels the receive of a request whose client left
                return {"type": "http.disconnect"}

        return replay


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Any failure no endpoint turned into an ApiError: a 500 without its text."""
    rid = getattr(request.state, "rid", None) or uuid.uuid4().hex
    log.error("[%s] unexpected error in %s", rid, request.url.path, exc_info=exc)
    return JSONResponse(
        status_code=500,
        content=error_body(500, f"internal error; the server log has it under request {rid}"),
    )


def build_fastapi_app(cfg: ServingConfig, keys: dict[str, dict[str, Any]]) -> FastAPI:
    """The ingress's FastAPI app: the gate inside, CORS (only if origins are listed)
    outside it, and the catch-all error handler."""
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(
        Gate,
        keys=keys,
        anonymous=cfg.anonymous_record(),
        max_body_bytes=cfg.http.max_body_bytes,
        share=1.0 / cfg.ingress.most,
        body_read_s=cfg.http.body_read_s,
    )
    if cfg.http.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.http.cors_origins,
            allow_credentials=False,  # keys go in a header, never cookies
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
        )
    return app
