"""The OpenAI-compatible front door: routes, keys, retrieval, adapters, metrics.

Owns: :class:`LoraplexIngress`, a subclass of Ray Serve LLM's ``OpenAiIngress``
(which keeps the handles to the ``LLMServer`` deployments and routes adapter requests
through Serve's multiplexing). Per request it checks the key, reads and validates the
body, resolves the ``model`` (a route, a base model or ``base:adapter``), resolves the
adapter's alias to a registry version, runs retrieval (the route's, merged with the
body's ``retrieval`` field), rewrites the prompt with numbered sources, calls the
engine, and returns the answer with ``sources`` and ``citations``; every error is an
OpenAI-shaped JSON body with a reason. Does not own: the engine (vLLM in
``LLMServer``), adapter downloads (``adapters.RegistryLoraLoader``) or search
(the Retriever deployment).

Response extensions (documented in the README):
- non-streaming: top-level ``sources`` (list; ``id`` is the number the model cites),
  ``retrieval`` (route, collection, status: ``ok`` | ``unavailable`` | ``off``,
  latency) and per choice ``citations``;
- streaming: the first event is a chunk with ``choices: []`` and ``sources``; the
  last event before ``[DONE]`` is a chunk with ``choices: []`` and ``citations`` (one
  list per choice index).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError
from loraplex.serving import metrics
from loraplex.serving.adapters import AdapterLoadError, AliasResolver, multiplexed_id
from loraplex.serving.config import RouteRetrieval, ServingConfig, hash_key
from loraplex.serving.hybrid import (
    build_messages,
    citations,
    public_sources,
    question_of,
    user_turn,
)
from loraplex.serving.ray_llm import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAiIngress,
    RawRequestInfo,
    apply_openai_json_format,
)

# A child of Ray Serve's logger: in a replica its lines go to the replica's log file
# with the request id Serve attaches to every record.
log = logging.getLogger("ray.serve.loraplex")
TASKS = ("chat", "json_answer", "classify_ticket")


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _loopback_only(request: Request) -> None:
    """Keyless serving answers only a client on this machine that names this machine:
    a remote client, or a web page reaching in through DNS rebinding (a foreign
    ``Host``), gets 403."""
    client = request.client.host if request.client else None
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if (client is not None and client not in LOOPBACK_NAMES) or name not in LOOPBACK_NAMES:
        raise ApiError(
            403,
            "this endpoint serves without API keys and answers loopback clients only "
            "(Host 127.0.0.1 or localhost)",
            code="permission_denied",
        )


class ApiError(Exception):
    """An error answered to the client: status, message, the offending parameter."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
        return JSONResponse(
            status_code=self.status,
            content={
                "error": {
                    "message": self.message,
                    "type": kind.get(
                        self.status,
                        "invalid_request_error" if self.status < 500 else "server_error",
                    ),
                    "param": self.param,
                    "code": self.code,
                }
            },
        )


@dataclass
class Target:
    """What a request's ``model`` resolved to."""

    name: str  # as the client wrote it
    base: str
    adapter: str | None = None  # adapter name in the config
    registry: str | None = None
    retrieval: RouteRetrieval | None = None
    system_prompt: str | None = None
    task: str = "chat"
    tags: dict[str, str] = field(default_factory=dict)


class LoraplexIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        lora_paths: dict[str, str] | None = None,
        *,
        serving: dict[str, Any],
        settings: dict[str, Any],
        key_digests: dict[str, dict[str, Any]],
        retriever: Any = None,
    ) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=None)
        self.config = ServingConfig.model_validate(serving)
        self.settings = LoraplexConfig.model_validate(settings)
        self.keys = key_digests
        self.retriever = retriever
        self.resolver = AliasResolver(self.settings, self.config.alias_refresh_s)
        self.bases = {m.id: m for m in self.config.models}
        self.adapters = {f"{a.base}:{a.name}": a for a in self.config.adapters}
        self.routes = {r.name: r for r in self.config.routes}
        log.info(
            "loraplex ingress ready: %d base model(s), %d adapter(s), %d route(s), auth %s",
            len(self.bases),
            len(self.adapters),
            len(self.routes),
            "on" if self.keys else "off",
        )

    # ---------------------------------------------------------------- helpers

    def _authorize(self, request: Request) -> dict[str, Any] | None:
        """The key's record, or None without auth (loopback clients only); ApiError 401
        (or 403) otherwise."""
        if not self.keys:
            _loopback_only(request)
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send the header Authorization: Bearer <key>",
                code="invalid_api_key",
            )
        record = self.keys.get(hash_key(token.strip()))
        if record is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return record

    @staticmethod
    def _allowed(key: dict[str, Any] | None, model: str) -> bool:
        return key is None or "*" in key["models"] or model in key["models"]

    def _target(self, model: Any) -> Target:
        if not isinstance(model, str) or not model:
            raise ApiError(
                400, "`model` is required: a route, a base model or base:adapter", "model"
            )
        if "/" in model or "\\" in model or ".." in model:
            raise ApiError(
                404,
                f"model {model!r} not found (names cannot contain paths)",
                "model",
                "model_not_found",
            )
        if model in self.routes:
            r = self.routes[model]
            adapter = self.adapters.get(f"{r.base}:{r.adapter}") if r.adapter else None
            return Target(
                model,
                r.base,
                r.adapter,
                adapter.registry if adapter else None,
                r.retrieval,
                r.system_prompt,
                r.task,
            )
        if model in self.bases:
            return Target(model, model)
        if model in self.adapters:
            a = self.adapters[model]
            return Target(model, a.base, a.name, a.registry)
        raise ApiError(
            404,
            f"model {model!r} not found; GET /v1/models lists the routes, base models and adapters",
            "model",
            "model_not_found",
        )

    async def _engine_model(self, t: Target) -> tuple[str, str]:
        """(model id for the engine, adapter label for logs/metrics)."""
        if t.registry is None:
            return t.base, "none"
        try:
            name, version = await self.resolver.resolve(t.registry)
        except InputError as e:
            raise ApiError(404, str(e), "model", "model_not_found") from None
        except Exception as e:  # the registry itself is down
            raise ApiError(503, f"the MLflow registry cannot be reached: {_first(e)}") from None
        return multiplexed_id(t.base, name, version), f"{name}/{version}"

    async def _retrieve(
        self, t: Target, query: str, override: Any, request_id: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if override is False or (override is None and t.retrieval is None):
            return [], {"status": "off"}
        if override is not None and not isinstance(override, dict | bool):
            raise ApiError(
                400, "`retrieval` must be an object (or false to turn it off)", "retrieval"
            )
        base = t.retrieval.model_dump() if t.retrieval else {}
        if isinstance(override, dict):
            base.update(override)
        try:
            spec = RouteRetrieval.model_validate(base)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"retrieval.{where}: {err['msg']}", f"retrieval.{where}") from None
        if self.retriever is None:
            raise ApiError(
                400, "this server has no retriever (serving config: retriever: null)", "retrieval"
            )
        if not query:
            raise ApiError(
                400, "retrieval needs a user message with text to search for", "messages"
            )
        collection = spec.collection or self.settings.retrieval.collection
        info = {"status": "ok", "collection": collection, "top_k": spec.top_k, "mode": spec.mode}
        started = time.perf_counter()
        try:
            hits = await self.retriever.search.remote(
                {
                    "query": query[:8000],
                    "collection": collection,
                    "top_k": spec.top_k,
                    "mode": spec.mode,
                    "filter": spec.filter,
                    "tenant": spec.tenant,
                }
            )
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, InputError):
                status = (
                    404
                    if "unknown collection" in str(cause) or "does not exist" in str(cause)
                    else 400
                )
                raise ApiError(status, str(cause), "retrieval") from None
            reason = str(cause) if isinstance(cause, LoraplexError) else _first(cause)
            if spec.on_unavailable == "answer_without_context":
                log.warning(
                    "[%s] retrieval unavailable, answering without context: %s", request_id, reason
                )
                return [], {**info, "status": "unavailable", "reason": reason}
            raise ApiError(
                503, f"retrieval is unavailable: {reason}", "retrieval", "retrieval_unavailable"
            ) from None
        info["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return hits, info

    def _check_generation_params(self, body: dict[str, Any], t: Target) -> None:
        spec = self.bases[t.base]
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ApiError(400, f"`{key}` must be a positive integer (got {v!r})", key)
            if isinstance(v, int) and v >= spec.max_model_len:
                raise ApiError(
                    400,
                    f"`{key}`={v} does not fit the context of {t.base} "
                    f"({spec.max_model_len} tokens, prompt included)",
                    key,
                )
        n = body.get("n")
        if n is not None and (
            not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= spec.max_n
        ):
            raise ApiError(400, f"`n` must be between 1 and {spec.max_n} (got {n!r})", "n")
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            import jsonschema

            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ApiError(
                    400,
                    "response_format.json_schema.schema must be a JSON schema object",
                    "response_format",
                )
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ApiError(
                    400, f"response_format: not a valid JSON schema: {e.message}", "response_format"
                ) from None

    async def _dispatch(self, engine_model: str, call: str, body: Any, request: Request):
        handle = self._get_configured_serve_handle(engine_model)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        gen = getattr(handle, call).remote(body, RawRequestInfo(headers=headers))
        try:
            first = await gen.__anext__()
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, AdapterLoadError):
                raise ApiError(503, str(cause), "model", "adapter_unavailable") from None
            if "Failed to load lora model" in str(cause):
                raise ApiError(
                    503,
                    f"adapter {engine_model} cannot be loaded: {_first(cause)}",
                    "model",
                    "adapter_unavailable",
                ) from None
            raise
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse):
            status = int(head.error.code or 400)
            raise ApiError(status if 400 <= status < 600 else 400, head.error.message)
        return first, gen

    # ---------------------------------------------------------------- endpoints

    async def models(self, request: Request) -> Response:
        try:
            key = self._authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse(
            {"object": "list", "data": [c for c in self._cards() if self._allowed(key, c["id"])]}
        )

    async def model_data(self, model: str, request: Request) -> Response:
        try:
            key = self._authorize(request)
            card = next((c for c in self._cards() if c["id"] == model), None)
            if card is None or not self._allowed(key, model):
                raise ApiError(404, f"model {model!r} not found", "model", "model_not_found")
        except ApiError as e:
            return e.response()
        return JSONResponse(card)

    def _cards(self) -> list[dict[str, Any]]:
        created = 0
        cards: list[dict[str, Any]] = []
        for m in self.config.models:
            cards.append(
                {
                    "id": m.id,
                    "object": "model",
                    "created": created,
                    "owned_by": "loraplex",
                    "metadata": {"kind": "base", "max_model_len": m.max_model_len},
                }
            )
        for name, a in self.adapters.items():
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "loraplex",
                    "parent": a.base,
                    "metadata": {"kind": "adapter", "registry": a.registry},
                }
            )
        for r in self.config.routes:
            retrieval = r.retrieval.model_dump(exclude_none=True) if r.retrieval else None
            cards.append(
                {
                    "id": r.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "loraplex",
                    "parent": r.base,
                    "metadata": {
                        "kind": "route",
                        "base": r.base,
                        "adapter": r.adapter,
                        "retrieval": retrieval,
                        "task": r.task,
                    },
                }
            )
        return cards

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await _json_body(request)
            if self.retriever is None:
                raise ApiError(404, "this server has no embedding model (retriever: null)", "model")
            status, content = await self.retriever.openai_embeddings.remote(body)
        except ApiError as e:
            return e.response()
        return JSONResponse(content, status_code=status)

    async def _generate(self, request: Request, call: str) -> Response:
        rid = _request_id(request)
        started = time.perf_counter()
        tags = {"route": "unknown", "adapter": "none"}
        try:
            key = self._authorize(request)
            body = await _json_body(request)
            t = self._target(body.get("model"))
            tags["route"] = t.name
            if not self._allowed(key, t.name):
                raise ApiError(
                    403, f"this API key may not use {t.name!r}", "model", "permission_denied"
                )
            retrieval_override = body.pop("retrieval", None)
            task = body.pop("task", None)
            if task is not None:
                if task not in TASKS:
                    raise ApiError(400, f"`task` must be one of {', '.join(TASKS)}", "task")
                t.task = task
            if call == "chat":
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise ApiError(
                        400,
                        "`messages` is required: a non-empty list of {role, content}",
                        "messages",
                    )
                query = question_of(messages)
            else:
                prompt = body.get("prompt")
                if prompt is None:
                    raise ApiError(400, "`prompt` is required", "prompt")
                query = prompt if isinstance(prompt, str) else ""
            self._check_generation_params(body, t)
            if self.config.log_prompts:  # off by default: prompts may hold personal data
                log.info("[%s] %s question: %s", rid, t.name, query[:500])
            engine_model, adapter_label = await self._engine_model(t)
            tags["adapter"] = adapter_label
            hits, retrieval = await self._retrieve(t, query, retrieval_override, rid)
            if retrieval.get("latency_ms") is not None:
                metrics.retrieval_latency.observe(retrieval["latency_ms"] / 1000, tags=tags)
            if call == "chat":
                body["messages"] = build_messages(
                    messages, hits, system_prompt=t.system_prompt, task=t.task
                )
            elif hits or t.task != "chat":
                if not isinstance(body["prompt"], str):
                    raise ApiError(
                        400,
                        "routes with retrieval or a task need `prompt` to be a string",
                        "prompt",
                    )
                body["prompt"] = user_turn(body["prompt"], hits, t.task)
            stream = bool(body.get("stream"))
            client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if stream:
                body["stream_options"] = {
                    **(body.get("stream_options") or {}),
                    "include_usage": True,
                }
            body["model"] = engine_model
            try:
                parsed = (
                    ChatCompletionRequest if call == "chat" else CompletionRequest
                ).model_validate(body)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ApiError(400, f"{where or 'body'}: {err['msg']}", where or None) from None
            metrics.requests.inc(tags={**tags, "endpoint": call})
            first, gen = await self._dispatch(engine_model, call, parsed, request)
            sources = public_sources(hits)
            extra = {"retrieval": {**retrieval, "route": t.name}}
            if not stream:
                return self._complete(first, sources, extra, tags, rid, started)
            return StreamingResponse(
                self._stream(first, gen, sources, extra, client_usage, tags, rid, started),
                media_type="text/event-stream",
            )
        except ApiError as e:
            metrics.errors.inc(tags={**tags, "status": str(e.status)})
            log.info("[%s] %s %s -> %d %s", rid, call, tags["route"], e.status, e.message)
            return e.response()

    def _complete(
        self, first: Any, sources: list, extra: dict, tags: dict, rid: str, started: float
    ) -> Response:
        data = first.model_dump(mode="json") if hasattr(first, "model_dump") else dict(first)
        for choice in data.get("choices", []):
            text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            choice["citations"] = citations(text, sources)
        data["sources"] = sources
        data.update(extra)
        usage = data.get("usage") or {}
        self._record(tags, usage, started, rid)
        return JSONResponse(data)

    async def _stream(
        self,
        first: Any,
        gen: Any,
        sources: list,
        extra: dict,
        client_usage: bool,
        tags: dict,
        rid: str,
        started: float,
    ) -> AsyncGenerator[str, None]:
        texts: dict[int, list[str]] = {}
        usage: dict[str, Any] = {}
        chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ""
        header_sent = False
        finished = False
        try:
            async for item in _chain(first, gen):
                packet = apply_openai_json_format(item)
                out: list[str] = []
                for event in packet.split("\n\n"):
                    if not event.startswith("data: "):
                        continue
                    payload = event[6:]
                    if payload.strip() == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    chunk_id, created, model = (
                        chunk.get("id", chunk_id),
                        chunk.get("created", created),
                        chunk.get("model", model),
                    )
                    if not header_sent:
                        out.append(
                            _sse(
                                {
                                    "id": chunk_id,
                                    "object": _chunk_object(chunk),
                                    "created": created,
                                    "model": model,
                                    "choices": [],
                                    "sources": sources,
                                    **extra,
                                }
                            )
                        )
                        header_sent = True
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not chunk.get("choices") and not client_usage:
                            continue
                        if not client_usage:
                            chunk["usage"] = None
                    for c in chunk.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
                        texts.setdefault(int(c.get("index", 0)), []).append(piece)
                    out.append(_sse(chunk))
                if out:
                    yield "".join(out)
            cites = [
                citations("".join(texts.get(i, [])), sources)
                for i in range(max(texts, default=-1) + 1)
            ]
            yield _sse(
                {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "citations": cites,
                }
            )
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                self._record(tags, usage, started, rid)
            else:
                metrics.errors.inc(tags={**tags, "status": "499"})
                log.info("[%s] stream for %s ended early (client gone)", rid, tags["route"])

    def _record(self, tags: dict, usage: dict, started: float, rid: str) -> None:
        elapsed = time.perf_counter() - started
        prompt, completion = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        metrics.prompt_tokens.inc(prompt, tags=tags)
        metrics.completion_tokens.inc(completion, tags=tags)
        metrics.latency.observe(elapsed, tags=tags)
        log.info(
            "[%s] %s adapter %s: %d prompt + %d completion tokens in %.2f s",
            rid,
            tags["route"],
            tags["adapter"],
            prompt,
            completion,
            elapsed,
        )


def _chunk_object(chunk: dict[str, Any]) -> str:
    return chunk.get("object") or "chat.completion.chunk"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _chain(first: Any, gen: Any) -> AsyncGenerator[Any, None]:
    yield first
    async for item in gen:
        yield item


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
    "embeddings": lambda app: app.post("/v1/embeddings"),
}
