"""Rollouts of an adapter version: canary traffic (the split, the watch, the halt) and
shadow traffic.

Owns: :func:`draw` (which share of requests goes to the canary version: the same end
user always lands on the same side when the config says ``sticky_by: header-or-key``),
:class:`CanaryWatch` (one per adapter with a canary, in each ingress replica: the
outcomes of both versions over a sliding window, compared against
:class:`~loraplex.serving.config.RollbackBounds`, answers with sources also judged for
support by the passages they cite (:func:`supported`); when the canary is worse it stops
receiving traffic at once), and the MLflow record of a halt (:data:`HALT_TAG` on the
canary's model version: every other replica, and every restart, reads it and keeps the
canary halted), and :class:`ShadowWatch` (a shadow version answering a share of the
requests unseen: how many run at once, agreement with the served answers,
structured-output failures and latency over a window). Does not own: resolving aliases
(``aliases.AliasResolver``) or the request path (``ingress``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loraplex.answers import judge
from loraplex.models import tags
from loraplex.serving.citations import citations
from loraplex.serving.config import CanarySpec, ShadowSpec

HALT_TAG = tags.CANARY_HALTED  # on the canary's model version: JSON, why and when
STABLE, CANARY = "stable", "canary"
USER_HEADER = "x-loraplex-user"
CANARY_SECRET_ENV = "LORAPLEX_CANARY_SECRET"


def sticky_id(headers: Any, body: dict[str, Any], key: dict[str, Any]) -> str:
    """Who the end user is, for a sticky split. A key allowed to assert its users
    (``may_assert_users``: an application serving many people) names them in the header or
    OpenAI's ``user``; any other request is its API key's: a client cannot choose its side
    of a canary by making up user ids."""
    if key.get("may_assert_users"):
        user = headers.get(USER_HEADER) or body.get("user")
        if isinstance(user, str) and user:
            return f"user:{key['name']}:{user}"
    return f"key:{key['name']}"


def canary_secret(key_digests: Any, configured: str | None = None) -> bytes:
    """The key of the split's hash: ``configured`` (``$LORAPLEX_CANARY_SECRET``) when set,
    else one derived from every API key's digest, which no single client knows. The
    same for every ingress replica of a deployment, so a user stays on one side."""
    if configured:
        return hashlib.sha256(b"loraplex-canary\0" + configured.encode()).digest()
    return hashlib.sha256(
        b"loraplex-canary\0" + "\0".join(sorted(key_digests or ())).encode()
    ).digest()


def draw(adapter: str, percent: float, sticky: str | None, secret: bytes = b"") -> bool:
    """True when this request goes to the canary. With a sticky id the answer is a keyed
    hash (HMAC-SHA256 with ``secret``) of (adapter, id): one end user stays on one side
    while the split holds, and a client cannot compute which side an id falls on."""
    if sticky is None:
        return random.random() * 100 < percent
    digest = hmac.new(secret, f"{adapter}\0{sticky}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent


@dataclass
class Outcome:
    at: float
    arm: str
    server_error: bool  # a 5xx
    latency_s: float | None  # answered requests only
    format_ok: bool | None  # None: no structured output was asked for
    supported: bool | None = None  # by its cited sources; None: no sources, not judged


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class ArmStats:
    requests: int = 0
    server_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    formatted: int = 0  # answers that were asked for structured output
    format_failures: int = 0
    judged: int = 0  # answers with sources, judged for support
    unsupported: int = 0

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0

    @property
    def format_failure_rate(self) -> float:
        return self.format_failures / self.formatted if self.formatted else 0.0

    @property
    def unsupported_rate(self) -> float:
        return self.unsupported / self.judged if self.judged else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "error_rate": round(self.error_rate, 4),
            "p95_latency_s": round(_p95(self.latencies), 4) if self.latencies else None,
            "structured_requests": self.formatted,
            "format_failure_rate": round(self.format_failure_rate, 4),
            "judged_requests": self.judged,
            "unsupported_rate": round(self.unsupported_rate, 4),
        }


class CanaryWatch:
    """The canary of one adapter in one ingress replica: split, window, verdict.

    ``version`` is the canary version the window is about; when the canary reference
    resolves to another version (a new candidate), the window and the verdict start
    over. A halted canary stays halted for that version (here, and through
    :data:`HALT_TAG`, everywhere)."""

    def __init__(self, adapter: str, spec: CanarySpec, secret: bytes = b"") -> None:
        self.adapter = adapter
        self.secret = secret
        self.spec = spec
        self.version: str | None = None
        self.halted: str | None = None  # the reason
        self.window: deque[Outcome] = deque()

    def follow(self, version: str, halted: str | None) -> None:
        """The canary reference resolved to ``version`` (and the registry's halt record)."""
        if version != self.version:
            self.version, self.halted = version, None
            self.window.clear()
        if halted and not self.halted:
            self.halted = halted

    def goes_to_canary(self, sticky: str | None) -> bool:
        if self.halted is not None:
            return False
        return draw(self.adapter, self.spec.percent, sticky, self.secret)

    def record(self, outcome: Outcome) -> str | None:
        """Add one finished request; the reason when this one halts the canary."""
        self.window.append(outcome)
        self._expire(outcome.at)
        if self.halted is not None or outcome.arm != CANARY:
            return None
        reason = self.verdict()
        if reason is not None:
            self.halted = reason
        return reason

    def _expire(self, now: float) -> None:
        while self.window and self.window[0].at < now - self.spec.rollback.window_s:
            self.window.popleft()

    def stats(self, now: float | None = None) -> dict[str, ArmStats]:
        self._expire(time.monotonic() if now is None else now)
        out = {STABLE: ArmStats(), CANARY: ArmStats()}
        for o in self.window:
            s = out[o.arm]
            s.requests += 1
            s.server_errors += o.server_error
            if o.latency_s is not None:
                s.latencies.append(o.latency_s)
            if o.format_ok is not None:
                s.formatted += 1
                s.format_failures += not o.format_ok
            if o.supported is not None:
                s.judged += 1
                s.unsupported += not o.supported
        return out

    def verdict(self) -> str | None:
        """Why the canary is worse than the stable version over the window, or None."""
        b = self.spec.rollback
        st = self.stats(self.window[-1].at if self.window else None)
        stable, canary = st[STABLE], st[CANARY]
        if canary.requests < b.min_requests:
            return None
        if canary.error_rate - stable.error_rate > b.max_error_rate_increase:
            return (
                f"5xx rate {canary.error_rate:.0%} against {stable.error_rate:.0%} on the stable "
                f"version over {canary.requests} requests (bound: +{b.max_error_rate_increase:.0%})"
            )
        if (
            len(canary.latencies) >= b.min_requests
            and len(stable.latencies) >= b.min_requests
            and _p95(canary.latencies) > b.max_p95_latency_ratio * _p95(stable.latencies)
        ):
            return (
                f"p95 latency {_p95(canary.latencies):.2f} s against "
                f"{_p95(stable.latencies):.2f} s on the stable version "
                f"(bound: {b.max_p95_latency_ratio:g}x)"
            )
        if (
            canary.formatted >= b.min_requests
            and canary.format_failure_rate - stable.format_failure_rate
            > b.max_format_failure_increase
        ):
            return (
                f"structured-output failures {canary.format_failure_rate:.0%} against "
                f"{stable.format_failure_rate:.0%} on the stable version over "
                f"{canary.formatted} requests (bound: +{b.max_format_failure_increase:.0%})"
            )
        if (
            canary.judged >= b.min_requests
            and canary.unsupported_rate - stable.unsupported_rate > b.max_unsupported_increase
        ):
            return (
                f"answers unsupported by their cited sources {canary.unsupported_rate:.0%} "
                f"against {stable.unsupported_rate:.0%} on the stable version over "
                f"{canary.judged} requests (bound: +{b.max_unsupported_increase:.0%})"
            )
        return None

    def state(self, promoted: bool) -> str:
        if promoted:
            return "ended"  # the stable reference now names the canary version
        return "halted" if self.halted else "active"


def halt_record(adapter: str, reason: str, stats: dict[str, ArmStats]) -> str:
    return json.dumps(
        {
            "adapter": adapter,
            "reason": reason,
            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "window": {arm: s.as_dict() for arm, s in stats.items()},
        }
    )


def halt_reason(tags: dict[str, str] | None) -> str | None:
    """The reason in a model version's halt record, if it has one."""
    raw = (tags or {}).get(HALT_TAG)
    if not raw:
        return None
    try:
        return str(json.loads(raw).get("reason") or "halted")
    except (ValueError, AttributeError):
        return "halted"


@dataclass
class ShadowOutcome:
    at: float
    version: str
    error: bool
    agreed: bool | None  # the same text as the served answer, choice by choice
    format_ok: bool | None
    latency_s: float | None
    served_latency_s: float


class ShadowWatch:
    """The shadow of one adapter in one ingress replica: how many shadow requests run at
    once (beyond ``max_in_flight`` a request is not shadowed: the shadow never queues
    in front of real traffic) and their outcomes over ``window_s``."""

    def __init__(self, adapter: str, spec: ShadowSpec) -> None:
        self.adapter = adapter
        self.spec = spec
        self.in_flight = 0
        self.skipped = 0
        self.window: deque[ShadowOutcome] = deque()

    def take(self) -> bool:
        """Whether this request gets a shadow (drawn, and a slot free)."""
        if random.random() * 100 >= self.spec.percent:
            return False
        if self.in_flight >= self.spec.max_in_flight:
            self.skipped += 1
            return False
        self.in_flight += 1
        return True

    def record(self, outcome: ShadowOutcome) -> None:
        self.in_flight -= 1
        self.window.append(outcome)
        while self.window and self.window[0].at < outcome.at - self.spec.window_s:
            self.window.popleft()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        kept = [o for o in self.window if o.at >= now - self.spec.window_s]
        answered = [o for o in kept if not o.error]
        formatted = [o for o in answered if o.format_ok is not None]
        shadow_lat = [o.latency_s for o in answered if o.latency_s is not None]
        served_lat = [o.served_latency_s for o in answered]
        return {
            "versions": sorted({o.version for o in kept}),
            "requests": len(kept),
            "errors": len(kept) - len(answered),
            "agreement_rate": round(sum(bool(o.agreed) for o in answered) / len(answered), 4)
            if answered
            else None,
            "structured_requests": len(formatted),
            "format_failure_rate": round(
                sum(not o.format_ok for o in formatted) / len(formatted), 4
            )
            if formatted
            else 0.0,
            "p95_latency_s": round(_p95(shadow_lat), 4) if shadow_lat else None,
            "served_p95_latency_s": round(_p95(served_lat), 4) if served_lat else None,
            "skipped_at_capacity": self.skipped,
        }


def texts(answer: Any) -> list[str]:
    """The text of each choice of a non-streaming answer."""
    data = answer.model_dump(mode="json") if hasattr(answer, "model_dump") else answer
    if not isinstance(data, dict):
        return []
    return [
        ((c.get("message") or {}).get("content") or c.get("text") or "").strip()
        for c in data.get("choices") or []
    ]


def judged_choices(answer: Any) -> list[dict[str, Any]] | None:
    """A non-streaming answer's choices, or None when one was cut by the request's own
    ``max_tokens`` (``finish_reason: length``): such an answer is not judged, or a client
    could manufacture failures on a canary (asking for one token) and halt it."""
    data = answer.model_dump(mode="json") if hasattr(answer, "model_dump") else answer
    choices = (data.get("choices") if isinstance(data, dict) else None) or []
    return None if any(c.get("finish_reason") == "length" for c in choices) else choices


def supported(answer: Any, sources: list[dict[str, Any]]) -> bool | None:
    """Whether every choice of a non-streaming answer with sources is supported by the
    sources it cites (``loraplex.answers``: a JSON answer's ``answer``, or the text; not
    judged when cut: :func:`judged_choices`). None: no sources, nothing to judge."""
    if not sources or not judged_choices(answer):
        return None
    verdicts = []
    for text in texts(answer):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        claim = str(value["answer"]) if isinstance(value, dict) and "answer" in value else text
        verdicts.append(judge(claim, sources, citations(text, sources)).supported)
    if any(v is False for v in verdicts):
        return False
    return True if any(v for v in verdicts) else None


def format_ok(answer: Any, structured: bool) -> bool | None:
    """Whether every choice of a non-streaming answer is JSON, when JSON was asked for
    (not judged when cut: :func:`judged_choices`). None: nothing to judge."""
    if not structured:
        return None
    choices = judged_choices(answer)
    if choices is None:
        return None
    if not choices:
        return False
    for text in texts(answer):
        try:
            json.loads(text)
        except ValueError:
            return False
    return True
