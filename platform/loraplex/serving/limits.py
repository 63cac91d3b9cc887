"""Per-key limits: requests per minute, tokens per minute, requests at once.

Owns: :class:`TokenBucket` (capacity = the per-minute limit, refilled continuously) and
:class:`KeyLimiter`, which admits or refuses one request of one key (a 429 with
``Retry-After`` naming the limit) and is charged the request's tokens when it ends.
Tokens are known only afterwards, so a request is admitted while the key's token
bucket is above zero and its real prompt + completion tokens are taken when it
finishes (the bucket may go below zero; the key then waits until it refills).

Limits live in each ingress replica's memory: with several ingress replicas each
enforces its share (the limit divided by the most replicas the ingress may run), so
a key never gets more than its limit in total. Does not own: finding the key
(``gate``) or counting tokens (the engine's ``usage``).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.serving import metrics
from loraplex.serving.errors import ApiError


class TokenBucket:
    """``per_minute`` units per minute, at most ``per_minute`` saved up."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, need: float) -> float:
        """Seconds until ``need`` units are there (0: now)."""
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


@dataclass
class _KeyState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    max_concurrent: int | None
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeyLimiter:
    """The limits of every key this replica has seen; ``share`` of each limit here."""

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self._keys: dict[str, _KeyState] = {}

    def _state(self, record: dict[str, Any]) -> _KeyState:
        name = record["name"]
        state = self._keys.get(name)
        if state is None:
            limits = record.get("limits") or {}

            def part(v: int | None) -> int | None:
                return None if v is None else max(1, math.ceil(v * self.share))

            rpm, tpm = (
                part(limits.get("requests_per_minute")),
                part(limits.get("tokens_per_minute")),
            )
            state = _KeyState(
                TokenBucket(rpm) if rpm else None,
                TokenBucket(tpm) if tpm else None,
                part(limits.get("max_concurrent")),
            )
            self._keys[name] = state
        return state

    def admit(self, record: dict[str, Any]) -> None:
        """Count one request of this key in, or raise ApiError 429 naming the limit."""
        name = record["name"]
        state = self._state(record)
        with state.lock:
            refusal: tuple[str, str, float] | None = None
            if state.max_concurrent is not None and state.running >= state.max_concurrent:
                refusal = ("concurrency", f"{state.max_concurrent} requests at once", 1.0)
            elif state.requests is not None and (wait := state.requests.wait_s(1)) > 0:
                per = round(state.requests.capacity)
                refusal = ("requests", f"{per} requests per minute", wait)
            elif state.tokens is not None and (wait := state.tokens.wait_s(1)) > 0:
                per = round(state.tokens.capacity)
                refusal = ("tokens", f"{per} tokens per minute", wait)
            if refusal is None:
                if state.requests is not None:
                    state.requests.take(1)
                state.running += 1
        if refusal is not None:
            limit, what, wait = refusal
            metrics.key_rejections.inc(tags={"key": name, "limit": limit})
            retry = max(1, math.ceil(wait))
            raise ApiError(
                429,
                f"rate limit reached for key {name!r}: {what}; retry in {retry} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        metrics.key_requests.inc(tags={"key": name})

    def release(self, record: dict[str, Any]) -> None:
        state = self._state(record)
        with state.lock:
            state.running = max(0, state.running - 1)

    def charge(self, record: dict[str, Any], tokens: int) -> None:
        """Take a finished request's prompt + completion tokens from the key's bucket."""
        if tokens <= 0:
            return
        metrics.key_tokens.inc(tokens, tags={"key": record["name"]})
        state = self._state(record)
        if state.tokens is not None:
            with state.lock:
                state.tokens.take(tokens)
