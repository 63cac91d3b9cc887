"""The serving config: base models, adapters, routes, replicas, keys, HTTP.

Owns: :class:`ServingConfig` and its parts, loaded from YAML (``serving/local.yaml``)
with ``--set`` overrides and validated before Ray starts: names unique, every route's
base model and adapter defined, registry references well formed, keys usable. Does not
own: turning the config into deployments (``builder``) or checking that the registry
really holds the adapters (done by ``builder.check`` before anything starts).

A route is what a client names in ``model``: a base model, optionally an adapter
(a registry reference such as ``json-answer@production`` or ``json-answer/3``),
optional retrieval (collection, top_k, mode, filter) and an optional system prompt.
Every base model is also reachable as itself, and every adapter as ``base:adapter``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from loraplex.config import NAME, StrictModel, load_model
from loraplex.models.adapters import parse_registry_ref
from loraplex.retrieval.spec import COLLECTION, RetrievalSpec
from loraplex.serving.keys import ApiKey, AuthConfig
from loraplex.serving.scaling import RetrieverScaling, Scaling

EMBEDDINGS = "embeddings"  # what a key lists in `models` to use /v1/embeddings


def _registry_ref(ref: str) -> str:
    parse_registry_ref(ref)
    return ref


RegistryRef = Annotated[str, AfterValidator(_registry_ref)]


class BaseModelSpec(StrictModel):
    """One base model served by vLLM, with the adapters it may carry."""

    id: str = Field(pattern=NAME, description="The name clients use in `model`.")
    source: str = Field(
        default="embedded",
        description="'embedded' (the bootstrap model), a local HF folder, runs:/ or models:/ "
        "MLflow URI, or a hub id where the hub is reachable.",
    )
    accelerator: Literal["cpu", "gpu"] = "cpu"
    accelerator_type: str | None = Field(default=None, description="e.g. H100, L4 (GPU only).")
    max_model_len: int = Field(default=1024, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: the model's own dtype, except on a CPU without native bfloat16 "
        "(AVX-512 BF16 or AMX), where it is float32: vLLM would run bfloat16 weights "
        "emulated there (SmolLM2 on an AVX2 CPU: 23 against 89 tokens/s at 8 requests).",
    )
    kv_cache_gib: float = Field(
        default=1.0, gt=0, description="CPU: VLLM_CPU_KVCACHE_SPACE. GPU: ignored."
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to vLLM's engine as they are."
    )
    max_adapters_per_replica: int = Field(
        default=8,
        ge=1,
        description="Adapter versions a replica keeps loaded in host memory (Serve's "
        "multiplexing and vLLM's max_cpu_loras; least recently used out).",
    )
    max_adapters_per_batch: int | None = Field(
        default=None,
        ge=1,
        description="Distinct adapters in one engine step (vLLM's max_loras: the "
        "accelerator's slots). Default: max_adapters_per_replica.",
    )
    max_lora_rank: int = Field(default=64, ge=1, le=512)
    max_n: int = Field(default=8, ge=1, description="Largest `n` a request may ask for.")
    num_cpus: float = Field(
        default=1.0,
        ge=0,
        description="Logical CPUs reserved for the replica actor, beside the vLLM engine's own "
        "bundle (one CPU on CPU, the GPUs on GPU).",
    )
    scaling: Scaling = Field(default_factory=Scaling)

    @model_validator(mode="after")
    def _batch_within_replica(self) -> BaseModelSpec:
        batch = self.max_adapters_per_batch
        if batch is not None and batch > self.max_adapters_per_replica:
            raise ValueError(
                f"model {self.id}: max_adapters_per_batch ({batch}) cannot exceed "
                f"max_adapters_per_replica ({self.max_adapters_per_replica})"
            )
        return self


class AdapterCacheConfig(StrictModel):
    """The node-local disk tier between the registry and the replicas' memory."""

    disk_gib: float = Field(
        default=4.0,
        gt=0,
        description="Bytes of adapter versions each node keeps on disk (least recently "
        "used out; versions a replica holds loaded stay).",
    )


class RollbackBounds(StrictModel):
    """When a canary stops receiving traffic: its outcomes over a sliding window, against
    the stable version's over the same window."""

    window_s: float = Field(default=60, ge=1, le=3600, description="The sliding window.")
    min_requests: int = Field(
        default=20, ge=1, description="Canary requests in the window before it is judged."
    )
    max_error_rate_increase: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="5xx rate of the canary minus the stable version's (0.05 = 5 points).",
    )
    max_p95_latency_ratio: float = Field(
        default=1.5,
        gt=1,
        description="The canary's p95 latency over the stable version's (both judged only "
        "with min_requests answers each in the window).",
    )
    max_format_failure_increase: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Structured-output failures (JSON asked for, not JSON answered) of the "
        "canary minus the stable version's, as rates.",
    )
    max_unsupported_increase: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Answers with sources that their cited passages do not support "
        "(loraplex.answers, as the evaluation's faithfulness) of the canary minus the "
        "stable version's, as rates.",
    )


class CanarySpec(StrictModel):
    """A share of an adapter's requests goes to another version of it (the canary)."""

    registry: RegistryRef = Field(description="NAME@ALIAS or NAME/VERSION of the canary.")
    percent: float = Field(gt=0, lt=100, description="Share of requests, in percent.")
    sticky_by: Literal["header-or-key", "none"] = Field(
        default="header-or-key",
        description="header-or-key: one end user always gets the same version (the "
        "x-loraplex-user header, else the body's OpenAI `user`, else the API key's name); "
        "none: each request is drawn anew.",
    )
    rollback: RollbackBounds = Field(default_factory=RollbackBounds)


class ShadowSpec(StrictModel):
    """Another version that also answers a share of an adapter's requests, unseen: its
    answers are compared with the served ones, never returned."""

    registry: RegistryRef = Field(description="NAME@ALIAS or NAME/VERSION of the shadow.")
    percent: float = Field(default=100, gt=0, le=100, description="Share of requests shadowed.")
    max_in_flight: int = Field(
        default=4, ge=1, le=64, description="Shadow requests at once per ingress replica."
    )
    window_s: float = Field(default=300, ge=1, le=86400, description="What the status shows.")


class AdapterSpec(StrictModel):
    """An adapter from the MLflow registry, served on one base model."""

    name: str = Field(pattern=NAME, description="Clients use `<base>:<name>`.")
    base: str = Field(pattern=NAME, description="The id of a base model above.")
    registry: RegistryRef = Field(
        description="NAME@ALIAS (follows promotion) or NAME/VERSION (pinned)."
    )
    canary: CanarySpec | None = Field(
        default=None, description="Send a share of this adapter's requests to another version."
    )
    shadow: ShadowSpec | None = Field(
        default=None,
        description="Also send a share of its (non-streaming) requests to another version, "
        "and compare the answers without returning them.",
    )

    @model_validator(mode="after")
    def _canary_differs(self) -> AdapterSpec:
        for what, spec in (("canary", self.canary), ("shadow", self.shadow)):
            if spec is not None and spec.registry == self.registry:
                raise ValueError(
                    f"adapter {self.name}: the {what} {spec.registry!r} is the adapter itself"
                )
        return self


class RouteRetrieval(RetrievalSpec):
    """A route's retrieval: what it searches (a request may only narrow it)."""

    on_unavailable: Literal["error", "answer_without_context"] = Field(
        default="error",
        description="When Milvus cannot be reached: 503 (error), or answer without sources "
        "and say so in the response (answer_without_context).",
    )


class Route(StrictModel):
    """A named assistant: base model + optional adapter + optional retrieval."""

    name: str = Field(pattern=NAME)
    base: str = Field(pattern=NAME)
    adapter: str | None = Field(default=None, description="The name of an adapter above.")
    retrieval: RouteRetrieval | None = None
    system_prompt: str | None = Field(default=None, max_length=8000)
    task: Literal["chat", "json_answer", "classify_ticket"] = Field(
        default="chat",
        description="How the user turn is framed: as it is (chat), with the instruction to "
        'reply {"answer": ..., "sources": [...]} (json_answer), or as a support ticket to '
        "classify (classify_ticket): the prompts the adapters were trained on.",
    )


class HttpConfig(StrictModel):
    host: str | None = Field(
        default=None, description="Default: 0.0.0.0 with keys, 127.0.0.1 without (forced)."
    )
    port: int = Field(default=8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description=(
            "Where Serve runs its HTTP proxy (Ray Serve's proxy_location): every node, as "
            "on KubeRay, or the head only (nodes that share one address, as in tests)."
        ),
    )
    request_timeout_s: float = Field(
        default=300, gt=0, description="End-to-end deadline of one request (504 after it)."
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger request bodies get 413."
    )
    body_read_s: float = Field(
        default=30,
        gt=0,
        description="A request body must arrive within this time (408 after it); the "
        "request holds one of its key's slots while it arrives.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); none by default.",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*" or not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(
                    f"cors origin {origin!r}: give full origins such as https://app.example "
                    "(no '*': keys are credentials)"
                )
        return v


class Timeouts(StrictModel):
    """How long the ingress waits for each backend before it answers for it."""

    retrieval_s: float = Field(default=10, gt=0, description="A search (then 503).")
    registry_s: float = Field(
        default=5, gt=0, description="One MLflow registry call (alias refresh)."
    )


class ServingConfig(StrictModel):
    """What `loraplex serve` runs: one application, one OpenAI-compatible endpoint."""

    name: str = Field(default="loraplex", pattern=NAME, description="Serve application name.")
    models: list[BaseModelSpec] = Field(min_length=1)
    adapters: list[AdapterSpec] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    retriever: RetrieverScaling | None = Field(
        default_factory=RetrieverScaling,
        description="The retriever deployment; null to serve without retrieval.",
    )
    ingress: Scaling = Field(
        default_factory=lambda: Scaling(max_ongoing_requests=1000, num_cpus=0.5)
    )
    adapter_cache: AdapterCacheConfig = Field(default_factory=AdapterCacheConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    alias_refresh_s: float = Field(
        default=10.0, gt=0, le=30, description="How often an alias is re-read from the registry."
    )
    log_prompts: bool = Field(default=False, description="Log prompt text (off by default).")

    @model_validator(mode="after")
    def _references(self) -> ServingConfig:
        bases = [m.id for m in self.models]
        _unique("models", bases)
        _unique("adapters", [a.name for a in self.adapters])
        _unique("routes", [r.name for r in self.routes])
        adapters = {a.name: a for a in self.adapters}
        for a in self.adapters:
            if a.base not in bases:
                raise ValueError(f"adapter {a.name}: base {a.base!r} is not one of {bases}")
        for r in self.routes:
            if r.name in bases or ":" in r.name:
                raise ValueError(f"route {r.name}: the name of a base model cannot be a route")
            if r.base not in bases:
                raise ValueError(f"route {r.name}: base {r.base!r} is not one of {bases}")
            if r.adapter is not None:
                if r.adapter not in adapters:
                    raise ValueError(
                        f"route {r.name}: adapter {r.adapter!r} is not one of {sorted(adapters)}"
                    )
                if adapters[r.adapter].base != r.base:
                    raise ValueError(
                        f"route {r.name}: adapter {r.adapter} belongs to {adapters[r.adapter].base}"
                    )
            if r.retrieval is not None and self.retriever is None:
                raise ValueError(f"route {r.name}: has retrieval but `retriever` is null")
        for k in self.auth.keys:
            self._check_key(k)
        return self

    def _check_key(self, k: ApiKey) -> None:
        known = (
            {m.id for m in self.models}
            | {r.name for r in self.routes}
            | {f"{a.base}:{a.name}" for a in self.adapters}
            | ({EMBEDDINGS} if self.retriever is not None else set())
        )
        unknown = [m for m in k.models if m != "*" and m not in known]
        if unknown:
            raise ValueError(f"key {k.name}: unknown models {unknown}")
        bad = [c for c in k.collections if c != "*" and not re.match(COLLECTION, c)]
        if bad:
            raise ValueError(f"key {k.name}: not collection names: {bad}")

    def key_digests(self, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Every key's digest -> scope (the config's and the environment's, each checked
        against this config's models); ValueError on a bad or repeated key."""
        keys = self.auth.all_keys(env)
        for key, _ in keys:
            self._check_key(key)
        return {digest: self.auth.record(key) for key, digest in keys}

    def anonymous_record(self) -> dict[str, Any]:
        return self.auth.anonymous_record()


def _unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate names {dupes}")


def load_serving_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """YAML file (or the embedded default, ``serving/local.yaml``) + ``--set`` overrides."""
    return load_model(ServingConfig, path, overrides)
