"""The call into the engine, and what its failures mean to a client.

Owns: :class:`EngineMixin` (``_dispatch``: a request sent to the ``LLMServer`` deployment
that serves an engine model, through Serve's handle and its multiplexing, returning the
first answer or chunk and the rest of the stream) and the mapping of what can go wrong
there onto OpenAI-shaped errors: a full engine queue is 503 ``overloaded`` with
``Retry-After``, an adapter that cannot be loaded 503 ``adapter_unavailable``, vLLM's
own error response its status with a public reason. Does not own: the engine (vLLM in
``LLMServer``) or which engine model a request goes to (``rollout``).
"""

from __future__ import annotations

from typing import Any

from ray.serve.exceptions import BackPressureError

from loraplex.serving import metrics
from loraplex.serving.adapters import AdapterLoadError
from loraplex.serving.errors import ApiError, public_reason
from loraplex.serving.ray_llm import ErrorResponse, RawRequestInfo

# vLLM's refusal of a prompt past the context, after tokenizing it up to the context
PAST_CONTEXT = "maximum context length"


def overloaded(message: str) -> ApiError:
    metrics.shed.inc(tags={"reason": "engine_queue_full"})
    return ApiError(503, message, code="overloaded", headers={"Retry-After": "2"})


class EngineMixin:
    """``_get_configured_serve_handle`` comes from Ray Serve LLM's ``OpenAiIngress``."""

    async def _dispatch(self, engine_model: str, call: str, body: Any, rid: str):
        handle = self._get_configured_serve_handle(engine_model)  # type: ignore[attr-defined]
        gen = getattr(handle, call).remote(body, RawRequestInfo(headers={"x-request-id": rid}))
        try:
            first = await gen.__anext__()
        except BackPressureError:
            base = engine_model.split(":")[0]
            raise overloaded(f"{base} is at capacity (its queue is full); retry shortly") from None
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, BackPressureError):
                raise overloaded("the model is at capacity; retry shortly") from None
            if isinstance(cause, AdapterLoadError):
                raise ApiError(503, public_reason(cause), "model", "adapter_unavailable") from None
            if "Failed to load lora model" in str(cause):
                raise ApiError(
                    503,
                    f"adapter {engine_model} cannot be loaded: {public_reason(cause)}",
                    "model",
                    "adapter_unavailable",
                ) from None
            raise
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse):
            status = int(head.error.code or 400)
            raise ApiError(
                status if 400 <= status < 600 else 400, public_reason(head.error.message)
            )
        return first, gen
