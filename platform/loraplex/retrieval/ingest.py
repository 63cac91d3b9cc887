"""Ingestion: files -> documents -> chunks -> embeddings -> Milvus, idempotently,
in bounded batches.

Owns: :func:`ingest` and its :class:`IngestSummary`. An ingest runs in two passes.
The first checks, before anything is written: every file named on the command line is
read whole (one that cannot be read stops the run with nothing changed), every
document id (a path's, or a JSONL line's own) is unique and short enough. The second
streams: files are read again one at a time and their documents go through in batches
of about :data:`BATCH_CHUNKS` chunks (read, chunk, compare with what is stored, embed
what changed, write, remove what the documents no longer have), so memory stays flat
in the size of the corpus; unreadable files found inside folders are skipped with their
reason. Per document, every row already stored is found by a query on ``doc_id``:
unchanged chunks are not re-embedded or rewritten, changed ones are upserted, and rows
the document no longer has (rows an interrupted or concurrent ingest left included) are
removed only after the new ones are written, so an ingest killed at any point leaves
each document either as it was, or with its old and new rows side by side, which the
next ingest repairs. Writes hold the collection's :class:`~loraplex.retrieval.locks.IngestLock`.
:func:`delete_documents` removes documents. Does not own: the Milvus schema (``store``)
or reading formats (``readers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from loraplex.config.settings import RetrievalSettings
from loraplex.errors import InputError
from loraplex.retrieval.chunking import Chunk, chunk_document
from loraplex.retrieval.locks import IngestLock
from loraplex.retrieval.readers import (
    FileLimits,
    FoundFile,
    IngestDocument,
    Unreadable,
    find_files,
    read_file,
)
from loraplex.retrieval.spec import DEFAULT_TENANT, TENANT
from loraplex.retrieval.store import MAX_TEXT, KnowledgeStore

MAX_DOC_ID = 400
BATCH_CHUNKS = 4096  # chunks compared, embedded and written together (about 10 MB)


@dataclass
class IngestSummary:
    collection: str
    files: int = 0
    documents: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    created: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        out = [
            f"{'created' if self.created else 'updated'} collection {self.collection!r}: "
            f"{self.files} files, {self.documents} documents; chunks: {self.added} added, "
            f"{self.updated} updated, {self.removed} removed, {self.unchanged} unchanged"
        ]
        out += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return out


def check_files(
    paths: Sequence[str | Path], limits: FileLimits
) -> tuple[list[FoundFile], list[tuple[str, str]]]:
    """The first pass: (files to read, skipped), nothing written. A bad file named
    directly, a clash of document ids or nothing to read is an InputError."""
    found, passed = find_files(paths)
    skipped = [(str(p), reason) for p, reason in passed]
    owner: dict[str, str] = {}
    files: list[FoundFile] = []
    for f in tqdm(found, desc="checking files", unit="file", disable=len(found) < 20):
        if f.named or f.path.suffix.lower() == ".jsonl":  # ids from inside the file
            try:
                ids = [(d.doc_id, d.source) for d in read_file(f, limits)]
            except Unreadable as e:
                if f.named:
                    raise InputError(f"{f.path}: {e}") from None
                skipped.append((str(f.path), str(e)))
                continue
        else:
            ids = [(f.doc_id(), f.label())]
        odd = next((i for i, _ in ids if any(not ch.isprintable() for ch in i)), None)
        if odd is not None:  # a newline or control character in a name: not an id
            reason = f"document id {odd!r} holds a control character (rename it)"
            if f.named:
                raise InputError(f"{f.path!r}: {reason}")
            skipped.append((str(f.path), reason))
            continue
        for doc_id, source in ids:
            if len(doc_id) > MAX_DOC_ID:
                raise InputError(f"{f.path}: document id longer than {MAX_DOC_ID} characters")
            if doc_id in owner:
                raise InputError(
                    f"document id {doc_id!r} comes from both {owner[doc_id]} and {source}; "
                    "rename one of them"
                )
            owner[doc_id] = source
        files.append(f)
    if not files:
        _nothing(paths, skipped)
    return files, skipped


def _nothing(paths: Sequence[str | Path], skipped: list[tuple[str, str]]) -> None:
    reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
    raise InputError(
        f"nothing to ingest in {', '.join(map(str, paths))}" + (f" ({reasons})" if reasons else "")
    )


def embedding_text(chunk: Chunk, title: str) -> str:
    """What the dense model sees: the heading path, so a chunk knows what it is about."""
    context = chunk.heading or title
    return f"{context}\n{chunk.text}" if context and context not in chunk.text[:200] else chunk.text


def ingest(
    paths: Sequence[str | Path],
    collection: str,
    store: KnowledgeStore,
    embed: Callable[[list[str]], list[list[float]]],
    model: tuple[str, int],
    settings: RetrievalSettings,
    tenant: str = DEFAULT_TENANT,
) -> IngestSummary:
    """Check, then read, chunk, compare with what is stored, embed what changed and
    write, a batch at a time."""
    if not re.match(TENANT, tenant):
        raise InputError(
            f"tenant {tenant[:80]!r}: use letters, digits, '.', '_' or '-' (128 at most)"
        )
    limits = FileLimits.of(settings)
    files, skipped = check_files(paths, limits)
    summary = IngestSummary(collection, skipped=skipped)
    writer = _Writer(collection, store, embed, settings, tenant, summary, model)
    batch: list[tuple[Chunk, IngestDocument]] = []
    with IngestLock(store, collection, settings.ingest_lock_wait_s) as lock, writer:
        writer.lock = lock
        for f in files:
            try:
                docs = read_file(f, limits)
            except Unreadable as e:  # changed since the check: passed over like the rest
                summary.skipped.append((str(f.path), str(e)))
                continue
            summary.files += 1
            for d in docs:
                chunks = _chunks(d, settings, tenant)
                if chunks is None:
                    summary.skipped.append(
                        (
                            d.source,
                            f"document {d.doc_id!r}: a chunk is over "
                            f"{MAX_TEXT} bytes; lower chunk_size",
                        )
                    )
                    continue
                summary.documents += 1
                batch += [(c, d) for c in chunks]
                if len(batch) >= BATCH_CHUNKS:
                    writer.write(batch, files=f"{summary.files}/{len(files)}")
                    batch = []
        if batch:
            writer.write(batch, files=f"{summary.files}/{len(files)}")
        if not summary.documents:
            _nothing(paths, summary.skipped)
        if writer.wrote:
            store.flush(collection)
    return summary


def _chunks(d: IngestDocument, settings: RetrievalSettings, tenant: str) -> list[Chunk] | None:
    """The document's chunks, ids made unique per tenant; None when one is too large."""
    out = []
    for c in chunk_document(d.doc_id, d.text, d.title, settings.chunk_size, settings.chunk_overlap):
        if len(c.text.encode()) > MAX_TEXT:
            return None
        if tenant != DEFAULT_TENANT:  # ids are unique per collection, across tenants:
            # doc ids never start with "/" and tenant ids hold no "/"
            c = replace(c, chunk_id=f"/{tenant}/{c.chunk_id}")
        out.append(c)
    return out


@dataclass
class _Writer:
    """Writes one batch of whole documents: compare, embed what changed, upsert, then
    remove the rows the documents no longer have."""

    collection: str
    store: KnowledgeStore
    embed: Callable[[list[str]], list[list[float]]]
    settings: RetrievalSettings
    tenant: str
    summary: IngestSummary
    model: tuple[str, int] | None = None
    lock: IngestLock | None = None
    wrote: bool = False
    _bar: tqdm | None = None

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def write(self, batch: list[tuple[Chunk, IngestDocument]], files: str = "") -> int:
        s = self.summary
        if self._bar is None:  # the collection appears with the first batch, not before;
            # the bar only once it is there, so a refusal stays one line
            s.created = self.store.ensure(self.collection, *self.model)
            self._bar = tqdm(desc="ingesting", unit="chunk")
        # Every stored row of these documents, found by a query on doc_id: what the new
        # chunks do not keep goes, rows an interrupted or concurrent ingest left included.
        # (A collection this ingest created holds only what it wrote, and each document
        # comes once per ingest: nothing to look up. Milvus Lite scans for the query.)
        held = (
            {}
            if s.created
            else self.store.existing(
                self.collection, sorted({d.doc_id for _, d in batch}), self.tenant
            )
        )
        keep: set[str] = set()
        todo: list[tuple[Chunk, IngestDocument]] = []
        updated = 0
        for c, d in batch:
            stored = held.get(d.doc_id, {})
            keep.add(c.chunk_id)
            if c.chunk_id in stored:
                s.unchanged += 1
            elif c.position in stored.values():
                updated += 1
                todo.append((c, d))
            else:
                s.added += 1
                todo.append((c, d))
        s.updated += updated
        leftover = [cid for stored in held.values() for cid in stored if cid not in keep]
        s.removed += max(0, len(leftover) - updated)
        step = max(self.settings.embed_batch_size * 4, 256)
        for i in range(0, len(todo), step):
            part = todo[i : i + step]
            vectors = self.embed([embedding_text(c, d.title) for c, d in part])
            if self.lock is not None:
                self.lock.check()
            self.store.upsert(
                self.collection,
                [_row(c, d, v, self.tenant) for (c, d), v in zip(part, vectors, strict=True)],
            )
        # Old rows go only after their replacements are written.
        self.store.delete_ids(self.collection, leftover)
        self.wrote = self.wrote or bool(todo or leftover)
        self._bar.update(len(batch))
        if files:
            self._bar.set_postfix(files=files)
        return len(batch)


def _row(c: Chunk, d: IngestDocument, vector, tenant: str) -> dict:
    return {
        "id": c.chunk_id,
        "doc_id": d.doc_id,
        "position": c.position,
        "text": c.text,
        "title": d.title[:1024],
        "heading": c.heading[:2048],
        "source": d.source[:2048],
        "start": c.start,
        "end": c.end,
        "content_hash": c.content_hash,
        "tenant": tenant,
        "dense": list(map(float, vector)),
    }
