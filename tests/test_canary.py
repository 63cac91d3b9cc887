"""The canary's verdict on its window (the serving tests run the split, the 5xx halt and
promotion through the real application; here each bound and the window itself)."""

from __future__ import annotations

import pytest

from loraplex.serving.canary import (
    CANARY,
    STABLE,
    CanaryWatch,
    Outcome,
    canary_secret,
    draw,
    format_ok,
    sticky_id,
    supported,
)
from loraplex.serving.config import CanarySpec


def watch(**rollback) -> CanaryWatch:
    w = CanaryWatch(
        "tiny:a", CanarySpec(registry="a/2", percent=10, rollback={"min_requests": 5, **rollback})
    )
    w.follow("2", None)
    return w


def feed(w: CanaryWatch, arm: str, n: int, at: float = 100.0, **kw) -> str | None:
    kw = {"server_error": False, "latency_s": 1.0, "format_ok": None, **kw}
    reason = None
    for i in range(n):
        reason = w.record(Outcome(at + i * 0.01, arm, **kw)) or reason
    return reason


def test_the_split_holds_its_share_and_is_sticky() -> None:
    drawn = [draw("tiny:a", 10, f"user:{i}") for i in range(5000)]
    assert 0.08 < sum(drawn) / len(drawn) < 0.12
    assert [draw("tiny:a", 10, f"user:{i}") for i in range(200)] == drawn[:200]
    # another adapter's split is drawn independently
    other = [draw("tiny:b", 10, f"user:{i}") for i in range(5000)]
    assert other != drawn
    # keyed: under another secret the same ids fall elsewhere (a client cannot compute it)
    secret = canary_secret(["a" * 64, "b" * 64])
    keyed = [draw("tiny:a", 10, f"user:{i}", secret) for i in range(5000)]
    assert keyed != drawn and 0.08 < sum(keyed) / len(keyed) < 0.12
    assert canary_secret(["b" * 64, "a" * 64]) == secret != canary_secret(["a" * 64])
    assert canary_secret([], "set by the operator") != canary_secret([])


def test_a_users_id_counts_only_for_keys_allowed_to_name_users() -> None:
    app = {"name": "app", "may_assert_users": True}
    client = {"name": "client"}
    headers = {"x-loraplex-user": "u1"}
    assert sticky_id(headers, {}, app) == "user:app:u1"
    assert sticky_id({}, {"user": "u2"}, app) == "user:app:u2"
    assert sticky_id(headers, {"user": "u2"}, client) == "key:client"


def test_an_answer_cut_by_its_own_max_tokens_is_not_a_format_failure() -> None:
    def answer(text: str, finish: str) -> dict:
        return {"choices": [{"message": {"content": text}, "finish_reason": finish}]}

    assert format_ok(answer('{"answer": "x"', "length"), True) is None
    assert format_ok(answer('{"answer": "x"', "stop"), True) is False
    assert format_ok(answer('{"answer": "x"}', "stop"), True) is True
    assert format_ok(answer("anything", "stop"), False) is None


def test_errors_halt_only_past_the_bound_and_after_min_requests() -> None:
    w = watch(max_error_rate_increase=0.2)
    feed(w, STABLE, 10, server_error=False)
    assert feed(w, CANARY, 4, server_error=True) is None  # 4 < min_requests
    reason = feed(w, CANARY, 1, server_error=True)
    assert reason and "5xx rate 100%" in reason and w.halted == reason
    assert not w.goes_to_canary("user:x")
    w2 = watch(max_error_rate_increase=0.2)
    feed(w2, CANARY, 4)
    assert feed(w2, CANARY, 1, server_error=True) is None  # 20%: not above +20 points


def test_latency_and_structured_output_bounds() -> None:
    w = watch(max_p95_latency_ratio=1.5)
    feed(w, STABLE, 5, latency_s=1.0)
    assert feed(w, CANARY, 5, latency_s=1.4) is None
    assert "p95 latency" in feed(w, CANARY, 5, latency_s=3.0)
    w = watch(max_format_failure_increase=0.1)
    feed(w, STABLE, 5, format_ok=True)
    assert "structured-output failures" in feed(w, CANARY, 5, format_ok=False)


def test_answers_their_sources_do_not_support_halt_the_canary() -> None:
    """A canary whose answers stop being backed by the passages they cite is halted like
    one that errors; answers without sources are not judged."""
    w = watch(max_unsupported_increase=0.2)
    feed(w, STABLE, 5, supported=True)
    assert feed(w, CANARY, 10, supported=None) is None  # no retrieval: nothing judged
    assert feed(w, CANARY, 4, supported=False) is None  # 4 < min_requests judged
    reason = feed(w, CANARY, 1, supported=False)
    assert reason and "unsupported by their cited sources 100%" in reason
    assert w.stats(101.0)[CANARY].as_dict()["unsupported_rate"] == 1.0


def test_support_of_an_answer_by_its_cited_sources() -> None:
    sources = [
        {"id": 1, "doc_id": "x200", "text": "The Velmo X200 comes in bronze."},
        {"id": 2, "doc_id": "x300", "text": "The Velmo X300 comes in scarlet."},
    ]

    def answer(*texts: str, finish: str = "stop") -> dict:
        return {"choices": [{"message": {"content": t}, "finish_reason": finish} for t in texts]}

    assert supported(answer('{"answer": "bronze", "sources": [1]}'), sources) is True
    assert supported(answer('{"answer": "bronze", "sources": [2]}'), sources) is False
    assert supported(answer("It comes in bronze [1]."), sources) is True
    assert supported(answer("bronze [1]", "scarlet [1]"), sources) is False  # one of n
    assert supported(answer("It comes in bronze."), sources) is False  # cites nothing
    assert supported(answer("bronze [1]", finish="length"), sources) is None
    assert supported(answer("bronze [1]"), []) is None


def test_the_window_slides_and_a_new_canary_version_starts_over() -> None:
    w = watch(window_s=10)
    feed(w, CANARY, 4, at=0.0, server_error=True)
    # those 4 failures left the window: 1 new failure is below min_requests
    assert feed(w, CANARY, 1, at=50.0, server_error=True) is None
    assert w.stats(50.0)[CANARY].requests == 1
    feed(w, CANARY, 5, at=51.0, server_error=True)
    assert w.halted
    w.follow("3", None)  # the canary alias moved to a new version
    assert w.halted is None and w.stats(51.0)[CANARY].requests == 0
    w.follow("3", "halted by another replica")
    assert w.state(promoted=False) == "halted" and w.state(promoted=True) == "ended"


@pytest.mark.parametrize(
    ("content", "ok"), [('{"answer": 1}', True), ("the answer is 1", False), ("", False)]
)
def test_format_check(content: str, ok: bool) -> None:
    answer = {"choices": [{"message": {"content": content}}]}
    assert format_ok(answer, structured=True) is ok
    assert format_ok(answer, structured=False) is None


def test_a_stream_is_judged_on_its_whole_answer_once_it_ends() -> None:
    """A canary's support and format bounds hold for streams too: ``responses.stream``
    hands its finish callback the answer assembled from the engine's chunks (per choice,
    with its finish reason); a stream the client left hands none."""
    import asyncio
    import json
    import time

    from loraplex.serving import responses

    sources = [
        {"id": 1, "doc_id": "x200", "text": "The Velmo X200 comes in bronze."},
        {"id": 2, "doc_id": "x300", "text": "The Velmo X300 comes in scarlet."},
    ]

    def chunks(pieces: list[str], finish: str) -> list[str]:
        """Server-sent events shaped as vLLM streams a chat answer."""
        out = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            choice = {
                "index": 0,
                "delta": {"content": piece},
                "finish_reason": finish if last else None,
            }
            body = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": i + 1},
            }
            out.append(f"data: {json.dumps(body)}\n\n")
        return out

    def run(pieces: list[str], finish: str = "stop", leave_after: int | None = None):
        seen: list[tuple] = []

        async def gen():
            for event in chunks(pieces, finish)[1:]:
                yield event

        async def consume() -> None:
            events = responses.stream(
                chunks(pieces, finish)[0],
                gen(),
                sources,
                {},
                False,
                time.monotonic() + 30,
                lambda usage, answer, early: seen.append((usage, answer, early)),
            )
            n = 0
            async for _ in events:
                n += 1
                if n == leave_after:
                    await events.aclose()
                    return

        asyncio.run(consume())
        assert len(seen) == 1
        return seen[0]

    usage, answer, early = run(['{"answer": "br', 'onze", "sour', 'ces": [1]}'])
    assert not early and usage["completion_tokens"] == 3
    assert answer["choices"][0]["text"] == '{"answer": "bronze", "sources": [1]}'
    assert supported(answer, sources) is True and format_ok(answer, True) is True
    _, answer, _ = run(['{"answer": "bronze", ', '"sources": [2]}'])
    assert supported(answer, sources) is False  # cites the scarlet passage
    _, answer, _ = run(['{"answer": "bron'])
    assert format_ok(answer, True) is False  # ended (stop) as broken JSON
    _, answer, _ = run(['{"answer": "bron'], finish="length")
    assert format_ok(answer, True) is None and supported(answer, sources) is None
    usage, answer, early = run(["bronze", " [1]", " and more"], leave_after=1)
    assert early and answer is None  # the client left: charged, not judged
