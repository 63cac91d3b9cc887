"""The OpenAI-compatible front door, composed of one small class per concern.

Owns: :class:`LoraplexIngress`, a subclass of Ray Serve LLM's ``OpenAiIngress`` (which
keeps the handles to the ``LLMServer`` deployments and routes adapter requests through
Serve's multiplexing), composed as Ray Serve LLM composes its ingress mixins, each
carrying its own routes: ``catalog`` (what ``model`` names, ``/v1/models``),
``rollout`` (alias -> version, canary, shadow, ``/v1/canaries``), ``engine`` (the
engine call and its error mapping) and ``accounting`` (tokens charged, metrics, the log
line). What is left here is the order of one request, within its deadline: read and
check the body (``requests``), resolve ``model`` within the key's scope, pick the
version, ground it (``grounding``: the route's retrieval narrowed by the key and the
body), call the engine and hand the answer to ``responses``; every error is an
OpenAI-shaped JSON body with a reason (``errors.ApiError``). The key itself, the body
size and the key's limits are checked before any of this, by the ``gate`` middleware.
Does not own: the engine (vLLM in ``LLMServer``), adapter downloads
(``adapters.RegistryLoraLoader``) or search (the Retriever deployment).

Response extensions (documented in docs/http-api.md):
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
import logging
import time
import uuid
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from loraplex.config import LoraplexConfig
from loraplex.serving import metrics, requests, responses
from loraplex.serving.accounting import AccountingMixin, charge_embeddings
from loraplex.serving.adapter_cache import cache_root, prefetch
from loraplex.serving.aliases import AliasResolver, short_registry_timeouts
from loraplex.serving.canary import CanaryWatch, ShadowWatch, format_ok, sticky_id, supported
from loraplex.serving.catalog import CatalogMixin, allowed, key_of
from loraplex.serving.config import EMBEDDINGS, ServingConfig
from loraplex.serving.engine import PAST_CONTEXT, EngineMixin
from loraplex.serving.errors import ApiError, shorten
from loraplex.serving.gate import refuse_open_anonymous
from loraplex.serving.grounding import Grounder
from loraplex.serving.ray_llm import ChatCompletionRequest, CompletionRequest, OpenAiIngress
from loraplex.serving.rollout import Pick, RolloutMixin

# A child of Ray Serve's logger: in a replica its lines go to the replica's log file
# with the request id Serve attaches to every record.
log = logging.getLogger("ray.serve.loraplex")
RID_HEADER = "x-loraplex-request-id"
# a moved alias's new version into one node's disk cache (no CPU reserved: it must run
# beside replicas that hold every CPU)
PREFETCH_TASK = ray.remote(num_cpus=0, max_retries=1)(prefetch)


class LoraplexIngress(CatalogMixin, RolloutMixin, EngineMixin, AccountingMixin, OpenAiIngress):
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
        special_tokens: dict[str, list[str]] | None = None,
        canary_secret: bytes = b"",
    ) -> None:
        if anonymous:
            refuse_open_anonymous()
        super().__init__(llm_deployments, model_cards, lora_paths=None)
        self.config = ServingConfig.model_validate(serving)
        self.settings = LoraplexConfig.model_validate(settings)
        short_registry_timeouts(self.config.timeouts.registry_s)
        self.resolver = AliasResolver(
            self.settings,
            self.config.alias_refresh_s,
            self.config.timeouts.registry_s,
            prefetch=self._prefetch_on_every_node,
        )
        self.grounder = Grounder(
            retriever, self.settings.retrieval.collection, self.config.timeouts.retrieval_s
        )
        self.retriever = retriever
        # each base model's control tokens, escaped in the passages its prompts carry
        self.special_tokens = special_tokens or {}
        self.bases = {m.id: m for m in self.config.models}
        self.adapters = {f"{a.base}:{a.name}": a for a in self.config.adapters}
        self.routes = {r.name: r for r in self.config.routes}
        self.known_versions = set()  # pinned versions seen to exist
        self.canaries = {
            name: CanaryWatch(name, a.canary, canary_secret)
            for name, a in self.adapters.items()
            if a.canary
        }
        self.shadows = {
            name: ShadowWatch(name, a.shadow) for name, a in self.adapters.items() if a.shadow
        }
        self._background = set()  # shadow requests in flight
        log.info(
            "loraplex ingress ready: %d base model(s), %d adapter(s), %d route(s)",
            len(self.bases),
            len(self.adapters),
            len(self.routes),
        )

    async def _prefetch_on_every_node(self, name: str, version: str) -> None:
        """A moved alias's new version into the disk cache of every live node (a Ray task
        pinned to each), before requests move to it."""
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = [
            PREFETCH_TASK.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(
                self.settings.model_dump(mode="json"),
                str(cache_root(self.settings)),
                int(self.config.adapter_cache.disk_gib * 2**30),
                name,
                version,
            )
            for node in nodes
        ]
        outcomes = await asyncio.gather(*refs)
        log.info("adapter %s/%s on %d node(s)' disks: %s", name, version, len(nodes), outcomes)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        try:
            key = key_of(request)
            if not allowed(key, EMBEDDINGS):
                raise ApiError(
                    403, "this API key may not use embeddings", "model", "permission_denied"
                )
            body = await requests.json_body(request)
            if self.retriever is None:
                raise ApiError(404, "this server has no embedding model (retriever: null)", "model")
            async with asyncio.timeout(self.config.timeouts.retrieval_s):
                status, content = await self.retriever.openai_embeddings.remote(body)
            charge_embeddings(key, getattr(request.state, "limiter", None), content)
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
        sent: list[str] = []  # the base model, once the engine has the request
        try:
            key = key_of(request)
            async with asyncio.timeout(self.config.http.request_timeout_s):
                response = await self._answer(
                    request, call, key, rid, tags, started, deadline, picked, sent
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
            self._count_error(key, call, tags, e.status, e.message, rid)
            self._charge_failed(request, key, sent, e.message)
            response = e.response()
        response.headers[RID_HEADER] = rid
        return response

    def _charge_failed(
        self, request: Request, key: dict[str, Any], sent: list[str], message: str
    ) -> None:
        """A prompt the engine refused for passing the context costs the key the context:
        vLLM tokenized that much before refusing (Ray Serve LLM offers no tokenize call to
        count it exactly)."""
        limiter = getattr(request.state, "limiter", None)
        if sent and limiter is not None and PAST_CONTEXT in message:
            limiter.charge(key, self.bases[sent[0]].max_model_len)

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
        sent: list[str],
    ) -> Response:
        client_rid = shorten(request.headers.get("x-request-id") or "", 80)
        body = await requests.json_body(request)
        t = self._target(body.get("model"))
        tags["route"] = t.name
        if not allowed(key, t.name):
            raise ApiError(
                403, f"this API key may not use {t.name!r}", "model", "permission_denied"
            )
        asked = requests.parse(call, body, self.bases[t.base])
        t.task = asked.task or t.task
        if asked.pinned is not None and not key.get("may_pin_versions"):
            raise ApiError(
                403,
                "this API key may not pin adapter versions (its may_pin_versions is off)",
                "adapter_version",
                "permission_denied",
            )
        pick = await self._engine_model(t, sticky_id(request.headers, body, key), asked.pinned)
        tags["adapter"] = pick.label
        pick.structured = t.task == "json_answer" or asked.structured
        picked.append(pick)
        grounded = await self.grounder.ground(
            call,
            body,
            route=t.retrieval,
            system_prompt=t.system_prompt,
            task=t.task,
            key=key,
            override=asked.retrieval,
            rid=rid,
            special_tokens=self.special_tokens.get(t.base, ()),
        )
        if self.config.log_prompts:  # off by default: prompts may hold personal data
            log.info("[%s] %s grounded request: %s", rid, t.name, shorten(body, 500))
        if grounded.info.get("latency_ms") is not None:
            metrics.retrieval_latency.observe(grounded.info["latency_ms"] / 1000, tags=tags)
        if call == "chat":
            body["messages"] = grounded.messages
        else:
            body["prompt"] = grounded.prompt
        if asked.stream:
            # usage in every chunk: a stream cut short is charged for what it was sent
            body["stream_options"] = {
                **(body.get("stream_options") or {}),
                "include_usage": True,
                "continuous_usage_stats": True,
            }
        body["model"] = pick.engine_model
        try:
            parsed = (
                ChatCompletionRequest if call == "chat" else CompletionRequest
            ).model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{where or 'body'}: {err['msg']}", where or None) from None
        metrics.requests.inc(tags={**tags, "endpoint": call})
        sent.append(t.base)
        first, gen = await self._dispatch(pick.engine_model, call, parsed, rid)
        extra = {"retrieval": {**grounded.info, "route": t.name}}
        limiter = getattr(request.state, "limiter", None)

        def finish(
            usage: dict[str, Any] | None, answer: dict[str, Any] | None, early: bool
        ) -> None:
            self._record(key, limiter, tags, usage, started, rid, client_rid, early)
            if usage is None or early:
                return
            fmt = backed = None
            if pick.watch is not None and answer is not None:
                # judged only where it can halt a canary (the check reads every answer);
                # a stream is judged on its whole text once it has ended
                fmt = format_ok(answer, pick.structured)
                backed = supported(answer, grounded.sources)
            self._observe(pick, 200, time.perf_counter() - started, fmt, backed)

        if not asked.stream:
            if asked.pinned is None:
                served_s = time.perf_counter() - started
                self._maybe_shadow(t, pick, call, parsed, first, served_s, rid)
            return responses.complete(first, grounded.sources, extra, finish)
        return StreamingResponse(
            responses.stream(
                first, gen, grounded.sources, extra, asked.client_usage, deadline, finish
            ),
            media_type="text/event-stream",
        )


# method -> route, as Ray Serve LLM's ``make_fastapi_ingress`` takes them; each mixin
# brings its own
ENDPOINTS = {
    **CatalogMixin.ENDPOINTS,
    **RolloutMixin.ENDPOINTS,
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
    "embeddings": lambda app: app.post("/v1/embeddings"),
}
