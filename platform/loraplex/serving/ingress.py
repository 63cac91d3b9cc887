"""The OpenAI-compatible front door: what a request's ``model`` means and the engine call.

Owns: :class:`LoraplexIngress`, a subclass of Ray Serve LLM's ``OpenAiIngress``
(which keeps the handles to the ``LLMServer`` deployments and routes adapter requests
through Serve's multiplexing). Per request it reads the body, resolves ``model`` (a
route, a base model or ``base:adapter``) within the key's scope, resolves an
adapter's alias to a registry version, grounds the request (``grounding``: the
route's retrieval narrowed by the key and the body), checks the generation
parameters, calls the engine within the request deadline, and hands the answer to
``responses``; every error is an OpenAI-shaped JSON body with a reason
(``errors.ApiError``). The key itself, the body size and the key's limits are
checked before any of this, by the ``gate`` middleware. Does not own: the engine
(vLLM in ``LLMServer``), adapter downloads (``adapters.RegistryLoraLoader``) or
search (the Retriever deployment).

Response extensions (documented in the README):
- non-streaming: top-level ``sources`` (list; ``id`` is the number the model cites),
  ``retrieval`` (route, collection, status: ``ok`` | ``unavailable`` | ``off``,
  latency) and per choice ``citations``;
- streaming: the first event is a chunk with ``choices: []`` and ``sources``; the
  last event before ``[DONE]`` is a chunk with ``choices: []`` and ``citations`` (one
  list per choice index).
- every response carries ``x-loraplex-request-id``, the id the server's log lines use
  (a client's own ``x-request-id`` is logged beside it, never instead of it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError
from loraplex.models.adapters import parse_registry_ref
from loraplex.serving import metrics, responses
from loraplex.serving.adapters import (
    AdapterLoadError,
    AliasResolver,
    RegistryUnavailable,
    multiplexed_id,
    short_registry_timeouts,
)
from loraplex.serving.canary import (
    CANARY,
    STABLE,
    CanaryWatch,
    Outcome,
    ShadowOutcome,
    ShadowWatch,
    format_ok,
    halt_record,
    sticky_id,
    texts,
)
from loraplex.serving.config import (
    EMBEDDINGS,
    RouteRetrieval,
    ServingConfig,
)
from loraplex.serving.errors import ApiError, public_reason, shorten
from loraplex.serving.gate import refuse_open_anonymous
from loraplex.serving.grounding import Grounder
from loraplex.serving.ray_llm import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAiIngress,
    RawRequestInfo,
)

# A child of Ray Serve's logger: in a replica its lines go to the replica's log file
# with the request id Serve attaches to every record.
log = logging.getLogger("ray.serve.loraplex")
TASKS = ("chat", "json_answer", "classify_ticket")
RID_HEADER = "x-loraplex-request-id"


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


@dataclass
class Pick:
    """Which engine model (and, for an adapter with a canary, which side) answers."""

    engine_model: str
    label: str  # adapter name/version for logs and metrics, or "none"
    arm: str | None = None  # STABLE or CANARY when the adapter has a live canary
    watch: CanaryWatch | None = None
    canary: tuple[str, str] | None = None  # the canary's registered name and version
    structured: bool = False  # JSON asked for (task json_answer or a JSON response_format)


def allowed(key: dict[str, Any], model: str) -> bool:
    return "*" in key["models"] or model in key["models"]


class LoraplexIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        lora_paths: dict[str, str] | None = None,
        *,
        serving: dict[str, Any],
        settings: dict[str, Any],
        retriever: Any = None,
        anonymous: bool = False,
    ) -> None:
        if anonymous:
            refuse_open_anonymous()
        super().__init__(llm_deployments, model_cards, lora_paths=None)
        self.config = ServingConfig.model_validate(serving)
        self.settings = LoraplexConfig.model_validate(settings)
        short_registry_timeouts(self.config.timeouts.registry_s)
        self.resolver = AliasResolver(
            self.settings, self.config.alias_refresh_s, self.config.timeouts.registry_s
        )
        self.grounder = Grounder(
            retriever, self.settings.retrieval.collection, self.config.timeouts.retrieval_s
        )
        self.retriever = retriever
        self.bases = {m.id: m for m in self.config.models}
        self.adapters = {f"{a.base}:{a.name}": a for a in self.config.adapters}
        self.routes = {r.name: r for r in self.config.routes}
        self.known_versions: set[tuple[str, str]] = set()  # pinned versions seen to exist
        self.canaries = {
            f"{a.base}:{a.name}": CanaryWatch(f"{a.base}:{a.name}", a.canary)
            for a in self.config.adapters
            if a.canary is not None
        }
        self.shadows = {
            f"{a.base}:{a.name}": ShadowWatch(f"{a.base}:{a.name}", a.shadow)
            for a in self.config.adapters
            if a.shadow is not None
        }
        self._background: set[asyncio.Task] = set()  # shadow requests in flight
        log.info(
            "loraplex ingress ready: %d base model(s), %d adapter(s), %d route(s)",
            len(self.bases),
            len(self.adapters),
            len(self.routes),
        )

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _key(request: Request) -> dict[str, Any]:
        """The caller's key record, left by the gate middleware."""
        key = getattr(request.state, "key", None)
        if key is None:  # only if the app was assembled without the gate
            raise ApiError(401, "missing API key", code="invalid_api_key")
        return key

    def _target(self, model: Any) -> Target:
        if not isinstance(model, str) or not model:
            raise ApiError(
                400, "`model` is required: a route, a base model or base:adapter", "model"
            )
        if "/" in model or "\\" in model or ".." in model:
            raise ApiError(
                404,
                f"model {shorten(model)} not found (names cannot contain paths)",
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
            f"model {shorten(model)} not found; GET /v1/models lists the routes, base models "
            "and adapters",
            "model",
            "model_not_found",
        )

    async def _resolve(self, registry: str) -> tuple[str, str]:
        try:
            return await self.resolver.resolve(registry)
        except InputError as e:
            raise ApiError(404, public_reason(e), "model", "model_not_found") from None
        except RegistryUnavailable as e:
            raise ApiError(
                503, public_reason(e), "model", "registry_unavailable", {"Retry-After": "10"}
            ) from None

    async def _canary_version(self, watch: CanaryWatch) -> tuple[str, str] | None:
        """The canary's (name, version), its halt record followed; None when it cannot be
        resolved (its requests then go to the stable version)."""
        try:
            name, version = await self.resolver.resolve(watch.spec.registry)
        except (InputError, RegistryUnavailable) as e:
            log.warning("canary %s of %s unavailable: %s", watch.spec.registry, watch.adapter, e)
            return None
        watch.follow(version, await self.resolver.halted(name, version))
        return name, version

    async def _engine_model(self, t: Target, sticky: str, pinned: str | None = None) -> Pick:
        """The engine model for the target: the adapter's version from the registry, or
        its canary's for the canary's share of requests, or the version the request pins
        (``adapter_version``: another version of the same registered adapter)."""
        if t.registry is None:
            if pinned is not None:
                raise ApiError(
                    400, f"`adapter_version`: {t.name} serves no adapter", "adapter_version"
                )
            return Pick(t.base, "none")
        if pinned is not None:
            name = parse_registry_ref(t.registry)[0]
            try:
                if (name, pinned) not in self.known_versions:  # versions are never reused
                    await asyncio.to_thread(self.resolver.check, f"{name}/{pinned}")
                    self.known_versions.add((name, pinned))
            except InputError as e:
                raise ApiError(
                    404, public_reason(e), "adapter_version", "model_not_found"
                ) from None
            except RegistryUnavailable as e:
                raise ApiError(
                    503, public_reason(e), "model", "registry_unavailable", {"Retry-After": "10"}
                ) from None
            return Pick(multiplexed_id(t.base, name, pinned), f"{name}/{pinned}")
        name, version = await self._resolve(t.registry)
        pick = Pick(multiplexed_id(t.base, name, version), f"{name}/{version}")
        watch = self.canaries.get(f"{t.base}:{t.adapter}")
        if watch is None:
            return pick
        canary = await self._canary_version(watch)
        if canary is None or canary == (name, version):  # promoted: the canary has ended
            return pick
        pick.watch, pick.canary, pick.arm = watch, canary, STABLE
        if watch.goes_to_canary(sticky if watch.spec.sticky_by == "header-or-key" else None):
            pick.engine_model = multiplexed_id(t.base, *canary)
            pick.label = f"{canary[0]}/{canary[1]}"
            pick.arm = CANARY
        return pick

    def _shadow(
        self,
        watch: ShadowWatch,
        base: str,
        call: str,
        parsed: Any,
        served: Any,
        pick: Pick,
        served_s: float,
        rid: str,
    ) -> None:
        """Send the request to the shadow version in the background; its answer is only
        compared with the served one (the client never waits for it)."""

        async def run() -> None:
            version, error, agreed, fmt, took = "?", True, None, None, None
            try:
                name, version = await self.resolver.resolve(watch.spec.registry)
                model = multiplexed_id(base, name, version)
                if model == pick.engine_model:  # the shadow is what served: nothing to learn
                    watch.in_flight -= 1
                    return
                started = time.perf_counter()
                answer, _ = await self._dispatch(
                    model, call, parsed.model_copy(update={"model": model}), f"{rid}-shadow"
                )
                took = time.perf_counter() - started
                error, agreed = False, texts(answer) == texts(served)
                fmt = format_ok(answer, pick.structured)
                outcome = "agreed" if agreed else "differed"
            except Exception as e:  # the shadow's failure is recorded, never the client's
                outcome = "error"
                log.info("[%s] shadow %s of %s failed: %s", rid, version, watch.adapter, e)
            metrics.shadow_requests.inc(
                tags={"adapter": watch.adapter, "version": version, "outcome": outcome}
            )
            watch.record(
                ShadowOutcome(time.monotonic(), version, error, agreed, fmt, took, served_s)
            )

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _observe(
        self, pick: Pick | None, status: int, latency_s: float | None, fmt: bool | None
    ) -> None:
        """One finished request of an adapter with a canary, into its window; a halt is
        logged, counted and recorded on the canary's model version."""
        if pick is None or pick.watch is None or pick.arm is None:
            return
        if fmt is False:
            metrics.format_failures.inc(tags={"adapter": pick.label})
        watch = pick.watch
        reason = watch.record(Outcome(time.monotonic(), pick.arm, status >= 500, latency_s, fmt))
        if reason is None or pick.canary is None:
            return
        name, version = pick.canary
        metrics.canary_halts.inc(tags={"adapter": watch.adapter, "version": version})
        log.warning(
            "canary %s/%s of %s halted: %s; every request now goes to the stable version",
            name,
            version,
            watch.adapter,
            reason,
        )
        record = halt_record(watch.adapter, reason, watch.stats())

        def write() -> None:
            try:
                self.resolver.record_halt(name, version, record)
            except Exception as e:  # this replica has halted it anyway
                log.warning("could not record the halt of %s/%s in MLflow: %s", name, version, e)

        asyncio.get_running_loop().run_in_executor(None, write)

    def _check_generation_params(self, body: dict[str, Any], t: Target) -> None:
        spec = self.bases[t.base]
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ApiError(400, f"`{key}` must be a positive integer (got {shorten(v)})", key)
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
            raise ApiError(400, f"`n` must be between 1 and {spec.max_n} (got {shorten(n)})", "n")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise ApiError(400, "`stream_options` must be an object", "stream_options")
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
                    400,
                    f"response_format: not a valid JSON schema: {shorten(e.message, 200)}",
                    "response_format",
                ) from None

    async def _dispatch(self, engine_model: str, call: str, body: Any, rid: str):
        from ray.serve.exceptions import BackPressureError

        handle = self._get_configured_serve_handle(engine_model)
        gen = getattr(handle, call).remote(body, RawRequestInfo(headers={"x-request-id": rid}))
        try:
            first = await gen.__anext__()
        except BackPressureError:
            metrics.shed.inc(tags={"reason": "engine_queue_full"})
            raise ApiError(
                503,
                f"{engine_model.split(':')[0]} is at capacity (its queue is full); retry shortly",
                code="overloaded",
                headers={"Retry-After": "2"},
            ) from None
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, BackPressureError):
                metrics.shed.inc(tags={"reason": "engine_queue_full"})
                raise ApiError(
                    503,
                    "the model is at capacity; retry shortly",
                    code="overloaded",
                    headers={"Retry-After": "2"},
                ) from None
            if isinstance(cause, AdapterLoadError):
                raise ApiError(503, public_reason(cause), "model", "adapter_unavailable") from None
            if "Failed to load lora model" in str(cause):
                raise ApiError(
                    503,
                    f"adapter {engine_model} cannot be loaded: {public_reason(cause)}",
                    "model",
                    "adapter_unavailable",
                ) from None
            raise
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse):
            status = int(head.error.code or 400)
            raise ApiError(
                status if 400 <= status < 600 else 400, public_reason(head.error.message)
            )
        return first, gen

    # ---------------------------------------------------------------- endpoints

    async def models(self, request: Request) -> Response:
        key = self._key(request)
        return JSONResponse(
            {"object": "list", "data": [c for c in self._cards() if allowed(key, c["id"])]}
        )

    async def model_data(self, model: str, request: Request) -> Response:
        key = self._key(request)
        card = next((c for c in self._cards() if c["id"] == model), None)
        if card is None or not allowed(key, model):
            return ApiError(
                404, f"model {shorten(model)} not found", "model", "model_not_found"
            ).response()
        return JSONResponse(card)

    def _cards(self) -> list[dict[str, Any]]:
        def card(id: str, parent: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
            out = {"id": id, "object": "model", "created": 0, "owned_by": "loraplex"}
            if parent:
                out["parent"] = parent
            return {**out, "metadata": metadata}

        cards = [
            card(m.id, None, {"kind": "base", "max_model_len": m.max_model_len})
            for m in self.config.models
        ]
        cards += [
            card(
                name,
                a.base,
                {"kind": "adapter", "registry": a.registry}
                | (
                    {"canary": {"registry": a.canary.registry, "percent": a.canary.percent}}
                    if a.canary
                    else {}
                ),
            )
            for name, a in self.adapters.items()
        ]
        for r in self.config.routes:
            retrieval = r.retrieval.model_dump(exclude_none=True) if r.retrieval else None
            meta = {
                "kind": "route",
                "base": r.base,
                "adapter": r.adapter,
                "retrieval": retrieval,
                "task": r.task,
            }
            cards.append(card(r.name, r.base, meta))
        return cards

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def canaries(self, request: Request) -> Response:
        """``GET /v1/canaries``: each canary the key may reach (through its adapter or a
        route using it), its split, state and this replica's window of both versions."""
        key = self._key(request)
        data = []
        for adapter_id in sorted(set(self.canaries) | set(self.shadows)):
            spec = self.adapters[adapter_id]
            names = [adapter_id] + [
                r.name for r in self.config.routes if f"{r.base}:{r.adapter}" == adapter_id
            ]
            if not any(allowed(key, n) for n in names):
                continue
            try:
                stable = await self.resolver.resolve(spec.registry)
            except (InputError, RegistryUnavailable) as e:
                stable = None
                log.warning("canary status: %s: %s", spec.registry, e)
            entry: dict[str, Any] = {
                "adapter": adapter_id,
                "stable": {"registry": spec.registry, "version": stable[1] if stable else None},
                "canary": None,
                "shadow": None,
            }
            watch = self.canaries.get(adapter_id)
            if watch is not None:
                canary = await self._canary_version(watch)
                entry["canary"] = {
                    "registry": watch.spec.registry,
                    "version": canary[1] if canary else None,
                    "percent": watch.spec.percent,
                    "sticky_by": watch.spec.sticky_by,
                }
                entry |= {
                    "state": watch.state(canary is not None and canary == stable),
                    "reason": watch.halted,
                    "window_s": watch.spec.rollback.window_s,
                    "window": {arm: s.as_dict() for arm, s in watch.stats().items()},
                }
            shadow = self.shadows.get(adapter_id)
            if shadow is not None:
                entry["shadow"] = {
                    "registry": shadow.spec.registry,
                    "percent": shadow.spec.percent,
                    "window_s": shadow.spec.window_s,
                    **shadow.stats(),
                }
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(self, request: Request) -> Response:
        try:
            key = self._key(request)
            if not allowed(key, EMBEDDINGS):
                raise ApiError(
                    403, "this API key may not use embeddings", "model", "permission_denied"
                )
            body = await _json_body(request)
            if self.retriever is None:
                raise ApiError(404, "this server has no embedding model (retriever: null)", "model")
            async with asyncio.timeout(self.config.timeouts.retrieval_s):
                status, content = await self.retriever.openai_embeddings.remote(body)
        except TimeoutError:
            metrics.shed.inc(tags={"reason": "embeddings_deadline"})
            return ApiError(504, "the embedding model did not answer in time").response()
        except ApiError as e:
            return e.response()
        return JSONResponse(content, status_code=status)

    async def _generate(self, request: Request, call: str) -> Response:
        rid = uuid.uuid4().hex
        request.state.rid = rid
        started = time.perf_counter()
        deadline = time.monotonic() + self.config.http.request_timeout_s
        tags = {"route": "unknown", "adapter": "none"}
        key: dict[str, Any] = {"name": "unknown"}
        picked: list[Pick] = []  # set by _answer once the engine model is chosen
        try:
            key = self._key(request)
            async with asyncio.timeout(self.config.http.request_timeout_s):
                response = await self._answer(
                    request, call, key, rid, tags, started, deadline, picked
                )
        except TimeoutError:
            self._observe(picked[0] if picked else None, 504, None, None)
            metrics.shed.inc(tags={"reason": "deadline"})
            response = ApiError(
                504,
                f"no answer within the request deadline ({self.config.http.request_timeout_s:g} s)",
                code="timeout",
            ).response()
        except ApiError as e:
            self._observe(picked[0] if picked else None, e.status, None, None)
            metrics.errors.inc(tags={**tags, "status": str(e.status)})
            log.info(
                "[%s] key %s: %s %s -> %d %s",
                rid,
                key["name"],
                call,
                tags["route"],
                e.status,
                e.message,
            )
            response = e.response()
        response.headers[RID_HEADER] = rid
        return response

    async def _answer(
        self,
        request: Request,
        call: str,
        key: dict[str, Any],
        rid: str,
        tags: dict[str, str],
        started: float,
        deadline: float,
        picked: list[Pick],
    ) -> Response:
        client_rid = shorten(request.headers.get("x-request-id") or "", 80)
        body = await _json_body(request)
        t = self._target(body.get("model"))
        tags["route"] = t.name
        if not allowed(key, t.name):
            raise ApiError(
                403, f"this API key may not use {t.name!r}", "model", "permission_denied"
            )
        override = body.pop("retrieval", None)
        task = body.pop("task", None)
        if task is not None:
            if task not in TASKS:
                raise ApiError(400, f"`task` must be one of {', '.join(TASKS)}", "task")
            t.task = task
        self._check_generation_params(body, t)
        pinned = body.pop("adapter_version", None)
        if pinned is not None:
            pinned = str(pinned)
            if not pinned.isdigit() or pinned.startswith("0") or len(pinned) > 9:
                raise ApiError(400, "`adapter_version` must be a version number", "adapter_version")
        pick = await self._engine_model(t, sticky_id(request.headers, body, key["name"]), pinned)
        engine_model = pick.engine_model
        tags["adapter"] = pick.label
        fmt = body.get("response_format")
        pick.structured = t.task == "json_answer" or (
            isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        )
        picked.append(pick)
        grounded = await self.grounder.ground(
            call,
            body,
            route=t.retrieval,
            system_prompt=t.system_prompt,
            task=t.task,
            key=key,
            override=override,
            rid=rid,
        )
        if self.config.log_prompts:  # off by default: prompts may hold personal data
            log.info("[%s] %s grounded request: %s", rid, t.name, shorten(body, 500))
        if grounded.info.get("latency_ms") is not None:
            metrics.retrieval_latency.observe(grounded.info["latency_ms"] / 1000, tags=tags)
        if call == "chat":
            body["messages"] = grounded.messages
        else:
            body["prompt"] = grounded.prompt
        stream = bool(body.get("stream"))
        client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
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
        first, gen = await self._dispatch(engine_model, call, parsed, rid)
        extra = {"retrieval": {**grounded.info, "route": t.name}}
        limiter = getattr(request.state, "limiter", None)

        def finish(usage: dict[str, Any] | None, fmt: bool | None = None) -> None:
            self._record(key, limiter, tags, usage, started, rid, client_rid)
            if usage is not None:
                self._observe(pick, 200, time.perf_counter() - started, fmt)

        if not stream:
            answered = format_ok(first, pick.structured)
            shadow = self.shadows.get(f"{t.base}:{t.adapter}") if pinned is None else None
            if shadow is not None and pick.arm != CANARY and shadow.take():
                served_s = time.perf_counter() - started
                self._shadow(shadow, t.base, call, parsed, first, pick, served_s, rid)
            return responses.complete(
                first, grounded.sources, extra, lambda usage: finish(usage, answered)
            )
        return StreamingResponse(
            responses.stream(first, gen, grounded.sources, extra, client_usage, deadline, finish),
            media_type="text/event-stream",
        )

    def _record(
        self,
        key: dict[str, Any],
        limiter: Any,
        tags: dict[str, str],
        usage: dict[str, Any] | None,
        started: float,
        rid: str,
        client_rid: str,
    ) -> None:
        """Count the finished request; one log line with the server's request id, the
        key's name and the client's own request id (Serve's proxy makes one when the
        client sends none)."""
        if usage is None:
            metrics.errors.inc(tags={**tags, "status": "499"})
            log.info("[%s] key %s: stream for %s ended early", rid, key["name"], tags["route"])
            return
        elapsed = time.perf_counter() - started
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if limiter is not None:
            limiter.charge(key, prompt + completion)
        metrics.prompt_tokens.inc(prompt, tags=tags)
        metrics.completion_tokens.inc(completion, tags=tags)
        metrics.latency.observe(elapsed, tags=tags)
        log.info(
            "[%s] key %s: %s adapter %s: %d prompt + %d completion tokens in %.2f s "
            "(client request id %s)",
            rid,
            key["name"],
            tags["route"],
            tags["adapter"],
            prompt,
            completion,
            elapsed,
            client_rid,
        )


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
    "embeddings": lambda app: app.post("/v1/embeddings"),
    "canaries": lambda app: app.get("/v1/canaries"),
}
