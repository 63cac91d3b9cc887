"""The Milvus side of retrieval: connecting, the collection schema, writes and searches.

Owns: :func:`connect` (Milvus Lite for a ``.db`` path, a Milvus server for a URI, one
code path after that), the Milvus Lite lock check that names the process holding a
data dir, the documented collection schema, and :class:`KnowledgeStore`: creating
collections, reading what a document already has, upserts, deletes and the dense,
BM25 and hybrid (reciprocal-rank fusion) searches. Milvus errors become one-line
:class:`~loraplex.errors.LoraplexError` s. Does not own: chunking or embedding.

Collection schema (one row per chunk)::

    id            VARCHAR(512)  primary key: "<doc_id>#<position>-<content hash[:12]>"
    doc_id        VARCHAR(512)  the document the chunk belongs to (delete by it)
    position      INT64         the chunk's place in its document
    text          VARCHAR       the chunk as it is (text_match: standard analyzer)
    title         VARCHAR       document title
    heading       VARCHAR       heading path inside the document ("Title > Section")
    source        VARCHAR       the file (or JSONL file) it came from
    start, end    INT64         character offsets of the chunk in the document text
    content_hash  VARCHAR(64)   sha256 of the chunk text
    tenant        VARCHAR       partition key (default "default"): one collection, many teams
    dense         FLOAT_VECTOR  all-MiniLM-L6-v2, 384-d, unit length; HNSW, COSINE
    lexical       VARCHAR       the chunk after ``analysis`` (English: stop words out, stems)
    sparse        SPARSE_FLOAT_VECTOR  made by Milvus's BM25 function from ``lexical``

Collection properties record the schema version, the embedding model and its dimension,
and the analysis (``loraplex.analysis``) its documents were indexed with: queries are
analysed the same way, whatever ``retrieval.language`` says later. Collections made by
schema 1 (BM25 on raw ``text``) keep being written and queried that way.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraplex.config.settings import MilvusSettings, RetrievalSettings
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.retrieval.analysis import LEGACY, analysis_for, analyze
from loraplex.retrieval.locks import LOCKS, IngestLock
from loraplex.retrieval.spec import DEFAULT_TENANT

SCHEMA_VERSION = "2"  # 2: the `lexical` field (analysed text) feeds BM25
PROP_SCHEMA = "loraplex.schema"
PROP_ANALYSIS = "loraplex.analysis"
PROP_MODEL = "loraplex.embedding_model"
PROP_DIM = "loraplex.embedding_dim"
OUTPUT_FIELDS = ["doc_id", "position", "text", "title", "heading", "source", "start", "end"]
MAX_TEXT = 65535
WRITE_BATCH = 256
_QUERY_BATCH = 100
_QUERY_LIMIT = 16384  # Milvus's most rows per query
_POSITIONS = 2048  # positions per page (a position holds few rows: old and new)

log = logging.getLogger(__name__)


def _quiet_pymilvus() -> None:
    """pymilvus logs every failed RPC at ERROR with a traceback, and Milvus Lite's gRPC
    adapter logs the RPCs it does not implement; loraplex reports errors itself, once."""
    import pymilvus  # noqa: F401  (its import configures its loggers; override after)

    for name in ("pymilvus", "pymilvus.milvus_client", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("milvus_lite", "faiss", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- Milvus Lite's one-process-per-data-dir lock ---------------------------------


def lock_holders(data_dir: Path) -> list[str]:
    """'pid N (command)' for each process with the data dir's LOCK file open (Linux)."""
    target = str((data_dir / "LOCK").resolve())
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                        cmd = " ".join(raw.decode(errors="replace").split())[:120]
                        holders.append(f"pid {pid} ({cmd})")
                        break
    return holders


def check_lite_lock(data_dir: Path) -> None:
    """Raise a clear error when another process holds the Milvus Lite data dir."""
    lock = data_dir / "LOCK"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    except OSError:
        pass
    finally:
        os.close(fd)
    holders = lock_holders(data_dir)
    if any(h.startswith(f"pid {os.getpid()} ") for h in holders):
        return  # this process already runs Milvus Lite on it; pymilvus reuses that
    who = ", ".join(holders) or "another process"
    raise LoraplexError(
        f"Milvus Lite data dir {data_dir} is in use by {who}; Milvus Lite admits one "
        "process per data dir: stop that process, or run a Milvus server and set milvus.uri"
    )


# -- connecting ------------------------------------------------------------------

# Milvus Lite runs in-process, one server per data dir shared by every client of this
# process; the last client to close stops it, which frees the data dir for others.
_lite_users: dict[str, int] = {}


def _server_answers(uri: str, timeout: float) -> None:
    parsed = urlparse(uri)
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 19530)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise LoraplexError(
            f"Milvus server at {uri} does not answer ({e.strerror or e}); "
            "start it or fix milvus.uri"
        ) from None


def connect(settings: MilvusSettings):
    """A ``MilvusClient`` for Milvus Lite (``.db`` path) or a Milvus server (URI)."""
    _quiet_pymilvus()
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    uri = str(settings.uri)
    token = settings.token.get_secret_value() if settings.token else ""
    if settings.is_lite:
        data_dir = Path(uri).expanduser().absolute()
        try:
            data_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LoraplexError(f"cannot create {data_dir.parent}: {e.strerror}") from None
        check_lite_lock(data_dir)
        uri = str(data_dir)
    else:
        _server_answers(uri, settings.timeout_s)
    try:
        client = MilvusClient(uri=uri, token=token, timeout=settings.timeout_s)
        if settings.db_name != "default":
            client.use_database(settings.db_name)
    except MilvusException as e:
        raise LoraplexError(f"cannot open Milvus at {uri}: {first_line(e)}") from None
    except Exception as e:  # grpc timeouts and the like surface as several types
        raise LoraplexError(f"cannot open Milvus at {uri}: {first_line(e)}") from None
    if settings.is_lite:
        _lite_users[uri] = _lite_users.get(uri, 0) + 1
    return client


def disconnect(client, settings: MilvusSettings) -> None:
    """Close a client from :func:`connect`; the last one on a Lite data dir frees it."""
    with contextlib.suppress(Exception):
        client.close()
    if not settings.is_lite:
        return
    uri = str(Path(str(settings.uri)).expanduser().absolute())
    _lite_users[uri] = _lite_users.get(uri, 1) - 1
    if _lite_users[uri] <= 0:
        _lite_users.pop(uri, None)
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


# -- the store -------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    score: float
    text: str
    title: str
    heading: str
    source: str
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    rows: int
    model: str
    dimension: int
    analysis: str = LEGACY  # what BM25 sees: see ``analysis``; legacy = raw `text`


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class KnowledgeStore:
    """Chunks in Milvus collections: schema, writes, searches."""

    def __init__(
        self, client, settings: RetrievalSettings, milvus: MilvusSettings | None = None
    ) -> None:
        from pymilvus.exceptions import MilvusException

        self.client = client
        self.milvus = milvus
        self.settings = settings
        # reads (lists, queries, searches) give up instead of hanging on a stalled server;
        # the caller turns the failure into "retrieval unavailable"
        self.read_timeout = (milvus.timeout_s * 2) if milvus is not None else None
        self._error = MilvusException
        self._ready: set[str] = set()
        self._analysis: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="milvus-search")

    @classmethod
    def open(cls, milvus: MilvusSettings, retrieval: RetrievalSettings) -> KnowledgeStore:
        return cls(connect(milvus), retrieval, milvus)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.milvus is not None:
            disconnect(self.client, self.milvus)
            self.milvus = None
        else:
            with contextlib.suppress(Exception):
                self.client.close()

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._error as e:
            raise LoraplexError(f"Milvus {what} failed: {first_line(e)}") from None

    # collections

    def collections(self) -> list[str]:
        names = self._call(
            "list collections", self.client.list_collections, timeout=self.read_timeout
        )
        return sorted(n for n in names if n != LOCKS)  # the ingest locks are not knowledge

    def info(self, name: str) -> CollectionInfo:
        """Details of an existing collection; a one-line error for an unknown one."""
        if name not in self.collections():
            known = ", ".join(self.collections()) or "none yet"
            raise InputError(
                f"unknown collection {name!r} (collections: {known}); create it with "
                f"`loraplex ingest PATH --collection {name}`"
            )
        desc = self._call("describe", self.client.describe_collection, name)
        props = desc.get("properties", {}) or {}
        dim = next((f["params"]["dim"] for f in desc["fields"] if f["name"] == "dense"), None)
        if dim is None or props.get(PROP_SCHEMA) is None:
            raise InputError(
                f"collection {name!r} was not made by loraplex (no dense field/schema)"
            )
        if name not in self._ready:
            self._load(name)
        stats = self._call("statistics", self.client.get_collection_stats, name)
        analysis = props.get(PROP_ANALYSIS, LEGACY)
        self._analysis[name] = analysis
        return CollectionInfo(
            name, int(stats.get("row_count", 0)), props.get(PROP_MODEL, "?"), int(dim), analysis
        )

    def is_open(self, name: str) -> bool:
        """Whether this process has read and loaded the collection already (a dropped
        one is then found by the search that fails)."""
        return name in self._ready and name in self._analysis

    def analysis(self, name: str) -> str:
        """The analysis the collection was built with (its queries use the same)."""
        if name not in self._analysis:
            self.info(name)
        return self._analysis[name]

    def _load(self, name: str) -> None:
        """Load a collection into memory once per process (Milvus needs it for reads)."""
        from pymilvus.client.types import LoadState

        state = self._call("load state", self.client.get_load_state, name)
        if state.get("state") != LoadState.Loaded:
            self._call("load", self.client.load_collection, name)
        self._ready.add(name)

    def ensure(self, name: str, model: str, dimension: int) -> bool:
        """Create the collection if missing (True when created); refuse a model mismatch."""
        if name == LOCKS:
            raise InputError(f"collection name {name!r} is reserved for loraplex's ingest locks")
        if name in self.collections():
            info = self.info(name)
            if info.dimension != dimension or info.model != model:
                raise InputError(
                    f"collection {name!r} holds {info.dimension}-d vectors from {info.model}; "
                    f"the embedder makes {dimension}-d vectors from {model}: use another "
                    "collection (or re-create this one)"
                )
            return False
        self._call("create collection", self._create, name, model, dimension)
        return True

    def _create(self, name: str, model: str, dimension: int) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        s.add_field("doc_id", DataType.VARCHAR, max_length=512)
        s.add_field("position", DataType.INT64)
        s.add_field(
            "text", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True, enable_match=True
        )
        s.add_field("title", DataType.VARCHAR, max_length=1024)
        s.add_field("heading", DataType.VARCHAR, max_length=2048)
        s.add_field("source", DataType.VARCHAR, max_length=2048)
        s.add_field("start", DataType.INT64)
        s.add_field("end", DataType.INT64)
        s.add_field("content_hash", DataType.VARCHAR, max_length=64)
        s.add_field("tenant", DataType.VARCHAR, max_length=128, is_partition_key=True)
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=dimension)
        # BM25 reads `lexical`: the chunk after loraplex's analysis (``analysis``), which
        # Milvus's standard analyzer then only splits on spaces
        s.add_field("lexical", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(
            Function(
                name="lexical_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["lexical"],
                output_field_names=["sparse"],
            )
        )
        idx = self.client.prepare_index_params()
        idx.add_index(
            field_name="dense",
            index_type="HNSW",
            metric_type="COSINE",
            params={
                "M": self.settings.hnsw_m,
                "efConstruction": self.settings.hnsw_ef_construction,
            },
        )
        idx.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        idx.add_index(field_name="doc_id", index_type="INVERTED")
        self.client.create_collection(
            name,
            schema=s,
            index_params=idx,
            properties={
                PROP_SCHEMA: SCHEMA_VERSION,
                PROP_MODEL: model,
                PROP_DIM: str(dimension),
                PROP_ANALYSIS: analysis_for(self.settings.language),
            },
        )

    def drop(self, name: str) -> None:
        self._call("drop collection", self.client.drop_collection, name)

    # writes

    def existing(
        self, name: str, doc_ids: Iterable[str], tenant: str = DEFAULT_TENANT
    ) -> dict[str, dict[str, int]]:
        """doc id -> {chunk id: position} of every row the tenant holds for these
        documents: all of them, read by a query on ``doc_id`` (rows an interrupted or
        concurrent ingest left behind included). Pages are ours, by position: pymilvus's
        query iterator pages with the last id put unescaped into its filter, which an id
        holding a quote breaks."""
        out: dict[str, dict[str, int]] = {}
        where = f"tenant == {_quote(tenant)}"
        for batch in _batches(sorted(set(doc_ids)), _QUERY_BATCH):
            rows = self._query(
                name, f"doc_id in [{', '.join(_quote(d) for d in batch)}] and {where}"
            )
            if len(rows) < _QUERY_LIMIT:
                for r in rows:
                    out.setdefault(r["doc_id"], {})[r["id"]] = int(r["position"])
                continue
            for doc in batch:  # a page too full: each document by ranges of positions
                start, expr = 0, f"doc_id == {_quote(doc)} and {where}"
                while self._query(name, f"{expr} and position >= {start}", limit=1):
                    for r in self._query(
                        name, f"{expr} and position >= {start} and position < {start + _POSITIONS}"
                    ):
                        out.setdefault(doc, {})[r["id"]] = int(r["position"])
                    start += _POSITIONS
        return out

    def _query(self, name: str, expr: str, limit: int = _QUERY_LIMIT) -> list[dict]:
        return self._call(
            "query",
            self.client.query,
            name,
            filter=expr,
            output_fields=["doc_id", "position"],
            limit=limit,
            timeout=self.read_timeout,
        )

    def upsert(self, name: str, rows: list[dict[str, Any]]) -> None:
        analysis = self.analysis(name)
        if analysis != LEGACY:  # what BM25 indexes: the text as the collection analyses it
            rows = [{**r, "lexical": analyze(r["text"], analysis)[:MAX_TEXT]} for r in rows]
        for batch in _batches(rows, WRITE_BATCH):
            self._call("upsert", self.client.upsert, name, batch)

    def flush(self, name: str) -> None:
        """Seal what was written into indexed segments (durable, and fast to search)."""
        self._call("flush", self.client.flush, name)

    def delete_ids(self, name: str, ids: list[str]) -> None:
        # by a filter we quote: pymilvus's ``ids=`` puts ids in its filter unescaped, so
        # an id with a quote (a file named it's "x".md) broke the delete
        for batch in _batches(ids, WRITE_BATCH):
            expr = f"id in [{', '.join(_quote(i) for i in batch)}]"
            self._call("delete", self.client.delete, name, filter=expr)

    def delete_documents(self, name: str, doc_ids: list[str], tenant: str = DEFAULT_TENANT) -> int:
        """Remove every chunk of these documents; the number of chunks removed."""
        self.info(name)
        with IngestLock(self, name, self.settings.ingest_lock_wait_s):
            held = self.existing(name, doc_ids, tenant)
            ids = [cid for chunks in held.values() for cid in chunks]
            self.delete_ids(name, ids)
            if ids:
                self.flush(name)
        return len(ids)

    # searches

    def search(
        self,
        name: str,
        query: str,
        vector: list[float] | None,
        mode: str = "hybrid",
        k: int = 5,
        filter: str = "",
        tenant: str | None = None,
    ) -> list[Hit]:
        """Ranked chunks. ``vector`` (the embedded query) is needed for dense and hybrid."""
        if name not in self._ready:
            self.info(name)
        expr = filter.strip()
        if tenant is not None:
            t = f"tenant == {_quote(tenant)}"
            expr = f"({expr}) and {t}" if expr else t
        dense_param = {"metric_type": "COSINE", "params": {"ef": max(self.settings.hnsw_ef, k)}}
        sparse_param = {"metric_type": "BM25", "params": {}}
        if mode not in ("dense", "bm25", "hybrid"):
            raise InputError(f"unknown search mode {mode!r}; use dense, bm25 or hybrid")
        params = {"dense": dense_param, "bm25": sparse_param}
        # BM25 sees the query as the collection's documents were analysed; a query of
        # stop words only has no term to match: BM25 gets no vote rather than noise
        lexical = analyze(query, self.analysis(name)).strip()

        def route(which: str, limit: int) -> list:
            """One Milvus search: the dense vector field or the BM25 sparse field."""
            if which == "bm25" and not lexical:
                return []
            return self.client.search(
                name,
                data=[vector if which == "dense" else lexical],
                anns_field="dense" if which == "dense" else "sparse",
                limit=limit,
                filter=expr,
                search_params=params[which],
                output_fields=OUTPUT_FIELDS,
                timeout=self.read_timeout,
            )[0]

        # each route brings more candidates than k, so fusion has something to fuse
        pool = max(k * 4, 20)
        try:
            if mode == "hybrid" and self.settings.fusion == "weighted_rrf":
                weight = self._bm25_weight(lexical)
                bm25 = self._pool.submit(route, "bm25", pool)  # both searches at once
                dense = route("dense", pool)
                res = [self._weighted_rrf(dense, bm25.result(), k, weight)]
            elif mode == "hybrid" and not lexical:
                res = [route("dense", k)]
            elif mode == "hybrid":
                from pymilvus import AnnSearchRequest, RRFRanker

                reqs = [
                    AnnSearchRequest([vector], "dense", dense_param, pool, expr=expr or None),
                    AnnSearchRequest([lexical], "sparse", sparse_param, pool, expr=expr or None),
                ]
                res = self.client.hybrid_search(
                    name,
                    reqs,
                    RRFRanker(self.settings.rrf_k),
                    limit=k,
                    output_fields=OUTPUT_FIELDS,
                    timeout=self.read_timeout,
                )
            else:
                res = [route(mode, k)]
        except self._error as e:
            msg = first_line(e)
            if any(w in msg.lower() for w in ("deadline", "timeout", "timed out", "unavailable")):
                raise LoraplexError(f"Milvus search failed: {msg}") from None
            if name not in self.collections():
                self.info(name)  # raises the helpful unknown-collection error
            if filter.strip():
                raise InputError(f"malformed filter expression {filter!r}: {msg}") from None
            raise LoraplexError(f"Milvus search failed: {msg}") from None
        hits = []
        for h in res[0] if res else []:
            e = h["entity"]
            hits.append(
                Hit(
                    chunk_id=str(h["id"]),
                    doc_id=e["doc_id"],
                    # Milvus Lite reports BM25 as a negative distance, a server as a positive score
                    score=abs(float(h["distance"])) if mode == "bm25" else float(h["distance"]),
                    text=e["text"],
                    title=e.get("title", ""),
                    heading=e.get("heading", ""),
                    source=e.get("source", ""),
                    start=int(e.get("start", 0)),
                    end=int(e.get("end", 0)),
                )
            )
        return hits

    def _bm25_weight(self, lexical: str) -> float:
        """BM25's weight in fusion: higher when the query names an identifier (a term
        with a digit: a model code, a version), where exact matching is what counts and
        dense embeddings confuse near-duplicate names; even otherwise."""
        has_identifier = any(any(c.isdigit() for c in t) for t in lexical.split())
        s = self.settings
        return s.identifier_bm25_weight if has_identifier else s.bm25_weight

    def _weighted_rrf(self, dense: list, sparse: list, k: int, bm25_weight: float) -> list[dict]:
        """Reciprocal-rank fusion with a weight per route: sum of w / (rrf_k + rank)."""
        fused: dict[str, dict] = {}
        scores: dict[str, float] = {}
        for weight, hits in ((self.settings.dense_weight, dense), (bm25_weight, sparse)):
            for rank, h in enumerate(hits, 1):
                fused.setdefault(h["id"], h)
                scores[h["id"]] = scores.get(h["id"], 0.0) + weight / (self.settings.rrf_k + rank)
        best = sorted(scores, key=lambda i: -scores[i])[:k]
        return [{**fused[i], "distance": scores[i]} for i in best]
