"""Serving config -> checks -> Ray Serve application (the Ray Serve LLM way).

Owns: :func:`check` (everything that can be wrong before Ray starts: base model
folders, adapters in the registry, keys), :func:`llm_config` (one ``LLMConfig`` per
base model: vLLM engine settings, CPU or GPU, LoRA limits, replicas/autoscaling, the
``LORAPLEX_*`` environment its adapter downloader needs), :func:`build` (LLMServer
deployments + the Retriever + :class:`~loraplex.serving.ingress.LoraplexIngress`),
:func:`build_app`, the import path for ``serve run`` / ``serve deploy`` / a RayService
``serveConfigV2``, and :func:`start`, the one place loraplex itself starts the
application. Does not own: request handling (``ingress``) or running until stopped
(``loraplex serve``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from loraplex.config import LoraplexConfig, StrictModel, load_model, load_settings
from loraplex.errors import InputError
from loraplex.models import tags
from loraplex.models.resolve import resolve_base_model
from loraplex.ray_runtime import init_ray
from loraplex.serving.aliases import AliasResolver
from loraplex.serving.canary import CANARY_SECRET_ENV, canary_secret
from loraplex.serving.config import BaseModelSpec, ServingConfig, load_serving_config

log = logging.getLogger("loraplex.serving")
REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "serving" / "local.yaml"


@dataclass(frozen=True)
class Checked:
    """What :func:`check` found: base model folders (and the references every node can
    download them by), adapter versions, key digests."""

    base_dirs: dict[str, Path]
    adapter_versions: dict[str, str]
    key_digests: dict[str, dict[str, Any]]
    base_refs: dict[str, str]


def check(cfg: ServingConfig, settings: LoraplexConfig) -> Checked:
    """Fail fast, with the reason, on anything the application could not serve."""
    resolved = {m.id: resolve_base_model(m.source, settings) for m in cfg.models}
    base_dirs = {k: v[0] for k, v in resolved.items()}
    resolver = AliasResolver(settings, cfg.alias_refresh_s, cfg.timeouts.registry_s)
    versions = {}
    for a in cfg.adapters:
        versions[f"{a.base}:{a.name}"] = resolver.check(a.registry)
        for what, spec in (("canary", a.canary), ("shadow", a.shadow)):
            if spec is not None:
                _check_rollout(resolver, a.name, a.registry, spec.registry, what)
    try:
        digests = cfg.key_digests()
    except ValueError as e:
        raise InputError(f"auth: {e}") from None
    if not digests and not cfg.auth.allow_anonymous:
        raise InputError(
            f"no API keys (auth.keys or ${cfg.auth.keys_env}): refusing to serve openly; "
            "add keys, or set auth.allow_anonymous: true to serve loopback clients only"
        )
    return Checked(base_dirs, versions, digests, {k: v[1] for k, v in resolved.items()})


def _check_rollout(resolver, adapter: str, stable: str, other: str, what: str) -> None:
    """A canary's or shadow's version exists and was trained on the stable version's base
    model."""
    base_tag = tags.BASE_MODEL
    on_stable, on_other = (resolver.tags(r).get(base_tag) for r in (stable, other))
    if on_stable != on_other:
        raise InputError(
            f"adapter {adapter}: its {what} {other} was trained on "
            f"{on_other or 'an unknown base'}, but {stable} on {on_stable or 'an unknown base'}"
            f": a {what} must share the base model"
        )


def settings_env(settings: LoraplexConfig) -> dict[str, str]:
    """The ``LORAPLEX_*`` variables that let a replica rebuild the settings it needs."""
    env = {
        "LORAPLEX_HOME": str(settings.home),
        "LORAPLEX_MLFLOW__TRACKING_URI": str(settings.mlflow.tracking_uri),
        "LORAPLEX_ADAPTERS__URI": str(settings.adapters.uri),
    }
    if settings.mlflow.registry_uri:
        env["LORAPLEX_MLFLOW__REGISTRY_URI"] = settings.mlflow.registry_uri
    return env


def engine_dtype(spec: BaseModelSpec) -> str:
    """The dtype vLLM gets: the spec's, with ``auto`` on a CPU that has no native
    bfloat16 arithmetic (no AVX-512 BF16, no AMX) made float32, since vLLM's own ``auto``
    keeps a bfloat16 checkpoint in bfloat16 and the CPU then emulates every product.
    Decided on the machine that builds the application: a cluster whose nodes differ
    should name the dtype."""
    if spec.dtype != "auto" or spec.accelerator != "cpu":
        return spec.dtype
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "auto" if native else "float32"


def llm_config(
    spec: BaseModelSpec,
    base_dir: Path,
    settings: LoraplexConfig,
    with_lora: bool,
    base_ref: str,
    disk_gib: float = 4.0,
):
    """Ray Serve LLM's config for one base model. ``base_dir`` is the driver's folder; a
    replica on a node that does not see it downloads ``base_ref`` (``models:/...``);
    ``disk_gib`` is the node's adapter disk cache budget."""
    # Ray Serve LLM and vLLM take seconds to import: only what builds an application pays
    from loraplex.serving.adapters import BASE_MODEL_ENV, DISK_BYTES_ENV
    from loraplex.serving.ray_llm import LLMConfig

    engine: dict[str, Any] = {
        "max_model_len": spec.max_model_len,
        "dtype": engine_dtype(spec),
        # JSON-schema answers without free whitespace: small models otherwise fill the
        # allowed whitespace until max_tokens.
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
    }
    env = {**settings_env(settings), "TOKENIZERS_PARALLELISM": "false"}
    env[BASE_MODEL_ENV] = base_ref
    env[DISK_BYTES_ENV] = str(int(disk_gib * 2**30))
    if spec.accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(spec.kv_cache_gib)))
    else:
        engine["gpu_memory_utilization"] = spec.gpu_memory_utilization
    if with_lora:
        engine.update(
            enable_lora=True,
            max_loras=spec.max_adapters_per_batch or spec.max_adapters_per_replica,
            max_cpu_loras=spec.max_adapters_per_replica,
            max_lora_rank=spec.max_lora_rank,
        )
    engine.update(spec.engine_kwargs)
    deployment = spec.scaling.deployment_config()
    deployment["ray_actor_options"] = {
        **deployment.get("ray_actor_options", {}),
        "num_cpus": spec.num_cpus,
    }
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.id, "model_source": str(base_dir)},
        "engine_kwargs": engine,
        "deployment_config": deployment,
        "runtime_env": {"env_vars": env},
        "log_engine_metrics": True,
        # the base model is on the replica's node before vLLM starts (LoraplexLLMServer)
        "callback_config": {"callback_class": "loraplex.serving.adapters.BaseModelOnThisNode"},
    }
    if spec.accelerator == "cpu":
        kwargs["accelerator_config"] = {"kind": "cpu"}
    elif spec.accelerator_type:
        kwargs["accelerator_type"] = spec.accelerator_type
    if with_lora:
        kwargs["lora_config"] = {"max_num_adapters_per_replica": spec.max_adapters_per_replica}
    return LLMConfig(**kwargs)


def build(cfg: ServingConfig, settings: LoraplexConfig, checked: Checked | None = None):
    """The Serve application (ingress bound to the LLM servers and the retriever)."""
    from ray import serve

    # here, not at the top: Ray Serve LLM and vLLM take about 15 s to import; only what
    # builds or checks an application needs them
    from loraplex.serving.adapters import LoraplexLLMServer, RegistryLoraLoader
    from loraplex.serving.gate import build_fastapi_app
    from loraplex.serving.ingress import ENDPOINTS, LoraplexIngress
    from loraplex.serving.ray_llm import build_llm_deployment, make_fastapi_ingress
    from loraplex.serving.retriever import build_retriever

    checked = checked or check(cfg, settings)
    with_lora = {a.base for a in cfg.adapters}
    deployments = {}
    cards = {}
    for spec in cfg.models:
        conf = llm_config(
            spec,
            checked.base_dirs[spec.id],
            settings,
            spec.id in with_lora,
            checked.base_refs[spec.id],
            cfg.adapter_cache.disk_gib,
        )
        deployments[spec.id] = build_llm_deployment(
            conf,
            bind_kwargs={"model_downloader": RegistryLoraLoader},
            deployment_cls=LoraplexLLMServer,
        )
        cards[spec.id] = {"id": spec.id}
    retriever = (
        build_retriever(settings, cfg.retriever, http=False) if cfg.retriever is not None else None
    )
    # auth, body size and per-key limits run in the app's middleware (``gate``), before
    # any endpoint; the key digests reach the replicas inside it, never the plain keys
    app = build_fastapi_app(cfg, checked.key_digests)
    ingress_cls = make_fastapi_ingress(LoraplexIngress, endpoint_map=ENDPOINTS, app=app)
    options = cfg.ingress.deployment_config()
    options.setdefault("ray_actor_options", {}).setdefault("num_cpus", 0.5)
    return serve.deployment(ingress_cls, name="LoraplexIngress", **options).bind(
        llm_deployments=deployments,
        model_cards=cards,
        serving=cfg.model_dump(mode="json"),
        settings=settings.model_dump(mode="json"),
        retriever=retriever,
        anonymous=not checked.key_digests,
        special_tokens={k: special_tokens(v) for k, v in checked.base_dirs.items()},
        canary_secret=canary_secret(checked.key_digests, os.environ.get(CANARY_SECRET_ENV)),
    )


def special_tokens(folder: Path) -> list[str]:
    """The control tokens of a base model's tokenizer (every added token marked special),
    longest first: text in a retrieved passage that would tokenize to one is escaped
    (``prompts.fence_text``). Read from the folder's JSON, without transformers."""
    found: set[str] = set()
    tokenizer = folder / "tokenizer.json"
    if tokenizer.exists():
        added = json.loads(tokenizer.read_text(encoding="utf-8")).get("added_tokens") or []
        found |= {t["content"] for t in added if t.get("special") and t.get("content")}
    config = folder / "tokenizer_config.json"
    if config.exists():
        data = json.loads(config.read_text(encoding="utf-8"))
        decoder = data.get("added_tokens_decoder") or {}
        found |= {t["content"] for t in decoder.values() if t.get("special") and t.get("content")}
        for extra in data.get("additional_special_tokens") or []:
            found.add(extra if isinstance(extra, str) else extra.get("content", ""))
    return sorted(filter(None, found), key=lambda t: (-len(t), t))


def start(
    cfg: ServingConfig,
    settings: LoraplexConfig,
    checked: Checked | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> str:
    """The one way loraplex starts its application: Ray (local or ``ray.address``),
    Serve's HTTP proxy on ``host:port``, the application deployed and running. Returns
    the OpenAI base URL. ``loraplex serve``, the demo, the benchmarks and the tests all
    start it here."""
    from ray import serve

    checked = checked or check(cfg, settings)  # refused before Ray starts anything
    # Ray first, the way the settings say: Ray Serve LLM's deployment builder starts a
    # default local Ray when none runs (one logical CPU per core: 2 here), on which the
    # LLM server's CPU bundles take everything and the retriever and ingress never
    # schedule
    init_ray(settings)
    app = build(cfg, settings, checked)
    port = port or cfg.http.port
    serve.start(proxy_location=cfg.http.proxy_location, http_options={"host": host, "port": port})
    serve.run(app, name=cfg.name, route_prefix="/")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"


class AppArgs(StrictModel):
    """Arguments of ``serve run loraplex.serving.builder:build_app`` (and RayService)."""

    config: str | dict[str, Any] = Field(
        default=str(DEFAULT_CONFIG),
        description="Serving config: a YAML path, or the config itself (k8s render inlines it).",
    )
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE for the config.")
    settings_file: str | None = None
    settings: list[str] = Field(default_factory=list, description="KEY=VALUE settings.")


def build_app(args: dict[str, Any] | None = None):
    """Ray Serve application builder: ``import_path: loraplex.serving.builder:build_app``."""
    parsed = AppArgs.model_validate(args or {})
    if isinstance(parsed.config, dict):
        cfg = load_model(ServingConfig, None, parsed.overrides, base=parsed.config)
    else:
        path = Path(parsed.config)
        if not path.is_absolute() and not path.exists() and (REPO / path).exists():
            path = REPO / path  # serve run from elsewhere: the repo's serving/ configs
        cfg = load_serving_config(path, parsed.overrides)
    settings = load_settings(parsed.settings_file, parsed.settings)
    checked = check(cfg, settings)  # refuses to start without keys unless allow_anonymous
    if not checked.key_digests:
        log.warning(
            "no API keys (auth.allow_anonymous): answering loopback clients only, whatever "
            "the HTTP host"
        )
    return build(cfg, settings, checked)
