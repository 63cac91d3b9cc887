"""Every name loraplex takes from Ray Serve LLM, public or ``ray.llm._internal``.

Owns: the imports of the extension points serving builds on (``LLMConfig``,
``build_llm_deployment``, ``CallbackBase``, ``OpenAiIngress``, ``make_fastapi_ingress``,
``LoraModelLoader``, ``DiskMultiplexConfig``, the OpenAI request models,
``RawRequestInfo``, the SSE formatter, ``get_lora_id``), so that a Ray upgrade that moves one of
them breaks here, in one place, and ``tests/test_serving_contract.py`` says which.
Does not own: any behaviour.
"""

from __future__ import annotations

import logging

# Importing ray.serve.llm re-configures logging (dictConfig): the root logger gets a new
# handler with a JSON formatter, and a CLI's plain lines turn into JSON documents. Keep
# the root handlers we had.
_root = logging.getLogger()
_kept = list(_root.handlers)

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
from ray.llm._internal.serve.core.ingress.utils import (
    _apply_openai_json_format as apply_openai_json_format,
)
from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

if _kept:
    _root.handlers = _kept

__all__ = [
    "CallbackBase",
    "ChatCompletionRequest",
    "CompletionRequest",
    "DiskMultiplexConfig",
    "ErrorResponse",
    "LLMConfig",
    "LLMServer",
    "LoraModelLoader",
    "OpenAiIngress",
    "RawRequestInfo",
    "apply_openai_json_format",
    "build_llm_deployment",
    "get_lora_id",
    "make_fastapi_ingress",
]
