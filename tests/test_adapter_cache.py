"""The adapter disk cache (``serving.adapter_cache``) on real files and processes: its
byte budget, least-recently-used eviction, checksums that catch a damaged file, pins of
loaded versions, a cache that cannot be written, and two replicas of one node fetching
the same version at once."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.serving.adapter_cache import MANIFEST, AdapterDiskCache, DiskCacheError

MIB = 2**20


class Registry:
    """Stands for the registry download: writes a version's two files, counts fetches."""

    def __init__(self, size: int = MIB) -> None:
        self.size = size
        self.fetches: list[str] = []

    def fetch(self, name: str, version: str):
        def into(folder: Path) -> None:
            self.fetches.append(f"{name}/{version}")
            (folder / "adapter_config.json").write_text(f'{{"name": "{name}/{version}"}}')
            (folder / "adapter_model.safetensors").write_bytes(
                (f"{name}/{version}".encode() * self.size)[: self.size]
            )

        return into


def get(cache: AdapterDiskCache, registry: Registry, version: str) -> tuple[Path, str]:
    return cache.get("answers", version, registry.fetch("answers", version))


def test_the_budget_holds_and_the_least_recently_used_go_first(tmp_path: Path) -> None:
    registry = Registry()
    cache = AdapterDiskCache(tmp_path / "cache", budget_bytes=3 * MIB + 4096)
    assert [get(cache, registry, v)[1] for v in "123"] == ["miss"] * 3
    assert get(cache, registry, "1")[1] == "hit"  # 1 is now the most recently used
    path, how = get(cache, registry, "4")  # over budget: 2 (least recently used) goes
    assert how == "miss" and (path / "adapter_model.safetensors").stat().st_size == MIB
    assert sorted(p.name for p in (tmp_path / "cache" / "answers").iterdir()) == ["1", "3", "4"]
    assert cache.held_bytes() <= cache.budget_bytes
    assert get(cache, registry, "2")[1] == "miss"  # fetched again
    assert registry.fetches == [f"answers/{v}" for v in "12342"]
    assert not list((tmp_path / "cache").glob(".fetch-*"))  # no staging left behind


def test_a_damaged_file_is_detected_and_fetched_again(tmp_path: Path) -> None:
    registry = Registry()
    cache = AdapterDiskCache(tmp_path / "cache", budget_bytes=10 * MIB)
    path, _ = get(cache, registry, "1")
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    damaged = bytearray(good)
    damaged[MIB // 2] ^= 0xFF  # one flipped bit in the middle: same size, same name
    weights.write_bytes(bytes(damaged))
    again, how = get(cache, registry, "1")
    assert (again, how) == (path, "damaged")
    assert weights.read_bytes() == good and len(registry.fetches) == 2
    (path / "adapter_config.json").unlink()  # a file gone is damage too
    assert get(cache, registry, "1")[1] == "damaged"
    (path / MANIFEST).write_text("{not json")  # so is a broken record of the files
    assert get(cache, registry, "1")[1] == "damaged"
    assert get(cache, registry, "1")[1] == "hit"


def test_loaded_versions_stay_and_a_cache_full_of_them_refuses(tmp_path: Path) -> None:
    registry = Registry()
    cache = AdapterDiskCache(tmp_path / "cache", budget_bytes=2 * MIB + 4096)
    one, _ = get(cache, registry, "1")
    two, _ = get(cache, registry, "2")
    cache.pin(one)
    cache.pin(two)
    with pytest.raises(DiskCacheError, match="disk cache is full"):
        get(cache, registry, "3")
    assert one.exists() and two.exists()  # nothing loaded was taken away
    assert not (tmp_path / "cache" / "answers" / "3").exists()
    cache.unpin(one)  # a replica's LRU let version 1 go
    assert get(cache, registry, "3")[1] == "miss"
    assert not one.exists() and two.exists()
    # a pin of a process that is gone holds nothing
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    cache.unpin(two)
    (two / ".pins" / dead).touch()
    assert get(cache, registry, "4")[1] == "miss" and not two.exists()


def test_a_cache_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    cache = AdapterDiskCache(blocker / "cache", budget_bytes=10 * MIB)
    with pytest.raises(DiskCacheError, match="cannot be written"):
        get(cache, Registry(), "1")


def test_a_failed_fetch_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = AdapterDiskCache(tmp_path / "cache", budget_bytes=10 * MIB)

    def broken(folder: Path) -> None:
        (folder / "adapter_config.json").write_text("{}")
        raise RuntimeError("the registry went away mid-download")

    with pytest.raises(RuntimeError, match="went away"):
        cache.get("answers", "1", broken)
    assert not (tmp_path / "cache" / "answers" / "1").exists()
    assert not list((tmp_path / "cache").glob(".fetch-*"))


def _replica(root: str, start, out) -> None:
    registry = Registry(size=8 * MIB)  # big enough that the two fetches overlap
    cache = AdapterDiskCache(Path(root), budget_bytes=64 * MIB)
    start.wait()
    path, how = cache.get("answers", "1", registry.fetch("answers", "1"))
    out.put((os.getpid(), str(path), how, AdapterDiskCache._intact(path)))


def test_two_replicas_of_a_node_fetch_one_version_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(str(tmp_path), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert {path for _, path, _, _ in got} == {str(tmp_path / "answers" / "1")}
    assert all(intact for *_, intact in got)  # each saw a whole version, never half of one
    assert {how for _, _, how, _ in got} <= {"miss", "hit"}
    assert not list(tmp_path.glob(".fetch-*"))
