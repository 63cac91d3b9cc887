"""Prometheus metrics of the serving application, exported on Ray's metrics endpoint.

Owns: the metric objects (``ray.util.metrics``; Ray exports them with the prefix
``ray_``): requests, errors, prompt and completion tokens, request latency and
retrieval latency per route and adapter; adapter loads and evictions per adapter; the
adapter disk cache's lookups, load seconds per tier and bytes held;
requests, tokens and 429s per key name; requests shed; stale registry answers;
structured-output failures and canary halts of adapters with a canary; shadow requests.
Does not own: Ray Serve's and vLLM's own metrics, which are exported beside these.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

ROUTE_TAGS = ("route", "adapter")
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

requests = Counter(
    "loraplex_requests", "Requests per route and adapter.", tag_keys=(*ROUTE_TAGS, "endpoint")
)
errors = Counter(
    "loraplex_request_errors",
    "Requests answered with an error, per route, adapter and HTTP status.",
    tag_keys=(*ROUTE_TAGS, "status"),
)
prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens.", tag_keys=ROUTE_TAGS)
completion_tokens = Counter("loraplex_completion_tokens", "Completion tokens.", tag_keys=ROUTE_TAGS)
latency = Histogram(
    "loraplex_request_latency_s",
    "Seconds from request to last token.",
    boundaries=LATENCY_BOUNDARIES,
    tag_keys=ROUTE_TAGS,
)
retrieval_latency = Histogram(
    "loraplex_retrieval_latency_s",
    "Seconds spent in retrieval (embedding + Milvus search).",
    boundaries=LATENCY_BOUNDARIES,
    tag_keys=ROUTE_TAGS,
)
adapter_loads = Counter(
    "loraplex_adapter_loads", "Adapter versions loaded into a replica.", tag_keys=("adapter",)
)
adapter_evictions = Counter(
    "loraplex_adapter_evictions",
    "Adapter versions evicted from a replica (least recently used).",
    tag_keys=("adapter",),
)
adapter_cache = Counter(
    "loraplex_adapter_cache_lookups",
    "Adapter versions looked up in the node's disk cache, by outcome: hit, miss (fetched "
    "from the registry) or damaged (a file changed since it was fetched: fetched again), "
    "per registered adapter name.",
    tag_keys=("tier", "outcome", "adapter"),
)
adapter_load_s = Histogram(
    "loraplex_adapter_load_s",
    "Seconds to have an adapter version's files ready for the engine, by the tier they "
    "came from (disk: the node's cache; registry: downloaded).",
    boundaries=LATENCY_BOUNDARIES,
    tag_keys=("tier",),
)
adapter_cache_bytes = Gauge(
    "loraplex_adapter_cache_bytes",
    "Bytes of adapter versions held in the node's disk cache.",
    tag_keys=("tier",),
)
key_requests = Counter(
    "loraplex_key_requests",
    "Requests admitted per API key name (never the key itself).",
    tag_keys=("key",),
)
key_tokens = Counter(
    "loraplex_key_tokens", "Prompt + completion tokens per API key name.", tag_keys=("key",)
)
key_rejections = Counter(
    "loraplex_key_rejections",
    "Requests refused with 429 per API key name and the limit it hit.",
    tag_keys=("key", "limit"),
)
shed = Counter(
    "loraplex_shed", "Requests shed with 503/504 (queue full, deadline).", tag_keys=("reason",)
)
registry_stale = Counter(
    "loraplex_registry_stale",
    "Alias lookups answered from the last good version while the registry was unreachable.",
    tag_keys=("adapter",),
)
format_failures = Counter(
    "loraplex_format_failures",
    "Answers that were asked for JSON (task json_answer or a JSON response_format) and "
    "were not JSON, per adapter version with a canary.",
    tag_keys=("adapter",),
)
canary_halts = Counter(
    "loraplex_canary_halts",
    "Canaries halted by the automatic rollback, per adapter and canary version.",
    tag_keys=("adapter", "version"),
)
shadow_requests = Counter(
    "loraplex_shadow_requests",
    "Shadow requests per adapter and shadow version, by outcome (agreed / differed with "
    "the served answer, error).",
    tag_keys=("adapter", "version", "outcome"),
)
