"""An answer's sources as clients see them, and its citations mapped back to them.

Owns: :func:`public_sources` (the public shape of a retrieved source: the number the
model cites, the document, where it came from) and :func:`citations` (``[2]`` in text,
numbers or doc ids in a JSON answer's ``sources``, mapped back to sources, invalid ones
marked). Does not own: retrieval or the prompt (``grounding``).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from typing import Any

CITATION = re.compile(r"\[(\d{1,3})\]")
PUBLIC_SOURCE_KEYS = ("doc_id", "chunk_id", "title", "heading", "source", "score", "text")


def public_sources(hits: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sources as returned to clients: ``id`` is the number the model cites; ``source``
    is where the document came from relative to what was ingested (an absolute path
    stored by an older ingest is cut to its file name)."""
    out = []
    for n, h in enumerate(hits, 1):
        item = {"id": n, **{k: h.get(k) for k in PUBLIC_SOURCE_KEYS}}
        if isinstance(item["source"], str) and item["source"].startswith("/"):
            item["source"] = posixpath.basename(item["source"])
        out.append(item)
    return out


def citations(text: str, sources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sources an answer cites, in order of first mention, without duplicates.

    ``[n]`` markers and the numbers in a JSON answer's ``sources`` cite source n; doc ids
    in a JSON answer's ``sources`` (a client's own schema) cite the source with that doc.
    Numbers or doc ids that match no source are reported with ``"valid": false``.
    """
    found: list[dict[str, Any]] = []
    seen: set[tuple[str, Any]] = set()

    def add(key: tuple[str, Any], entry: dict[str, Any]) -> None:
        if key not in seen:
            seen.add(key)
            found.append(entry)

    def by_number(n: int) -> None:
        if 1 <= n <= len(sources):
            s = sources[n - 1]
            add(("doc", s["doc_id"]), {"source": n, "doc_id": s["doc_id"], "valid": True})
        else:
            add(("n", n), {"source": n, "doc_id": None, "valid": False})

    for m in CITATION.finditer(text):
        by_number(int(m.group(1)))
    for cited in _json_sources(text):
        if isinstance(cited, int):
            by_number(cited)
            continue
        number = next((s["id"] for s in sources if s["doc_id"] == cited), None)
        add(("doc", cited), {"source": number, "doc_id": cited, "valid": number is not None})
    return found


def _json_sources(text: str) -> list[int | str]:
    """A JSON answer's ``sources``: source numbers (ints) and/or doc ids (strings)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return []
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        return []
    return [
        s
        for s in data["sources"]
        if (isinstance(s, int) and not isinstance(s, bool)) or isinstance(s, str)
    ]
