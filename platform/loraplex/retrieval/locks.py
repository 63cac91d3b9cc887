"""The per-collection ingest lock: one ingest (or delete) of a collection at a time.

Owns: :class:`IngestLock`. Within a process a lock per collection serialises ingests
(the Retriever deployment may run several). Across processes Milvus Lite needs no more:
its data dir admits one process (``store.check_lite_lock``). A Milvus server is shared
by every machine that ingests, so there the lock is a lease: a row per collection in
the collection ``loraplex_ingest_locks`` (holder, token, expiry), taken with Fischer's
timed mutual exclusion (read it free, write our token, wait longer than a write takes,
read it back: still ours means held), renewed by a background thread while the ingest
runs and deleted when it ends. A holder killed with SIGKILL stops renewing and its
lease lapses after ``ttl_s``; one that stalls past its lease and finds the row taken
stops writing (:meth:`IngestLock.check`). Does not own: what an ingest writes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from loraplex.errors import InputError, LoraplexError, first_line

LOCKS = "loraplex_ingest_locks"
TTL_S = 60.0
SETTLE_S = 0.5  # longer than one read-then-write of the lock row takes

log = logging.getLogger(__name__)
_local_guard = threading.Lock()
_local: dict[str, threading.Lock] = {}


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class IngestLock:
    """``with IngestLock(store, "kb"):`` holds collection ``kb`` for one writer."""

    def __init__(
        self,
        store: Any,
        collection: str,
        wait_s: float = 0.0,
        ttl_s: float = TTL_S,
        settle_s: float = SETTLE_S,
        remote: bool | None = None,
    ) -> None:
        self.store = store
        self.collection = collection
        self.wait_s = wait_s
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        milvus = getattr(store, "milvus", None)
        self.remote = (milvus is not None and not milvus.is_lite) if remote is None else remote
        self.token = uuid.uuid4().hex
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} (since {started})"
        self._local = self._local_lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None

    def _local_lock(self) -> threading.Lock:
        milvus = getattr(self.store, "milvus", None)
        where = f"{milvus.uri}/{milvus.db_name}" if milvus is not None else id(self.store.client)
        key = f"{where}:{self.collection}"
        with _local_guard:
            return _local.setdefault(key, threading.Lock())

    # -- taking and giving back --------------------------------------------------

    def __enter__(self) -> IngestLock:
        if self.wait_s > 0:
            acquired = self._local.acquire(timeout=self.wait_s)
        else:
            acquired = self._local.acquire(blocking=False)
        if not acquired:
            raise InputError(
                f"collection {self.collection!r} is being ingested by another request of "
                "this process; try again when it is done"
            )
        try:
            if self.remote:
                self._acquire()
                self._renewer = threading.Thread(
                    target=self._renew, name=f"ingest-lock-{self.collection}", daemon=True
                )
                self._renewer.start()
        except BaseException:
            self._local.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.remote:
                self._stop.set()
                if self._renewer is not None:
                    self._renewer.join(timeout=5)
                row = self._read()
                if row is not None and row["token"] == self.token:
                    self._call("delete", self.store.client.delete, LOCKS, ids=[self.collection])
        finally:
            self._local.release()

    def check(self) -> None:
        """Raise when the lease was lost (the ingest stops writing)."""
        if self.lost:
            raise LoraplexError(
                f"lost the ingest lock of collection {self.collection!r} to {self.lost}; "
                "stopped before writing more: run the ingest again when that one is done"
            )

    # -- the lease row -----------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise LoraplexError(
                f"Milvus {what} of the ingest lock failed: {first_line(e)}"
            ) from None

    def _ensure_table(self) -> None:
        client = self.store.client
        if client.has_collection(LOCKS):
            return
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        s.add_field("token", DataType.VARCHAR, max_length=64)
        s.add_field("holder", DataType.VARCHAR, max_length=512)
        s.add_field("expires_ms", DataType.INT64)
        s.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants one vector field
        idx = client.prepare_index_params()
        idx.add_index(field_name="v", index_type="FLAT", metric_type="L2")
        try:
            client.create_collection(LOCKS, schema=s, index_params=idx)
        except Exception as e:
            if not client.has_collection(LOCKS):  # not a concurrent creation: a failure
                raise LoraplexError(
                    f"cannot create the ingest lock collection: {first_line(e)}"
                ) from None
        self._call("load", client.load_collection, LOCKS)

    def _read(self) -> dict | None:
        rows = self._call(
            "read",
            self.store.client.query,
            LOCKS,
            filter=f"id == {_quote(self.collection)}",
            output_fields=["token", "holder", "expires_ms"],
            consistency_level="Strong",
        )
        return rows[0] if rows else None

    def _write(self) -> None:
        row = {
            "id": self.collection,
            "token": self.token,
            "holder": self.holder,
            "expires_ms": int((time.time() + self.ttl_s) * 1000),
            "v": [0.0, 0.0],
        }
        self._call("write", self.store.client.upsert, LOCKS, [row])

    def _acquire(self) -> None:
        self._ensure_table()
        deadline = time.monotonic() + self.wait_s
        while True:
            row = self._read()
            now_ms = time.time() * 1000
            if row is None or row["expires_ms"] < now_ms or row["token"] == self.token:
                self._write()
                time.sleep(self.settle_s)
                row = self._read()
                if row is not None and row["token"] == self.token:
                    return
                continue  # another ingest took it in the same moment
            left = deadline - time.monotonic()
            if left <= 0:
                ends = max(0.0, (row["expires_ms"] - now_ms) / 1000)
                raise InputError(
                    f"collection {self.collection!r} is being ingested by {row['holder']} "
                    f"(its lease ends within {ends:.0f} s unless renewed); wait for it or "
                    "raise retrieval.ingest_lock_wait_s"
                )
            time.sleep(min(1.0, left))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                row = self._read()
                if row is None or row["token"] != self.token:
                    self.lost = row["holder"] if row else "nobody (the lease row was removed)"
                    log.warning("lost the ingest lock of %r to %s", self.collection, self.lost)
                    return
                self._write()
            except LoraplexError as e:  # a blip: the lease lasts ttl_s, try again
                log.warning("could not renew the ingest lock of %r: %s", self.collection, e)
