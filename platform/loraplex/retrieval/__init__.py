"""Retrieval: ingestion into Milvus, dense/BM25/hybrid search with citations, and the
Retriever that serving and evaluation use.

Modules: ``readers`` (files -> documents), ``chunking`` (documents -> chunks),
``embeddings`` (the bundled MiniLM model), ``store`` (Milvus: schema, writes,
searches), ``ingest`` (the idempotent pipeline), ``retriever`` (the Python API),
``deployment`` (the Ray Serve deployment with ``/v1/embeddings``).
"""
