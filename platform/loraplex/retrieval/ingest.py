"""Ingestion: files -> documents -> chunks -> embeddings -> Milvus, idempotently.

Owns: :func:`ingest` and its :class:`IngestSummary`. Every file is read and chunked
before anything is written, so a file named on the command line that cannot be read
stops the run with nothing changed, while unreadable files found inside folders are
skipped with their reason. Per document the chunks already stored are compared by
position and content hash: unchanged chunks are not re-embedded or rewritten, changed
ones are upserted, and chunks the document no longer has are removed, so a changed
file replaces exactly its old chunks. :func:`delete_documents` removes documents.
Does not own: the Milvus schema (``store``) or reading formats (``readers``).
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
from loraplex.retrieval.readers import IngestDocument, Unreadable, find_files, read_file
from loraplex.retrieval.spec import TENANT
from loraplex.retrieval.store import DEFAULT_TENANT, MAX_TEXT, KnowledgeStore

MAX_DOC_ID = 400


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


def load_documents(
    paths: Sequence[str | Path], settings: RetrievalSettings
) -> tuple[list[IngestDocument], int, list[tuple[str, str]]]:
    """(documents, files read, skipped). A bad file named directly is an InputError."""
    found, passed = find_files(paths)
    skipped = [(str(p), reason) for p, reason in passed]
    max_bytes = int(settings.max_file_mb * 2**20)
    docs: list[IngestDocument] = []
    owner: dict[str, str] = {}
    files = 0
    for f in tqdm(found, desc="reading files", unit="file", disable=len(found) < 20):
        try:
            got = read_file(f, max_bytes)
        except Unreadable as e:
            if f.named:
                raise InputError(f"{f.path}: {e}") from None
            skipped.append((str(f.path), str(e)))
            continue
        for d in got:
            if len(d.doc_id) > MAX_DOC_ID:
                raise InputError(f"{f.path}: document id longer than {MAX_DOC_ID} characters")
            if d.doc_id in owner:
                raise InputError(
                    f"document id {d.doc_id!r} comes from both {owner[d.doc_id]} and {d.source}; "
                    "rename one of them"
                )
            owner[d.doc_id] = d.source
        docs += got
        files += 1
    if not docs:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise InputError(
            f"nothing to ingest in {', '.join(map(str, paths))}"
            + (f" ({reasons})" if reasons else "")
        )
    return docs, files, skipped


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
    """Read, chunk, compare with what is stored, embed what changed, write."""
    if not re.match(TENANT, tenant):
        raise InputError(
            f"tenant {tenant[:80]!r}: use letters, digits, '.', '_' or '-' (128 at most)"
        )
    docs, files, skipped = load_documents(paths, settings)
    chunks: list[tuple[Chunk, IngestDocument]] = []
    for d in docs:
        for c in chunk_document(
            d.doc_id, d.text, d.title, settings.chunk_size, settings.chunk_overlap
        ):
            if len(c.text.encode()) > MAX_TEXT:
                raise InputError(f"{d.source}: a chunk is over {MAX_TEXT} bytes; lower chunk_size")
            if tenant != DEFAULT_TENANT:  # ids are unique per collection, across tenants:
                # doc ids never start with "/" and tenant ids hold no "/"
                c = replace(c, chunk_id=f"/{tenant}/{c.chunk_id}")
            chunks.append((c, d))
    summary = IngestSummary(collection, files=files, documents=len(docs), skipped=skipped)
    summary.created = store.ensure(collection, *model)
    # Every stored row of these documents, found by a query on doc_id: what the new
    # chunks do not keep goes, rows an interrupted or concurrent ingest left included.
    held = store.existing(collection, [d.doc_id for d in docs], tenant)
    keep: set[str] = set()
    todo: list[tuple[Chunk, IngestDocument]] = []
    for c, d in chunks:
        stored = held.get(d.doc_id, {})
        keep.add(c.chunk_id)
        if c.chunk_id in stored:
            summary.unchanged += 1
        elif c.position in stored.values():
            summary.updated += 1
            todo.append((c, d))
        else:
            summary.added += 1
            todo.append((c, d))
    leftover = [cid for stored in held.values() for cid in stored if cid not in keep]
    summary.removed = max(0, len(leftover) - summary.updated)
    bar = tqdm(total=len(todo), desc="embedding + writing", unit="chunk", disable=not todo)
    step = max(settings.embed_batch_size * 4, 256)
    for i in range(0, len(todo), step):
        batch = todo[i : i + step]
        vectors = embed([embedding_text(c, d.title) for c, d in batch])
        store.upsert(
            collection,
            [
                {
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
                    "dense": list(map(float, v)),
                }
                for (c, d), v in zip(batch, vectors, strict=True)
            ],
        )
        bar.update(len(batch))
    bar.close()
    # Old chunks go only after their replacements are written.
    store.delete_ids(collection, leftover)
    if todo or leftover:
        store.flush(collection)
    return summary
