"""The call into the engine, and what its failures mean to a client.

Owns: :class:`EngineMixin` (``_dispatch``: a request sent to the ``LLMServer`` deployment
that serves an engine model, through Serve's handle and its multiplexing, returning the
first answer or chunk and the rest of the stream) and the mapping of what can go wrong
there onto OpenAI-shaped errors: a full engine queue is 503 ``overloaded`` with
``Retry-After``, an adapter that cannot be loaded 503 ``adapter_unavailable``, vLLM's
own error response its status with a public reason; and ``_prompt_tokens``, a prompt
counted by the engine's own tokenizer and chat template (what a failed request is
charged). Does not own: the engine (vLLM in
``LLMServer``) or which engine model a request goes to (``rollout``).
"""

from __future__ import annotations

from typing import Any

from ray.serve.exceptions import BackPressureError

from loraplex.serving import metrics
from loraplex.serving.adapters import AdapterLoadError
from loraplex.serving.errors import ApiError, public_reason
from loraplex.serving.ray_llm import (
    ErrorResponse,
    RawRequestInfo,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)

# failures where the engine never ran the request: nothing to charge for its prompt
NOT_RUN = ("overloaded", "adapter_unavailable")


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

    async def _prompt_tokens(self, base: str, call: str, body: dict[str, Any], rid: str) -> int:
        """The request's prompt tokens as the engine counts them: vLLM's tokenize on the
        base model (adapters share its tokenizer), the chat template applied to chat."""
        handle = self._get_configured_serve_handle(base)  # type: ignore[attr-defined]
        info = RawRequestInfo(headers={"x-request-id": f"{rid}-count"})
        if call == "chat":
            asks = [TokenizeChatRequest(model=base, messages=body["messages"])]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return len(prompt)  # token ids: counted as they are
            texts = prompt if isinstance(prompt, list) else [prompt]
            asks = [TokenizeCompletionRequest(model=base, prompt=str(t)) for t in texts]
        total = 0
        for ask in asks:
            answer = await handle.tokenize.remote(ask, info).__anext__()
            answer = answer[0] if isinstance(answer, list) and answer else answer
            total += int(getattr(answer, "count", 0) or 0)
        return total
