"""Adapters from the MLflow registry into vLLM: the replica's downloader and server.

Owns: :class:`RegistryLoraLoader` (replica side: Ray Serve LLM's
``model_downloader``; it takes ``models:/name/version`` from the node's disk cache,
``serving.adapter_cache``, downloading it there on a miss, checks the files against the
base model, and hands the folder to vLLM). Each version is its own multiplexed model id,
``<base>:<name>/<version>``, so requests already running on the old version finish on it
while new ones load the new one, and a version re-registered under a name never shares
the engine's name (or its cached prefixes) with another. The tiers, each bounded: vLLM's
batch slots (``max_adapters_per_batch``, ``max_loras``), the replica's host memory
(``max_adapters_per_replica``: Serve's multiplexing LRU and vLLM's ``max_cpu_loras``),
the node's disk (``adapter_cache.disk_gib``), the registry.
Does not own: resolving aliases to versions (``serving.aliases``), registering or
promoting adapters (``loraplex.models.adapters``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from loraplex.config import load_settings
from loraplex.errors import InputError, LoraplexError
from loraplex.models.adapters import MAX_SERVING_RANK, parse_registry_ref, validate_adapter
from loraplex.models.resolve import on_this_node
from loraplex.serving import metrics
from loraplex.serving.adapter_cache import (
    AdapterDiskCache,
    DiskCacheError,
    cache_root,
    download_version,
)
from loraplex.serving.ray_llm import (
    CallbackBase,
    DiskMultiplexConfig,
    LLMServer,
    LoraModelLoader,
    get_lora_id,
)

# the base model's reference in a replica's environment: what a node without the driver's
# folder downloads (set by ``builder``, read by :class:`LoraplexLLMServer`)
BASE_MODEL_ENV = "LORAPLEX_BASE_MODEL"
# the node's adapter disk cache budget in bytes (set by ``builder`` from the config)
DISK_BYTES_ENV = "LORAPLEX_ADAPTER_DISK_BYTES"
DEFAULT_DISK_BYTES = 4 << 30

# A child of Ray Serve's logger: in a replica its lines go to the replica's log file
# with the request id Serve attaches to every record.
log = logging.getLogger("ray.serve.loraplex")


class AdapterLoadError(LoraplexError):
    """An adapter version that cannot be served (missing, corrupted, wrong base)."""


class LoadedAdapter(DiskMultiplexConfig):
    """What Serve's multiplexing caches per replica; its eviction is counted."""

    def __del__(self) -> None:  # called by Serve when the LRU evicts this adapter
        # Serve calls this, then sets an instance ``__del__`` that does nothing; Python's
        # garbage collector still calls this class's ``__del__`` later: not an eviction.
        if "__del__" in self.__dict__:
            return
        AdapterDiskCache.unpin(Path(self.local_path))  # the disk cache may evict it now
        metrics.adapter_evictions.inc(tags={"adapter": self.model_id})
        log.info("adapter %s evicted from this replica", self.model_id)


class RegistryLoraLoader(LoraModelLoader):
    """Ray Serve LLM ``model_downloader`` that reads the MLflow registry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = load_settings()  # LORAPLEX_* variables set by the builder
        budget = int(os.environ.get(DISK_BYTES_ENV) or DEFAULT_DISK_BYTES)
        self.cache = AdapterDiskCache(cache_root(self.settings), budget)

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        base_dir = Path(str(llm_config.model_loading_config.model_source))
        started = time.perf_counter()
        # the engine's own bound: a larger rank is refused here, with the reason
        max_rank = int((llm_config.engine_kwargs or {}).get("max_lora_rank") or MAX_SERVING_RANK)
        path, how = await asyncio.to_thread(self._fetch, lora_model_id, base_dir, max_rank)
        metrics.adapter_loads.inc(tags={"adapter": lora_model_id})
        log.info(
            "adapter %s ready in %.2f s (%s)",
            lora_model_id,
            time.perf_counter() - started,
            "from this node's disk cache" if how == "hit" else f"downloaded: disk cache {how}",
        )
        return LoadedAdapter.model_validate(
            {
                "model_id": lora_model_id,
                "max_total_tokens": None,
                "local_path": str(path),
                "lora_assigned_int_id": _next_int_id(),
            }
        )

    def _fetch(self, lora_model_id: str, base_dir: Path, max_rank: int) -> tuple[Path, str]:

        lora = get_lora_id(lora_model_id)
        try:
            name, _, version = parse_registry_ref(lora)
        except ValueError as e:
            raise AdapterLoadError(str(e)) from None
        if version is None:
            raise AdapterLoadError(f"{lora_model_id}: a served adapter id names a version")
        started = time.perf_counter()
        try:
            target, how = self.cache.get(
                name, version, lambda into: self._download(name, version, into)
            )
        except DiskCacheError as e:
            raise AdapterLoadError(f"adapter {name} version {version}: {e}") from None
        try:
            validate_adapter(target, base_dir, max_rank)
        except InputError as e:
            shutil.rmtree(target, ignore_errors=True)  # fetched again on the next request
            raise AdapterLoadError(
                f"adapter {name} version {version} cannot be served: {e}"
            ) from None
        self.cache.pin(target)  # loaded: kept on disk while this replica holds it
        tier = "disk" if how == "hit" else "registry"
        metrics.adapter_cache.inc(tags={"tier": "disk", "outcome": how, "adapter": name})
        metrics.adapter_load_s.observe(time.perf_counter() - started, tags={"tier": tier})
        metrics.adapter_cache_bytes.set(self.cache.held_bytes(), tags={"tier": "disk"})
        if how == "damaged":
            log.warning("adapter %s: its cached files were damaged, fetched again", lora_model_id)
        return target, how

    def _download(self, name: str, version: str, into: Path) -> None:
        try:
            download_version(self.settings, name, version, into)
        except LoraplexError as e:
            raise AdapterLoadError(str(e)) from None


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


class BaseModelOnThisNode(CallbackBase):
    """Ray Serve LLM's node-initialisation hook, told there is nothing to download.

    Before vLLM starts, Ray Serve LLM runs a task on every node of the replica's placement
    group that imports vLLM and "downloads" the model source (hub ids and object-store
    mirrors; for a folder it does nothing): about 14 s of a replica's start on this
    machine, a fourth process importing vLLM. :meth:`LoraplexLLMServer.start` has already
    put the base model on this node (the driver's folder, else the registry version), so
    the task is skipped."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


_int_ids = iter(range(1, 1 << 30))


def _next_int_id() -> int:
    return next(_int_ids)
