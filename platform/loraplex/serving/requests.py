"""A request body read and checked before any engine work.

Owns: reading the body as a JSON object (:func:`json_body`), the fields each endpoint
accepts (an allow-list: OpenAI's, vLLM's sampling extras and loraplex's ``task``,
``retrieval``, ``adapter_version``; the engine's fields that would hand back the prompt
the server built, with a route's system prompt and other retrieved text in it, or change
how it is built, are refused), the loraplex fields taken out of the body, and the
checks that turn a bad request into a 400 naming the field: ``messages`` (objects with a
known ``role`` and string or list ``content``), ``prompt``, ``max_tokens``, ``n``,
``stream_options`` and a ``json_schema`` response format; the result is one typed
:class:`Asked`. Does not own: what ``model`` names (``catalog``), the search a request
runs (``grounding``) or vLLM's own validation of the rest of the body (its
``ChatCompletionRequest``, applied last by the ingress).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from fastapi import Request

from loraplex.serving.config import BaseModelSpec
from loraplex.serving.errors import ApiError, shorten

TASKS = ("chat", "json_answer", "classify_ticket")
# OpenAI's chat roles (``function`` is its older name of ``tool``); anything else would
# reach the model's chat template, which may render it as text or fail after seconds.
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_SCHEMA_DEPTH = 32

# What a client may send. Everything else is refused with 400 before any engine work:
# an unknown field is more likely a mistake than a wish, and some of vLLM's own fields
# (``echo``, ``prompt_logprobs``, ``return_token_ids``, ``return_prompt_text``, chat
# template overrides) would return or reshape the prompt the server built around the
# client's text: a route's system prompt, other documents' retrieved passages.
SAMPLING = frozenset(
    {
        "model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p",
        "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
        "length_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output",
        "ignore_eos", "min_tokens", "logprobs", "logit_bias", "bad_words", "allowed_token_ids",
        "skip_special_tokens", "spaces_between_special_tokens", "response_format",
        "structured_outputs", "user", "use_beam_search",
    }
)  # fmt: skip
LORAPLEX = frozenset({"retrieval", "task", "adapter_version"})
ACCEPTED = {
    "chat": SAMPLING
    | LORAPLEX
    | {
        "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
        "parallel_tool_calls", "reasoning_effort", "include_reasoning",
    },
    "completions": SAMPLING | LORAPLEX | {"prompt", "suffix"},
}  # fmt: skip
REVEALING = frozenset(
    {
        "echo", "prompt_logprobs", "return_token_ids", "return_prompt_text",
        "return_tokens_as_token_ids", "return_token_offsets", "return_assistant_tokens_mask",
        "chat_template", "chat_template_kwargs", "add_generation_prompt",
        "continue_final_message", "documents", "add_special_tokens", "prompt_embeds",
    }
)  # fmt: skip


@dataclass
class Asked:
    """What a request asks for beyond the engine's own fields (taken out of ``body``)."""

    body: dict[str, Any]  # what is left for the engine
    task: str | None  # None: the route's task
    retrieval: Any  # the request's retrieval override (None: the route's)
    pinned: str | None  # ``adapter_version``: another version of the same adapter
    stream: bool
    client_usage: bool  # the client asked for usage in its stream
    structured: bool  # a JSON response_format (the task may make it JSON too)


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse(call: str, body: dict[str, Any], spec: BaseModelSpec) -> Asked:
    """Check ``body`` for ``call`` ("chat" or "completions") on the base model ``spec``;
    the loraplex fields come out of it."""
    check_fields(call, body)
    retrieval = body.pop("retrieval", None)
    task = body.pop("task", None)
    if task is not None and task not in TASKS:
        raise ApiError(400, f"`task` must be one of {', '.join(TASKS)}", "task")
    pinned = body.pop("adapter_version", None)
    if pinned is not None:
        pinned = str(pinned)
        if not (pinned.isascii() and pinned.isdigit()) or pinned.startswith("0") or len(pinned) > 9:
            raise ApiError(400, "`adapter_version` must be a version number", "adapter_version")
    if call == "chat":
        check_messages(body.get("messages"))
    elif body.get("prompt") is None:
        raise ApiError(400, "`prompt` is required", "prompt")
    check_generation_params(body, spec)
    fmt = body.get("response_format")
    stream_options = body.get("stream_options") or {}
    return Asked(
        body=body,
        task=task,
        retrieval=retrieval,
        pinned=pinned,
        stream=bool(body.get("stream")),
        client_usage=bool(stream_options.get("include_usage")),
        structured=isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"),
    )


def check_fields(call: str, body: dict[str, Any]) -> None:
    """Only the fields ``call`` accepts; a field that would reveal the server's prompt is
    refused with that reason."""
    for name in body:
        if name in REVEALING:
            raise ApiError(
                400,
                f"`{name}` is not accepted here: it would return or change the prompt the "
                "server builds (a route's system prompt, retrieved passages)",
                name,
            )
    unknown = sorted(set(body) - ACCEPTED[call])
    if unknown:
        raise ApiError(
            400,
            f"unknown field `{unknown[0][:60]}`: /v1/{_PATHS[call]} takes OpenAI's "
            "fields, vLLM's sampling extras and retrieval, task, adapter_version",
            unknown[0][:60],
        )


_PATHS = {"chat": "chat/completions", "completions": "completions"}


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of {role, content} objects; ApiError 400 naming the first
    one that is not."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "`messages` is required: a non-empty list of {role, content}", "messages"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(
                400,
                f"messages.{i}: expected an object with a string `role` (got {shorten(m)})",
                f"messages.{i}",
            )
        if m["role"] not in ROLES:
            raise ApiError(
                400,
                f"messages.{i}.role: {shorten(m['role'])} is not a chat role "
                f"(one of {', '.join(ROLES)})",
                f"messages.{i}.role",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(
                400,
                f"messages.{i}.content: expected a string or a list of content parts",
                f"messages.{i}.content",
            )
    return messages


def check_generation_params(body: dict[str, Any], spec: BaseModelSpec) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ApiError(400, f"`{key}` must be a positive integer (got {shorten(v)})", key)
        if isinstance(v, int) and v >= spec.max_model_len:
            raise ApiError(
                400,
                f"`{key}`={v} does not fit the context of {spec.id} "
                f"({spec.max_model_len} tokens, prompt included)",
                key,
            )
    n = body.get("n")
    if n is not None and (
        not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= spec.max_n
    ):
        raise ApiError(400, f"`n` must be between 1 and {spec.max_n} (got {shorten(n)})", "n")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise ApiError(400, "`stream_options` must be an object", "stream_options")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        check_schema((fmt.get("json_schema") or {}).get("schema"))


def check_schema(schema: Any) -> None:
    """A ``json_schema`` response format's schema: an object, not nested deeper than
    :data:`MAX_SCHEMA_DEPTH`, valid for its JSON Schema draft."""
    if not isinstance(schema, dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema must be a JSON schema object",
            "response_format",
        )
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ApiError(
            400,
            f"response_format: the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels",
            "response_format",
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ApiError(
            400,
            f"response_format: not a valid JSON schema: {shorten(e.message, 200)}",
            "response_format",
        ) from None


def _depth(value: Any) -> int:
    """How deeply ``value`` nests (iteratively: a deep one must not exhaust the stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if d > MAX_SCHEMA_DEPTH:
            break
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        todo.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest
