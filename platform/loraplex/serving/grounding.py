"""Grounding: a request's retrieval (narrowed by its key) and the prompt with its sources.

Owns: :func:`narrow` (the search a request runs: the route's, which a request may only
narrow: a smaller ``top_k``, another mode, an extra filter ANDed to the route's; the
collection and tenant come from the route and the key, and a key with a tenant never
searches outside it), :class:`Grounder` (one step: question -> search with a deadline
-> the rewritten messages or prompt -> public sources and retrieval info), rewriting
the last user turn with the numbered, fenced sources (``loraplex.prompts``, the text
the adapters were trained on), putting a route's system prompt first (a client's own
system messages come after it). Does not own: search (the Retriever deployment), the
prompt wording (``loraplex.prompts``) or the sources' public shape and citations
(``citations``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraplex.errors import InputError, LoraplexError
from loraplex.prompts import Source, question_prompt, ticket_prompt
from loraplex.retrieval.spec import DEFAULT_TENANT, and_filters
from loraplex.serving.citations import public_sources
from loraplex.serving.config import RouteRetrieval
from loraplex.serving.errors import ApiError, public_reason
from loraplex.serving.requests import check_messages

log = logging.getLogger("ray.serve.loraplex")


def message_text(content: Any) -> str:
    """The text of a message's content (a string or OpenAI content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_index(messages: Sequence[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return None


def question_of(messages: Sequence[dict[str, Any]]) -> str:
    i = last_user_index(messages)
    return message_text(messages[i].get("content")).strip() if i is not None else ""


def build_messages(
    messages: list[dict[str, Any]],
    hits: Sequence[dict[str, Any]],
    *,
    system_prompt: str | None = None,
    task: str = "chat",
    special_tokens: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """A copy of ``messages`` with the last user turn carrying the sources/instruction
    and the route's system prompt first (a client's system messages follow it)."""
    out = [dict(m) for m in messages]
    i = last_user_index(out)
    if i is not None:
        out[i]["content"] = user_turn(message_text(out[i]["content"]), hits, task, special_tokens)
    if system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def user_turn(
    text: str,
    hits: Sequence[dict[str, Any]],
    task: str = "chat",
    special_tokens: Sequence[str] = (),
) -> str:
    """The text of the user turn for a route's task, with the numbered sources (the
    served model's ``special_tokens`` escaped in them)."""
    if task == "classify_ticket":
        return ticket_prompt(text)
    if not hits and task == "chat":
        return text
    sources = [Source(h["doc_id"], h["text"]) for h in hits]
    return question_prompt(
        text, sources, json_answer=task == "json_answer", special_tokens=special_tokens
    )


# ------------------------------------------------------------------ the request's side


def narrow(
    route: RouteRetrieval | None,
    key: dict[str, Any],
    override: Any,
    default_collection: str,
) -> RouteRetrieval | None:
    """The search this request runs (None: no retrieval). A request may turn a route's
    retrieval off, lower its ``top_k``, pick a mode and add a filter (ANDed to the
    route's); it may name a collection or tenant only where neither the route nor the
    key fixes one, and never outside the key's collections and tenant."""
    if override is False or (override is None and route is None):
        return None
    if override is not None and not isinstance(override, dict | bool):
        raise ApiError(400, "`retrieval` must be an object (or false to turn it off)", "retrieval")
    asked = override if isinstance(override, dict) else {}
    try:
        request = RouteRetrieval.model_validate({k: v for k, v in asked.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"retrieval.{where}: {err['msg']}", f"retrieval.{where}") from None
    given = {k for k, v in asked.items() if v is not None}
    spec = route.model_copy() if route else RouteRetrieval()
    if "top_k" in given:
        if route is not None and request.top_k > route.top_k:
            raise ApiError(
                400,
                f"retrieval.top_k: at most {route.top_k} on this route (got {request.top_k})",
                "retrieval.top_k",
            )
        spec.top_k = request.top_k
    for name in ("mode", "on_unavailable"):
        if name in given:
            setattr(spec, name, getattr(request, name))
    if request.filter:
        spec.filter = and_filters(spec.filter, request.filter)
    if "collection" in given and request.collection != (spec.collection or default_collection):
        if route is not None:
            raise ApiError(
                403,
                "retrieval.collection: this route searches its own collection; "
                "a request cannot change it",
                "retrieval.collection",
                "permission_denied",
            )
        spec.collection = request.collection
    collection = spec.collection or default_collection
    allowed = key.get("collections") or []
    # a route's own retrieval comes with the route (unless the key lists collections and
    # this is not one); a collection the request picks must be the key's
    by_route = route is not None and not allowed
    if not by_route and "*" not in allowed and collection not in allowed:
        raise ApiError(
            403,
            f"this API key may not search collection {collection!r}",
            "retrieval.collection",
            "permission_denied",
        )
    spec.collection = collection
    # the key's own tenant, else the route's; a key without one reads the default tenant
    # and only a key with tenant "*" may pick (or search across) tenants
    key_tenant = key.get("tenant")
    if key_tenant not in (None, "*"):
        fixed = key_tenant
    elif route is not None and route.tenant is not None:
        fixed = route.tenant
    else:
        fixed = None if key_tenant == "*" else DEFAULT_TENANT
    if "tenant" in given and fixed is not None and request.tenant != fixed:
        raise ApiError(
            403,
            f"retrieval.tenant: this key and route search tenant {fixed!r} only; a request "
            "cannot change it",
            "retrieval.tenant",
            "permission_denied",
        )
    spec.tenant = fixed if fixed is not None else request.tenant
    return spec


@dataclass
class Grounded:
    """What grounding gives the engine and the response."""

    messages: list[dict[str, Any]] | None = None
    prompt: Any = None
    hits: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=lambda: {"status": "off"})

    @property
    def sources(self) -> list[dict[str, Any]]:
        return public_sources(self.hits)


class Grounder:
    """Question -> search (the Retriever deployment, with a deadline) -> prompt."""

    def __init__(self, retriever: Any, default_collection: str, timeout_s: float) -> None:
        self.retriever = retriever
        self.default_collection = default_collection
        self.timeout_s = timeout_s

    async def ground(
        self,
        call: str,
        body: dict[str, Any],
        *,
        route: RouteRetrieval | None,
        system_prompt: str | None,
        task: str,
        key: dict[str, Any],
        override: Any,
        rid: str,
        special_tokens: Sequence[str] = (),
    ) -> Grounded:
        if call == "chat":
            messages = check_messages(body.get("messages"))
            query = question_of(messages)
        else:
            prompt = body.get("prompt")
            if prompt is None:
                raise ApiError(400, "`prompt` is required", "prompt")
            query = prompt if isinstance(prompt, str) else ""
            if system_prompt:  # a completion has no roles to keep the route's prompt apart
                raise ApiError(
                    400,
                    "this route has a system prompt: use /v1/chat/completions",
                    "model",
                )
        spec = narrow(route, key, override, self.default_collection)
        out = Grounded()
        if spec is not None:
            out.hits, out.info = await self._search(spec, query, rid)
        if call == "chat":
            out.messages = build_messages(
                messages,
                out.hits,
                system_prompt=system_prompt,
                task=task,
                special_tokens=special_tokens,
            )
        elif out.hits or task != "chat":
            if not isinstance(body["prompt"], str):
                raise ApiError(
                    400, "routes with retrieval or a task need `prompt` to be a string", "prompt"
                )
            out.prompt = user_turn(body["prompt"], out.hits, task, special_tokens)
        else:
            out.prompt = body["prompt"]
        return out

    async def _search(
        self, spec: RouteRetrieval, query: str, rid: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if self.retriever is None:
            raise ApiError(
                400, "this server has no retriever (serving config: retriever: null)", "retrieval"
            )
        if not query:
            raise ApiError(
                400, "retrieval needs a user message with text to search for", "messages"
            )
        info: dict[str, Any] = {
            "status": "ok",
            "collection": spec.collection,
            "top_k": spec.top_k,
            "mode": spec.mode,
        }
        started = time.perf_counter()
        request = {
            "query": query[:8000],
            "collection": spec.collection,
            "top_k": spec.top_k,
            "mode": spec.mode,
            "filter": spec.filter,
            "tenant": spec.tenant,
        }
        try:
            async with asyncio.timeout(self.timeout_s):
                hits = await self.retriever.search.remote(request)
        except TimeoutError:
            reason = f"no answer from the retriever within {self.timeout_s:g} s"
            return self._unavailable(spec, info, reason, rid)
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, InputError):
                text = str(cause)
                status = 404 if "unknown collection" in text or "does not exist" in text else 400
                raise ApiError(status, public_reason(text), "retrieval") from None
            reason = public_reason(cause)
            if not isinstance(cause, LoraplexError):
                reason = f"{type(cause).__name__}: {reason}"
            return self._unavailable(spec, info, reason, rid)
        info["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return hits, info

    @staticmethod
    def _unavailable(
        spec: RouteRetrieval, info: dict[str, Any], reason: str, rid: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if spec.on_unavailable == "answer_without_context":
            log.warning("[%s] retrieval unavailable, answering without context: %s", rid, reason)
            return [], {**info, "status": "unavailable", "reason": reason}
        raise ApiError(
            503,
            f"retrieval is unavailable: {reason}",
            "retrieval",
            "retrieval_unavailable",
            headers={"Retry-After": "5"},
        )
