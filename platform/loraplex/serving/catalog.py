"""What a client may name in ``model``, and the model list it sees.

Owns: :class:`Target` (what ``model`` resolved to: a route, a base model or
``base:adapter``), :func:`allowed` (whether a key may use a name) and
:class:`CatalogMixin`, the ingress's ``GET /v1/models`` and ``GET /v1/models/{id}``,
each listing only what the caller's key may use. Does not own: resolving an adapter's
alias to a registry version (``rollout``) or the key itself (``gate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loraplex.serving.config import AdapterSpec, BaseModelSpec, Route, RouteRetrieval
from loraplex.serving.errors import ApiError, shorten


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

    @property
    def adapter_id(self) -> str:
        """``base:adapter``, the adapter's name in the catalogue (and its canary's key)."""
        return f"{self.base}:{self.adapter}"


def allowed(key: dict[str, Any], model: str) -> bool:
    return "*" in key["models"] or model in key["models"]


def key_of(request: Request) -> dict[str, Any]:
    """The caller's key record, left by the gate middleware."""
    key = getattr(request.state, "key", None)
    if key is None:  # only if the app was assembled without the gate
        raise ApiError(401, "missing API key", code="invalid_api_key")
    return key


class CatalogMixin:
    """Names -> targets, and the model list. Set by the ingress: ``bases``, ``adapters``
    (by ``base:adapter``) and ``routes`` (by name)."""

    bases: dict[str, BaseModelSpec]
    adapters: dict[str, AdapterSpec]
    routes: dict[str, Route]

    ENDPOINTS: ClassVar[dict[str, Callable]] = {
        "models": lambda app: app.get("/v1/models"),
        "model_data": lambda app: app.get("/v1/models/{model:path}"),
    }

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

    async def models(self, request: Request) -> Response:
        key = key_of(request)
        return JSONResponse(
            {"object": "list", "data": [c for c in self._cards() if allowed(key, c["id"])]}
        )

    async def model_data(self, model: str, request: Request) -> Response:
        key = key_of(request)
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
            for m in self.bases.values()
        ]
        for name, a in self.adapters.items():
            meta: dict[str, Any] = {"kind": "adapter", "registry": a.registry}
            if a.canary:
                meta["canary"] = {"registry": a.canary.registry, "percent": a.canary.percent}
            cards.append(card(name, a.base, meta))
        for r in self.routes.values():
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
