"""Adapters from the MLflow registry into vLLM: alias resolution and the downloader.

Owns: :class:`AliasResolver` (ingress side: ``json-answer@production`` -> version ``3``,
re-read every ``alias_refresh_s`` so a promotion reaches new requests within that
time) and :class:`RegistryLoraLoader` (replica side: Ray Serve LLM's
``model_downloader``; it downloads ``models:/name/version`` into the adapter cache,
checks the files against the base model, and hands the folder to vLLM). Each version
is its own multiplexed model id, ``<base>:<name>/<version>``, so requests already
running on the old version finish on it while new ones load the new one; Serve's
multiplexing keeps at most ``max_adapters_per_replica`` per replica (LRU).
Does not own: registering or promoting adapters (``loraplex.models.adapters``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from loraplex.config import LoraplexConfig, load_settings
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.models.adapters import parse_registry_ref, validate_adapter
from loraplex.models.resolve import on_this_node
from loraplex.serving import metrics
from loraplex.serving.canary import HALT_TAG, halt_reason
from loraplex.serving.ray_llm import DiskMultiplexConfig, LLMServer, LoraModelLoader, get_lora_id

# the base model's reference in a replica's environment: what a node without the driver's
# folder downloads (set by ``builder``, read by :class:`LoraplexLLMServer`)
BASE_MODEL_ENV = "LORAPLEX_BASE_MODEL"

# A child of Ray Serve's logger: in a replica its lines go to the replica's log file
# with the request id Serve attaches to every record.
log = logging.getLogger("ray.serve.loraplex")


class AdapterLoadError(LoraplexError):
    """An adapter version that cannot be served (missing, corrupted, wrong base)."""


def multiplexed_id(base: str, name: str, version: str) -> str:
    return f"{base}:{name}/{version}"


def _mlflow_client(settings: LoraplexConfig):
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

    def __init__(self, settings: LoraplexConfig, refresh_s: float, timeout_s: float = 5) -> None:
        self.settings = settings
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self._cache: dict[str, tuple[float, str]] = {}
        self._halts: dict[str, tuple[float, str | None]] = {}
        self._client: Any = None

    def _lookup(self, name: str, alias: str | None, version: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            if self._client is None:
                self._client = _mlflow_client(self.settings)
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
            log.info("adapter %s now resolves to version %s (was %s)", ref, got, cached[1])
        self._cache[ref] = (now, got)
        return name, got

    async def halted(self, name: str, version: str) -> str | None:
        """The canary halt recorded on a model version (``canary.HALT_TAG``), re-read every
        ``alias_refresh_s``; while the registry cannot be asked, the last answer stands."""

        ref = f"{name}/{version}#halt"
        now = time.monotonic()
        cached = self._halts.get(ref)
        if cached and now - cached[0] < self.refresh_s:
            return cached[1]

        def read() -> str | None:
            if self._client is None:
                self._client = _mlflow_client(self.settings)
            return halt_reason(self._client.get_model_version(name, version).tags)

        try:
            async with asyncio.timeout(self.timeout_s * 3):
                reason = await asyncio.to_thread(read)
        except Exception as e:  # unreachable: keep what was known
            log.warning("cannot read the canary record of %s/%s: %s", name, version, e)
            reason = cached[1] if cached else None
        self._halts[ref] = (now, reason)
        return reason

    def record_halt(self, name: str, version: str, record: str) -> None:
        """Write a canary halt on its model version (blocking; run it in a thread)."""

        if self._client is None:
            self._client = _mlflow_client(self.settings)
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


class LoadedAdapter(DiskMultiplexConfig):
    """What Serve's multiplexing caches per replica; its eviction is counted."""

    def __del__(self) -> None:  # called by Serve when the LRU evicts this adapter
        # Serve calls this, then sets an instance ``__del__`` that does nothing; Python's
        # garbage collector still calls this class's ``__del__`` later: not an eviction.
        if "__del__" in self.__dict__:
            return
        metrics.adapter_evictions.inc(tags={"adapter": self.model_id})
        log.info("adapter %s evicted from this replica", self.model_id)


class RegistryLoraLoader(LoraModelLoader):
    """Ray Serve LLM ``model_downloader`` that reads the MLflow registry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = load_settings()  # LORAPLEX_* variables set by the builder
        uri = (self.settings.adapters.uri or "").removeprefix("file://")
        # adapters.uri may be an object store; the download cache is always a local folder
        local = Path(uri) if uri and "://" not in uri else None
        self.cache_root = (local or Path(tempfile.gettempdir()) / "loraplex-adapters") / "cache"

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        base_dir = Path(str(llm_config.model_loading_config.model_source))
        started = time.perf_counter()
        path = await asyncio.to_thread(self._fetch, lora_model_id, base_dir)
        metrics.adapter_loads.inc(tags={"adapter": lora_model_id})
        log.info(
            "adapter %s ready from %s in %.2f s",
            lora_model_id,
            path,
            time.perf_counter() - started,
        )
        return LoadedAdapter.model_validate(
            {
                "model_id": lora_model_id,
                "max_total_tokens": None,
                "local_path": str(path),
                "lora_assigned_int_id": _next_int_id(),
            }
        )

    def _fetch(self, lora_model_id: str, base_dir: Path) -> Path:

        lora = get_lora_id(lora_model_id)
        try:
            name, _, version = parse_registry_ref(lora)
        except ValueError as e:
            raise AdapterLoadError(str(e)) from None
        if version is None:
            raise AdapterLoadError(f"{lora_model_id}: a served adapter id names a version")
        target = self.cache_root / name / version
        if not (target / "adapter_config.json").exists():
            self._download(name, version, target)
        try:
            validate_adapter(target, base_dir)
        except InputError as e:
            shutil.rmtree(target, ignore_errors=True)  # fetched again on the next request
            raise AdapterLoadError(
                f"adapter {name} version {version} cannot be served: {e}"
            ) from None
        return target

    def _download(self, name: str, version: str, target: Path) -> None:
        import mlflow

        client = _mlflow_client(self.settings)
        try:
            source = client.get_model_version(name, version).source
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}-") as tmp:
                mlflow.set_tracking_uri(self.settings.mlflow.tracking_uri)
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
                if not (got / "adapter_config.json").exists():
                    nested = [p.parent for p in got.rglob("adapter_config.json")]
                    got = nested[0] if nested else got
                got.rename(target)
        except OSError as e:
            if target.exists():  # another download of the same version won the race
                return
            raise AdapterLoadError(
                f"adapter {name} version {version}: cannot download ({e})"
            ) from None
        except Exception as e:
            raise AdapterLoadError(
                f"adapter {name} version {version}: cannot download ({first_line(e)})"
            ) from None


class LoraplexLLMServer(LLMServer):
    """Ray Serve LLM's ``LLMServer`` with two changes.

    - The base model reaches the replica from wherever it runs: the driver's folder
      where this node sees it, else the registry version (``models:/...``) downloaded
      into this node's cache before vLLM starts (Ray Serve LLM itself knows hub ids and
      object-store mirrors, not the MLflow registry).
    - The first requests to an adapter that arrive together load it into vLLM once.
      Upstream, each request checks "is it loaded?" and then loads it, so concurrent
      first requests raced and all but one failed with "has already been loaded"
      (measured: 3 of 80 answers of an evaluation at concurrency 4)."""

    async def start(self) -> None:
        loading = self._llm_config.model_loading_config
        ref = os.environ.get(BASE_MODEL_ENV) or str(loading.model_source)
        folder = await asyncio.to_thread(
            on_this_node, str(loading.model_source), ref, load_settings()
        )
        if str(folder) != str(loading.model_source):
            log.info("base model %s downloaded to this node: %s", ref, folder)
            loading.model_source = str(folder)
        await super().start()

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return
        locks: dict[str, asyncio.Lock] = self.__dict__.setdefault("_loraplex_locks", {})
        async with locks.setdefault(model_id, asyncio.Lock()):
            await super()._maybe_resolve_lora_from_multiplex()


_int_ids = iter(range(1, 1 << 30))


def _next_int_id() -> int:
    return next(_int_ids)
