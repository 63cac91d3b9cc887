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
    ) -> None:
        """Count the finished request; one log line with the server's request id, the
        key's name and the client's own request id (Serve's proxy makes one when the
        client sends none)."""
        if usage is None:
            metrics.errors.inc(tags={**tags, "status": "499"})
            log.info("[%s] key %s: stream for %s ended early", rid, key["name"], tags["route"])
            return
        elapsed = time.perf_counter() - started
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if limiter is not None:
            limiter.charge(key, prompt + completion)
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
