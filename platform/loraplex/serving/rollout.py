"""Which adapter version answers a request, and what the rollout learns from it.

Owns: :class:`Pick` (the engine model a request goes to and, for an adapter with a
canary, which arm) and :class:`RolloutMixin`, the ingress's side of rollouts: an
adapter's alias resolved to a registry version (404 for an unknown one, 503 with
``Retry-After`` while the registry cannot answer), a version pinned by the request
(``adapter_version``), the canary's share of requests, the shadow request sent in the
background, each finished request observed into the canary's window (a halt counted,
logged and recorded in MLflow), and ``GET /v1/canaries``. Does not own: the windows,
the split and the halt rule (``canary``) or alias resolution itself
(``aliases.AliasResolver``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loraplex.errors import InputError
from loraplex.models.adapters import parse_registry_ref
from loraplex.serving import metrics
from loraplex.serving.aliases import AliasResolver, RegistryUnavailable, multiplexed_id
from loraplex.serving.canary import (
    CANARY,
    STABLE,
    CanaryWatch,
    Outcome,
    ShadowOutcome,
    ShadowWatch,
    format_ok,
    halt_record,
    texts,
)
from loraplex.serving.catalog import Target, allowed, key_of
from loraplex.serving.config import AdapterSpec, Route
from loraplex.serving.errors import ApiError, public_reason

log = logging.getLogger("ray.serve.loraplex")


@dataclass
class Pick:
    """Which engine model (and, for an adapter with a canary, which side) answers."""

    engine_model: str
    label: str  # adapter name/version for logs and metrics, or "none"
    arm: str | None = None  # STABLE or CANARY when the adapter has a live canary
    watch: CanaryWatch | None = None
    canary: tuple[str, str] | None = None  # the canary's registered name and version
    structured: bool = False  # JSON asked for (task json_answer or a JSON response_format)


def registry_unavailable(e: Exception) -> ApiError:
    return ApiError(503, public_reason(e), "model", "registry_unavailable", {"Retry-After": "10"})


class RolloutMixin:
    """Set by the ingress: ``resolver``, ``adapters`` (by ``base:adapter``), ``routes``,
    ``canaries`` and ``shadows`` (watches by ``base:adapter``), ``known_versions`` and
    ``_background`` (shadow requests in flight); ``_dispatch`` comes from the engine."""

    resolver: AliasResolver
    adapters: dict[str, AdapterSpec]
    routes: dict[str, Route]
    canaries: dict[str, CanaryWatch]
    shadows: dict[str, ShadowWatch]
    known_versions: set[tuple[str, str]]
    _background: set[asyncio.Task]

    ENDPOINTS: ClassVar[dict[str, Callable]] = {
        "canaries_status": lambda app: app.get("/v1/canaries")
    }

    async def _resolve(self, registry: str) -> tuple[str, str]:
        try:
            return await self.resolver.resolve(registry)
        except InputError as e:
            raise ApiError(404, public_reason(e), "model", "model_not_found") from None
        except RegistryUnavailable as e:
            raise registry_unavailable(e) from None

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
                raise registry_unavailable(e) from None
            if await self.resolver.halted(name, pinned):  # a halted canary stays halted
                raise ApiError(
                    403,
                    f"`adapter_version`: version {pinned} of {name} was halted as a canary",
                    "adapter_version",
                    "permission_denied",
                )
            return Pick(multiplexed_id(t.base, name, pinned), f"{name}/{pinned}")
        name, version = await self._resolve(t.registry)
        pick = Pick(multiplexed_id(t.base, name, version), f"{name}/{version}")
        watch = self.canaries.get(t.adapter_id)
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

    def _maybe_shadow(
        self, t: Target, pick: Pick, call: str, parsed: Any, served: Any, served_s: float, rid: str
    ) -> None:
        """A share of the stable version's answered requests goes to the adapter's shadow
        version too."""
        shadow = self.shadows.get(t.adapter_id)
        if shadow is not None and pick.arm != CANARY and shadow.take():
            self._shadow(shadow, t.base, call, parsed, served, pick, served_s, rid)

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
                answer, _ = await self._dispatch(  # type: ignore[attr-defined]
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
        self,
        pick: Pick | None,
        status: int,
        latency_s: float | None,
        fmt: bool | None,
        supported: bool | None = None,
    ) -> None:
        """One finished request of an adapter with a canary, into its window; a halt is
        logged, counted and recorded on the canary's model version."""
        if pick is None or pick.watch is None or pick.arm is None:
            return
        if fmt is False:
            metrics.format_failures.inc(tags={"adapter": pick.label})
        watch = pick.watch
        outcome = Outcome(time.monotonic(), pick.arm, status >= 500, latency_s, fmt, supported)
        reason = watch.record(outcome)
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
        self.resolver.note_halt(name, version, reason)
        record = halt_record(watch.adapter, reason, watch.stats())

        def write() -> None:
            try:
                self.resolver.record_halt(name, version, record)
            except Exception as e:  # this replica has halted it anyway
                log.warning("could not record the halt of %s/%s in MLflow: %s", name, version, e)

        asyncio.get_running_loop().run_in_executor(None, write)

    async def canaries_status(self, request: Request) -> Response:
        """``GET /v1/canaries``: each canary the key may reach (through its adapter or a
        route using it), its split, state and this replica's window of both versions."""
        key = key_of(request)
        data = []
        for adapter_id in sorted(set(self.canaries) | set(self.shadows)):
            names = [adapter_id] + [
                r.name for r in self.routes.values() if f"{r.base}:{r.adapter}" == adapter_id
            ]
            if any(allowed(key, n) for n in names):
                data.append(await self._rollout_entry(adapter_id))
        return JSONResponse({"object": "list", "data": data})

    async def _rollout_entry(self, adapter_id: str) -> dict[str, Any]:
        spec = self.adapters[adapter_id]
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
        return entry
