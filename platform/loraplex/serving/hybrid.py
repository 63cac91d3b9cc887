"""The hybrid prompt and its citations: retrieved chunks in, cited doc ids out.

Owns: taking the question out of a chat request, rewriting the last user turn with the
numbered, fenced sources (``loraplex.prompts.question_prompt``: the text the adapters
were trained on), adding a route's system prompt, the public shape of a source in a
response, and mapping an answer's citations (``[2]`` in text, source numbers or doc ids
in a JSON answer's ``sources``) back to sources. Does not own: search (the Retriever deployment)
or the prompt wording (``loraplex.prompts``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from loraplex.prompts import Source, question_prompt, ticket_prompt

CITATION = re.compile(r"\[(\d{1,3})\]")
PUBLIC_SOURCE_KEYS = ("doc_id", "chunk_id", "title", "heading", "source", "score", "text")


def message_text(content: Any) -> str:
    """The text of a message's content (a string or OpenAI content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_index(messages: Sequence[dict[str, Any]]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return None


def question_of(messages: Sequence[dict[str, Any]]) -> str:
    i = last_user_index(messages)
    return message_text(messages[i].get("content")).strip() if i is not None else ""


def build_messages(
    messages: list[dict[str, Any]],
    hits: Sequence[dict[str, Any]],
    *,
    system_prompt: str | None = None,
    task: str = "chat",
) -> list[dict[str, Any]]:
    """A copy of ``messages`` with the last user turn carrying the sources/instruction."""
    out = [dict(m) for m in messages]
    i = last_user_index(out)
    if i is not None:
        out[i]["content"] = user_turn(message_text(out[i]["content"]), hits, task)
    if system_prompt and not any(m.get("role") == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def user_turn(text: str, hits: Sequence[dict[str, Any]], task: str = "chat") -> str:
    """The text of the user turn for a route's task, with the numbered sources."""
    if task == "classify_ticket":
        return ticket_prompt(text)
    if not hits and task == "chat":
        return text
    sources = [Source(h["doc_id"], h["text"]) for h in hits]
    return question_prompt(text, sources, json_answer=task == "json_answer")


def public_sources(hits: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sources as returned to clients: ``id`` is the number the model cites."""
    return [{"id": n, **{k: h.get(k) for k in PUBLIC_SOURCE_KEYS}} for n, h in enumerate(hits, 1)]


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
