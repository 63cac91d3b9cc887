"""The retrieval Python API: a query in, ranked and cited chunks out.

Owns: :class:`Retriever` (embedder + store: ``search``, ``embed``, ``ingest``,
``delete``), :class:`SearchRequest` (the validated per-request settings that the CLI,
the Ray Serve deployment and serving routes all pass), and turning hits into the
numbered sources a prompt cites. Does not own: Milvus details (``store``), the HTTP
surface (``deployment``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from loraplex.config import LoraplexConfig
from loraplex.prompts import Source
from loraplex.retrieval.embeddings import Embedder, default_embedder
from loraplex.retrieval.ingest import IngestSummary, ingest
from loraplex.retrieval.spec import DEFAULT_TENANT, RetrievalSpec
from loraplex.retrieval.store import Hit, KnowledgeStore

QUERY_CACHE = 2048


class SearchRequest(RetrievalSpec):
    """One search: a query and the :class:`RetrievalSpec` it runs under."""

    query: str = Field(min_length=1, max_length=8000)


class Retriever:
    """Embedding model + Milvus store, opened once and used for many requests."""

    def __init__(
        self,
        settings: LoraplexConfig,
        embedder: Embedder | None = None,
        store: KnowledgeStore | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder or default_embedder()
        self.store = store or KnowledgeStore.open(settings.milvus, settings.retrieval)
        self._queries: OrderedDict[str, list[float]] = OrderedDict()  # recent query vectors

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> tuple[str, int]:
        return self.embedder.name, self.embedder.dimension

    def embed(self, texts: list[str], progress: bool = False) -> list[list[float]]:
        vectors = self.embedder.encode(texts, self.settings.retrieval.embed_batch_size, progress)
        return vectors.tolist()

    def query_vector(self, query: str) -> list[float]:
        """The query's embedding; the last QUERY_CACHE queries are kept (a route asked the
        same question by many users embeds it once)."""
        vector = self._queries.get(query)
        if vector is None:
            vector = self.embed([query])[0]
            self._queries[query] = vector
            if len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        else:
            self._queries.move_to_end(query)
        return vector

    def search(self, request: SearchRequest) -> list[Hit]:
        collection = request.collection or self.settings.retrieval.collection
        vector = None
        if request.mode != "bm25":
            if not self.store.is_open(collection):  # an unknown one is refused before embedding
                self.store.info(collection)
            vector = self.query_vector(request.query)
        return self.store.search(
            collection,
            request.query,
            vector,
            mode=request.mode,
            k=request.top_k,
            filter=request.filter,
            tenant=request.tenant,
        )

    def ingest(
        self,
        paths: Sequence[str | Path],
        collection: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> IngestSummary:
        return ingest(
            paths,
            collection or self.settings.retrieval.collection,
            self.store,
            lambda texts: self.embed(texts),
            self.model,
            self.settings.retrieval,
            tenant,
        )

    def delete(
        self, doc_ids: list[str], collection: str | None = None, tenant: str = DEFAULT_TENANT
    ) -> int:
        return self.store.delete_documents(
            collection or self.settings.retrieval.collection, doc_ids, tenant
        )


def hits_to_sources(hits: list[Hit]) -> list[Source]:
    """Prompt sources in rank order; source number n is hits[n-1]."""
    return [Source(h.doc_id, h.text) for h in hits]
