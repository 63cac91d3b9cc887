"""The node-local disk tier of the adapter cache: registry versions kept on this node's
disk within a byte budget, shared by every replica on the node.

Owns: :class:`AdapterDiskCache`. ``get(name, version, fetch)`` returns the folder of a
version: a hit when every file still has the SHA-256 recorded when it was fetched (a
damaged or half-deleted folder is a miss and is fetched again), else ``fetch`` fills a
temporary folder that is renamed into place (never a half-written version under its
name). Least-recently-used versions go first when a new one would pass the budget,
except versions a live process on this node holds loaded (its pin file,
``.pins/<pid>``): vLLM may read their files again. Bookkeeping runs under a file lock on
the cache folder, so replicas on one node never evict what another is placing; the
fetches themselves run outside it, in parallel. Also :func:`download_version` (a
version's PEFT files from the MLflow registry into a folder: the fetch the replicas and
:func:`prefetch` use) and :func:`prefetch` (a Ray task that puts a version into one
node's disk cache: run on every node when an alias moves, before traffic does). Does not
own: checking the files against the base model (``models.adapters.validate_adapter``),
the metrics of a replica's loads (``serving.adapters``) or the engine's tiers
(``max_adapters_per_batch``, ``max_adapters_per_replica``: vLLM's ``max_loras`` /
``max_cpu_loras``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError, first_line

MANIFEST = ".loraplex-files.json"  # {"files": {relative path: sha256}, "bytes": total}
PINS = ".pins"
STALE_FETCH_S = 3600  # a fetch folder this old belongs to a process that died
log = logging.getLogger("ray.serve.loraplex")


class DiskCacheError(LoraplexError):
    """The disk cache cannot take a version: full of loaded versions, or not writable."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class AdapterDiskCache:
    """``root/<name>/<version>/`` folders, at most ``budget_bytes`` of them together."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes

    # ------------------------------------------------------------------ public

    def get(self, name: str, version: str, fetch: Callable[[Path], None]) -> tuple[Path, str]:
        """(folder, how): the version's intact folder, and ``hit`` if it was here, else
        ``miss`` or ``damaged`` (fetched again)."""
        entry = self.root / name / version
        with self._locked():
            if self._intact(entry):
                os.utime(entry / MANIFEST)  # most recently used
                return entry, "hit"
            how = "damaged" if entry.exists() else "miss"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".fetch-{name}-{version}-"))
        except OSError as e:
            raise DiskCacheError(
                f"the adapter disk cache cannot be written ({_reason(e)})"
            ) from None
        try:
            fetch(staging)
            size = self._write_manifest(staging)
            with self._locked():
                if self._intact(entry):  # another replica placed it meanwhile
                    return entry, "hit"
                self._make_room(size, entry)
                if entry.exists():
                    log.warning(
                        "adapter %s/%s in the disk cache was damaged: fetched again", name, version
                    )
                    shutil.rmtree(entry)
                entry.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(entry)
            return entry, how
        except OSError as e:
            raise DiskCacheError(
                f"the adapter disk cache cannot be written ({_reason(e)})"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def pin(self, entry: Path) -> None:
        """This process holds ``entry`` loaded: it is not evicted until :meth:`unpin`."""
        with contextlib.suppress(OSError):
            (entry / PINS).mkdir(exist_ok=True)
            (entry / PINS / str(os.getpid())).touch()

    @staticmethod
    def unpin(entry: Path) -> None:
        with contextlib.suppress(OSError):
            (entry / PINS / str(os.getpid())).unlink()

    def held_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    # ------------------------------------------------------------------ inside

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = (self.root / ".lock").open("a")
        except OSError as e:
            raise DiskCacheError(
                f"the adapter disk cache cannot be written ({_reason(e)})"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _write_manifest(folder: Path) -> int:
        files = {
            str(p.relative_to(folder)): _sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        size = sum((folder / f).stat().st_size for f in files)
        (folder / MANIFEST).write_text(json.dumps({"files": files, "bytes": size}))
        return size

    @staticmethod
    def _intact(entry: Path) -> bool:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            return bool(manifest["files"]) and all(
                _sha256(entry / rel) == digest for rel, digest in manifest["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last used) of every version here."""
        out = []
        for manifest in self.root.glob(f"*/*/{MANIFEST}"):
            try:
                size = int(json.loads(manifest.read_text())["bytes"])
                out.append((manifest.parent, size, manifest.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError):
                out.append((manifest.parent, 0, 0.0))  # damaged: first to go
        return out

    def _pinned(self, entry: Path) -> bool:
        pins = entry / PINS
        if not pins.is_dir():
            return False
        alive = False
        for pin in pins.iterdir():
            if pin.name.isdigit() and _alive(int(pin.name)):
                alive = True
            else:  # a process that is gone no longer holds it
                with contextlib.suppress(OSError):
                    pin.unlink()
        return alive

    def _make_room(self, size: int, entry: Path) -> None:
        """Evict least-recently-used, unpinned versions until ``size`` more bytes fit."""
        for stale in self.root.glob(".fetch-*"):  # fetches of a process that died
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_FETCH_S:
                    shutil.rmtree(stale, ignore_errors=True)
        entries = [e for e in self._entries() if e[0] != entry]
        held = sum(s for _, s, _ in entries)
        for folder, bytes_, _ in sorted(entries, key=lambda e: e[2]):
            if held + size <= self.budget_bytes:
                break
            if self._pinned(folder):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            held -= bytes_
            log.info("adapter %s/%s evicted from the disk cache", folder.parent.name, folder.name)
        if held + size > self.budget_bytes:
            raise DiskCacheError(
                f"the adapter disk cache is full: {size / 2**20:.1f} MiB more does not fit its "
                f"{self.budget_bytes / 2**20:.0f} MiB budget beside {held / 2**20:.1f} MiB of "
                "versions loaded on this node"
            )


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def cache_root(settings: LoraplexConfig) -> Path:
    """This node's adapter disk cache: ``adapters.uri``/cache where that is a folder, else
    a folder under the system's temporary directory (an object store is never a cache)."""
    uri = (settings.adapters.uri or "").removeprefix("file://")
    local = Path(uri) if uri and "://" not in uri else None
    return (local or Path(tempfile.gettempdir()) / "loraplex-adapters") / "cache"


def download_version(settings: LoraplexConfig, name: str, version: str, into: Path) -> None:
    """The registry version's PEFT files (``adapter_config.json`` at the top), into
    ``into``; LoraplexError naming the version when they cannot be downloaded."""
    import mlflow
    from mlflow import MlflowClient

    try:
        client = MlflowClient(settings.mlflow.tracking_uri, settings.mlflow.registry_uri)
        source = client.get_model_version(name, version).source
        mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
        staged = into / ".download"
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=staged))
        if not (got / "adapter_config.json").exists():
            nested = [p.parent for p in got.rglob("adapter_config.json")]
            got = nested[0] if nested else got
        for item in got.iterdir():
            item.rename(into / item.name)
        shutil.rmtree(staged, ignore_errors=True)
    except Exception as e:
        raise LoraplexError(
            f"adapter {name} version {version}: cannot download ({first_line(e)})"
        ) from None


def prefetch(settings: dict, root: str, budget_bytes: int, name: str, version: str) -> str:
    """Put ``name/version`` into this node's disk cache (a Ray task: one per node);
    returns how it went (hit, miss, damaged)."""
    conf = LoraplexConfig.model_validate(settings)
    cache = AdapterDiskCache(Path(root), budget_bytes)
    _, how = cache.get(name, version, lambda into: download_version(conf, name, version, into))
    return how
