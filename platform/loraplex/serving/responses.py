"""Response shaping: the engine's OpenAI answer plus loraplex's sources and citations.

Owns: :func:`complete` (a non-streaming answer: ``sources``, ``retrieval`` and per
choice ``citations`` added) and :func:`stream` (the server-sent events of a streaming
answer: a first chunk with ``choices: []`` and ``sources``, the engine's chunks, a
last chunk with ``citations`` per choice, then ``[DONE]``; usage kept for accounting
whether or not the client asked for it; a deadline that ends the stream with an error
event). Both report the tokens used, and the whole answer (a stream's assembled from its chunks,
per choice with its finish reason) for a canary's judgement, through a callback when the
answer is complete.
Does not own: the request (``ingress``) or the citations themselves (``grounding``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi.responses import JSONResponse

from loraplex.serving.citations import citations
from loraplex.serving.errors import error_body
from loraplex.serving.ray_llm import apply_openai_json_format

# (usage or None, the whole answer's choices (None: it ended early), whether it ended early)
Finish = Callable[[dict[str, Any] | None, dict[str, Any] | None, bool], None]


def complete(first: Any, sources: list, extra: dict, finish: Finish) -> JSONResponse:
    data = first.model_dump(mode="json") if hasattr(first, "model_dump") else dict(first)
    for choice in data.get("choices", []):
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        choice["citations"] = citations(text, sources)
    data["sources"] = sources
    data.update(extra)
    finish(data.get("usage") or {}, data, False)
    return JSONResponse(data)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _chain(first: Any, gen: Any) -> AsyncGenerator[Any, None]:
    yield first
    async for item in gen:
        yield item


async def stream(
    first: Any,
    gen: Any,
    sources: list,
    extra: dict,
    client_usage: bool,
    deadline: float,
    finish: Finish,
) -> AsyncGenerator[str, None]:
    """The SSE events of one answer; ``deadline`` is a ``time.monotonic()`` instant."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    usage: dict[str, Any] = {}
    chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ""
    header_sent = False
    finished = False
    items = _chain(first, gen)
    try:
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    item = await items.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                if hasattr(gen, "cancel"):
                    gen.cancel()  # the engine stops generating for a client that gets no more
                body = error_body(504, "the answer did not finish before the request deadline")
                yield sse(body)
                yield "data: [DONE]\n\n"
                finish(usage or None, None, True)
                finished = True
                return
            packet = apply_openai_json_format(item)
            out: list[str] = []
            for event in packet.split("\n\n"):
                if not event.startswith("data: "):
                    continue
                payload = event[6:]
                if payload.strip() == "[DONE]":
                    continue
                chunk = json.loads(payload)
                chunk_id, created, model = (
                    chunk.get("id", chunk_id),
                    chunk.get("created", created),
                    chunk.get("model", model),
                )
                if not header_sent:
                    out.append(
                        sse(
                            {
                                "id": chunk_id,
                                "object": chunk.get("object") or "chat.completion.chunk",
                                "created": created,
                                "model": model,
                                "choices": [],
                                "sources": sources,
                                **extra,
                            }
                        )
                    )
                    header_sent = True
                if chunk.get("usage"):
                    usage = chunk["usage"]  # the engine's count so far (every chunk has it)
                    if not chunk.get("choices") and not client_usage:
                        continue
                    if chunk.get("choices"):  # usage goes out once, in the last chunk
                        chunk["usage"] = None
                for c in chunk.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
                    index = int(c.get("index", 0))
                    texts.setdefault(index, []).append(piece)
                    reasons[index] = c.get("finish_reason") or reasons.get(index)
                out.append(sse(chunk))
            if out:
                yield "".join(out)
        cites = [
            citations("".join(texts.get(i, [])), sources) for i in range(max(texts, default=-1) + 1)
        ]
        yield sse(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "citations": cites,
            }
        )
        yield "data: [DONE]\n\n"
        # the answer as a whole, judged like a non-streaming one (a canary's bounds)
        answer = {
            "choices": [
                {"index": i, "text": "".join(texts.get(i, [])), "finish_reason": reasons.get(i)}
                for i in range(max(texts, default=-1) + 1)
            ]
        }
        finish(usage, answer, False)
        finished = True
    finally:
        if not finished:  # the client left: charged for what it was sent
            finish(usage or None, None, True)
