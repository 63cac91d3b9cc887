"""Adapter names in the MLflow registry, resolved for serving: ``json-answer@production``
-> version ``3``.

Owns: :class:`AliasResolver` (the ingress side: an alias re-read every ``alias_refresh_s``
so a promotion reaches new requests within that time, after the new version was
prefetched into the nodes' disk caches (bounded); the last version kept while the
registry is down, canary halts read and written), :class:`RegistryUnavailable`, the
short registry timeouts serving uses, and the multiplexed id of a version
(``<base>:<name>/<version>``). It imports MLflow only, never Ray Serve LLM or vLLM:
``loraplex serve --check`` resolves every adapter with it in seconds.
Does not own: loading an adapter into vLLM (``serving.adapters``), registering or
promoting one (``loraplex.models.adapters``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.models.adapters import parse_registry_ref
from loraplex.serving import metrics
from loraplex.serving.canary import HALT_TAG, halt_reason

log = logging.getLogger("ray.serve.loraplex")
PREFETCH_S = 120  # longest a moved alias waits for its new version to reach the nodes


def multiplexed_id(base: str, name: str, version: str) -> str:
    return f"{base}:{name}/{version}"


def mlflow_client(settings: LoraplexConfig):
    from mlflow import MlflowClient

    if str(settings.mlflow.tracking_uri).startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return MlflowClient(
        tracking_uri=settings.mlflow.tracking_uri, registry_uri=settings.mlflow.registry_uri
    )


class RegistryUnavailable(LoraplexError):
    """The MLflow registry did not answer (as opposed to: it has no such adapter)."""


# MLflow's answers that mean "no such model, version or alias"; anything else (a
# connection refused, a timeout, a 5xx) means the registry cannot be asked right now.
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def short_registry_timeouts(timeout_s: float) -> None:
    """Serving asks the registry with a short timeout and one retry (MLflow's defaults,
    120 s and 7 retries, would hold a request for minutes while the registry is down)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"


class AliasResolver:
    """``name@alias`` / ``name/version`` -> version, with a short cache per alias.

    While the registry cannot be reached, an alias keeps the last version it resolved
    to (logged and counted in ``loraplex_registry_stale``); one never resolved before
    raises :class:`RegistryUnavailable`. Only "no such adapter" is an InputError."""

    def __init__(
        self,
        settings: LoraplexConfig,
        refresh_s: float,
        timeout_s: float = 5,
        prefetch: Callable[[str, str], Awaitable[None]] | None = None,
        prefetch_s: float = PREFETCH_S,
    ) -> None:
        self.settings = settings
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        # an alias that moves keeps its old version until ``prefetch`` (the new version
        # on every node's disk) is done, or ``prefetch_s`` passed
        self.prefetch = prefetch
        self.prefetch_s = prefetch_s
        self._moving: dict[str, asyncio.Task] = {}
        self._cache: dict[str, tuple[float, str]] = {}
        self._halts: dict[str, tuple[float, str | None]] = {}
        self._halted_here: dict[str, str] = {}  # halted by this replica: for good
        self._client: Any = None

    def _lookup(self, name: str, alias: str | None, version: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            if self._client is None:
                self._client = mlflow_client(self.settings)
            if alias is not None:
                return str(self._client.get_model_version_by_alias(name, alias).version)
            return str(self._client.get_model_version(name, version).version)
        except MlflowException as e:
            first = first_line(e, 200)
            if e.error_code in NOT_FOUND_CODES:
                raise InputError(
                    f"adapter {name}@{alias or version} is not in the registry: {first}"
                ) from None
            raise RegistryUnavailable(f"the MLflow registry cannot be reached: {first}") from None
        except Exception as e:  # connection refused, timeouts, a broken store
            raise RegistryUnavailable(
                f"the MLflow registry cannot be reached: {first_line(e, 200)}"
            ) from None

    async def resolve(self, ref: str) -> tuple[str, str]:
        """(registered name, version); InputError when the registry has no such version,
        RegistryUnavailable when it cannot be asked and nothing was resolved before."""
        name, alias, version = parse_registry_ref(ref)
        if version is not None:
            return name, version
        now = time.monotonic()
        cached = self._cache.get(ref)
        if cached and now - cached[0] < self.refresh_s:
            return name, cached[1]
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                got = await asyncio.to_thread(self._lookup, name, alias, None)
        except (RegistryUnavailable, TimeoutError) as e:
            if cached is None:
                if isinstance(e, TimeoutError):
                    raise RegistryUnavailable(
                        f"the MLflow registry did not answer within {self.timeout_s * 3:g} s"
                    ) from None
                raise
            metrics.registry_stale.inc(tags={"adapter": ref})
            log.warning("registry unreachable; %s keeps serving version %s (%s)", ref, cached[1], e)
            self._cache[ref] = (now, cached[1])  # ask again after refresh_s, not every request
            return name, cached[1]
        if cached and cached[1] != got:
            if self.prefetch is not None and not self._prefetched(ref, name, got):
                self._cache[ref] = (now, cached[1])  # the move waits for the prefetch
                return name, cached[1]
            log.info("adapter %s now resolves to version %s (was %s)", ref, got, cached[1])
        self._cache[ref] = (now, got)
        return name, got

    def _prefetched(self, ref: str, name: str, version: str) -> bool:
        """Whether the new version of a moved alias is ready on the nodes' disks; the first
        call starts the prefetch, which moves the alias itself when it ends."""
        move = f"{ref}->{version}"
        task = self._moving.get(move)
        if task is not None:
            return task.done()
        assert self.prefetch is not None

        async def run() -> None:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.prefetch_s):
                    await self.prefetch(name, version)
                log.info(
                    "adapter %s version %s prefetched in %.1f s: traffic moves to it",
                    ref,
                    version,
                    time.monotonic() - started,
                )
            except Exception as e:  # traffic moves anyway: replicas fetch it on demand
                log.warning("prefetch of %s version %s failed (%s): moving anyway", ref, version, e)
            self._cache[ref] = (time.monotonic(), version)
            if len(self._moving) > 64:  # bounded: old moves are done
                for k in [k for k, t in self._moving.items() if t.done() and k != move]:
                    del self._moving[k]

        log.info(
            "adapter %s moved to version %s: prefetching it before traffic moves", ref, version
        )
        self._moving[move] = asyncio.ensure_future(run())
        return False

    async def halted(self, name: str, version: str) -> str | None:
        """The canary halt recorded on a model version (``canary.HALT_TAG``), re-read every
        ``alias_refresh_s``; while the registry cannot be asked, the last answer stands."""

        ref = f"{name}/{version}#halt"
        if ref in self._halted_here:
            return self._halted_here[ref]
        now = time.monotonic()
        cached = self._halts.get(ref)
        if cached and now - cached[0] < self.refresh_s:
            return cached[1]

        def read() -> str | None:
            if self._client is None:
                self._client = mlflow_client(self.settings)
            return halt_reason(self._client.get_model_version(name, version).tags)

        try:
            async with asyncio.timeout(self.timeout_s * 3):
                reason = await asyncio.to_thread(read)
        except Exception as e:  # unreachable: keep what was known
            log.warning("cannot read the canary record of %s/%s: %s", name, version, e)
            reason = cached[1] if cached else None
        self._halts[ref] = (now, reason)
        return reason

    def note_halt(self, name: str, version: str, reason: str) -> None:
        """This replica halted the version: known here at once and for good (a pinned
        request for it is refused from the next request on, not after ``alias_refresh_s``,
        and a registry read made before the record is written does not undo it)."""
        self._halted_here[f"{name}/{version}#halt"] = reason

    def record_halt(self, name: str, version: str, record: str) -> None:
        """Write a canary halt on its model version (blocking; run it in a thread)."""

        if self._client is None:
            self._client = mlflow_client(self.settings)
        self._client.set_model_version_tag(name, version, HALT_TAG, record)

    def tags(self, ref: str) -> dict[str, str]:
        """The model version's tags (blocking; start-up checks)."""
        name, alias, version = parse_registry_ref(ref)
        resolved = self._lookup(name, alias, version)
        return dict(self._client.get_model_version(name, resolved).tags or {})

    def check(self, ref: str) -> str:
        """Blocking variant for start-up checks."""
        name, alias, version = parse_registry_ref(ref)
        return self._lookup(name, alias, version)
