"""What each finished request costs its key, and the one log line it leaves.

Owns: :class:`AccountingMixin`: a finished request's tokens charged to its key's
``tokens_per_minute`` (through the limiter the ``gate`` middleware left on the
request), the request, token and latency metrics, the error count by status, and the
log line with the server's request id, the key's name and the client's own request id.
Does not own: the limits themselves or refusing a request over them (``limits``,
``gate``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from loraplex.serving import metrics

log = logging.getLogger("ray.serve.loraplex")


class AccountingMixin:
    def _count_error(
        self, key: dict[str, Any], call: str, tags: dict[str, str], status: int, why: str, rid: str
    ) -> None:
        metrics.errors.inc(tags={**tags, "status": str(status)})
        log.info("[%s] key %s: %s %s -> %d %s", rid, key["name"], call, tags["route"], status, why)

    def _record(
        self,
        key: dict[str, Any],
        limiter: Any,
        tags: dict[str, str],
        usage: dict[str, Any] | None,
        started: float,
        rid: str,
        client_rid: str,
        early: bool = False,
    ) -> None:
        """Count the finished request and charge its tokens to the key; one log line with
        the server's request id, the key's name and the client's own request id (Serve's
        proxy makes one when the client sends none). A stream that ended early (the
        client left, the deadline passed) is charged for what it was sent: ``usage`` is
        the engine's count up to its last chunk (None: nothing was generated)."""
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        if limiter is not None and prompt + completion:
            limiter.charge(key, prompt + completion)
        if usage is None or early:
            metrics.errors.inc(tags={**tags, "status": "499"})
            log.info(
                "[%s] key %s: stream for %s ended early (%d prompt + %d completion tokens charged)",
                rid,
                key["name"],
                tags["route"],
                prompt,
                completion,
            )
            return
        elapsed = time.perf_counter() - started
        metrics.prompt_tokens.inc(prompt, tags=tags)
        metrics.completion_tokens.inc(completion, tags=tags)
        metrics.latency.observe(elapsed, tags=tags)
        log.info(
            "[%s] key %s: %s adapter %s: %d prompt + %d completion tokens in %.2f s "
            "(client request id %s)",
            rid,
            key["name"],
            tags["route"],
            tags["adapter"],
            prompt,
            completion,
            elapsed,
            client_rid,
        )


def charge_embeddings(key: dict[str, Any], limiter: Any, content: Any) -> None:
    """Charge an embeddings answer's input tokens to the key's ``tokens_per_minute``."""
    usage = content.get("usage") if isinstance(content, dict) else None
    tokens = int((usage or {}).get("prompt_tokens") or 0)
    if limiter is not None and tokens:
        limiter.charge(key, tokens)
        metrics.prompt_tokens.inc(tokens, tags={"route": "embeddings", "adapter": "none"})
