"""What serving takes from Ray Serve LLM still exists, and the shipped configs parse.

``loraplex.serving.ray_llm`` imports every Ray Serve LLM name serving uses, some from
``ray.llm._internal``; an upgrade that moves one fails here with the name. The repo's
serving configs are validated by loraplex's model and by Ray Serve's own schema.
"""

from __future__ import annotations

import inspect
import re
import time

import pytest
import yaml
from helpers import REPO


def test_ray_serve_llm_extension_points_are_where_serving_expects_them() -> None:
    from loraplex.serving import ray_llm

    for name in ray_llm.__all__:
        assert getattr(ray_llm, name) is not None, name
    # the hooks serving relies on, by signature
    init = inspect.signature(ray_llm.LLMServer.__init__).parameters
    assert "model_downloader" in init
    loader = inspect.signature(ray_llm.LoraModelLoader.load_model_from_config).parameters
    assert list(loader)[1:] == ["lora_model_id", "llm_config"]
    assert {"model_id", "local_path", "lora_assigned_int_id"} <= set(
        ray_llm.DiskMultiplexConfig.model_fields
    )
    assert hasattr(ray_llm.OpenAiIngress, "_get_configured_serve_handle")
    assert inspect.iscoroutinefunction(ray_llm.LLMServer._maybe_resolve_lora_from_multiplex)
    assert "bind_kwargs" in inspect.signature(ray_llm.build_llm_deployment).parameters
    assert ray_llm.get_lora_id("base:json-answer/3") == "json-answer/3"


def test_shipped_serving_configs_validate() -> None:
    from ray.serve.schema import ServeDeploySchema

    from loraplex.serving.builder import AppArgs
    from loraplex.serving.config import load_serving_config

    cfg = load_serving_config(REPO / "serving" / "local.yaml")
    assert {r.name for r in cfg.routes} == {"docs-qa", "docs-json", "tickets"}
    deploy = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(deploy)
    app = schema.applications[0]
    assert app.import_path == "loraplex.serving.builder:build_app"
    args = AppArgs.model_validate(app.args)
    assert (REPO / args.config).exists()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"routes": [{"name": "r", "base": "nope"}]}, "base 'nope' is not one of"),
        ({"routes": [{"name": "m", "base": "m"}]}, "cannot be a route"),
        (
            {"routes": [{"name": "r", "base": "m", "adapter": "ghost"}]},
            "adapter 'ghost' is not one of",
        ),
        ({"adapters": [{"name": "a", "base": "m", "registry": "a"}]}, "not a registry reference"),
        (
            {"adapters": [{"name": "a", "base": "m", "registry": "a/1"}] * 2},
            "duplicate names ['a']",
        ),
        ({"auth": {"keys": [{"name": "k", "models": ["*"]}]}}, "exactly one of sha256 and env"),
        (
            {"auth": {"keys": [{"name": "k", "sha256": "0" * 64, "models": ["ghost"]}]}},
            "unknown models ['ghost']",
        ),
        ({"models": [{"id": "m", "scaling": {"min_replicas": 3, "max_replicas": 1}}]}, "min_"),
        ({"retriever": None, "routes": [{"name": "r", "base": "m", "retrieval": {}}]}, "null"),
        ({"ingress": {"resources": {"CPU": 1}}}, "'CPU' is not a custom resource"),
        ({"models": [{"id": "m", "scaling": {"resources": {"pool": 0}}}]}, "an amount above 0"),
    ],
)
def test_bad_serving_configs_are_refused_with_the_reason(change: dict, reason: str) -> None:
    from pydantic import ValidationError

    from loraplex.serving.config import ServingConfig

    data = {"models": [{"id": "m"}], **change}
    with pytest.raises(ValidationError) as e:
        ServingConfig.model_validate(data)
    assert reason in str(e.value)


def test_keys_are_kept_hashed_and_scoped_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key reaches no collection a request names and only the default tenant unless it
    says otherwise, from the config or from the environment (a cluster's Secret); a
    partial limits block keeps the default's other limits; a secret or a name given
    twice, an unknown field or model, is refused at start without showing the secret."""
    from loraplex.serving.config import ServingConfig
    from loraplex.serving.keys import hash_key

    monkeypatch.setenv("TEAM_KEY", "sk-team")
    cfg = ServingConfig.model_validate(
        {
            "models": [{"id": "m"}],
            "auth": {
                "keys": [
                    {"name": "team", "env": "TEAM_KEY", "models": ["m"]},
                    {"name": "ops", "sha256": hash_key("sk-ops"), "collections": ["*"]}
                    | {"tenant": "*", "limits": {"requests_per_minute": 5}},
                ]
            },
        }
    )
    digests = cfg.key_digests(
        {"LORAPLEX_API_KEYS": "sk-a, b=sk-b;models=m;collections=kb|docs;tenant=t1;rpm=7"}
    )
    team = digests[hash_key("sk-team")]
    scope = ("name", "models", "collections", "tenant")
    assert [team[k] for k in scope] == ["team", ["m"], [], None]
    assert team["limits"] == cfg.auth.default_limits.model_dump()
    ops = digests[hash_key("sk-ops")]
    assert [ops[k] for k in scope[2:]] == [["*"], "*"]
    assert ops["limits"] == cfg.auth.default_limits.model_dump() | {"requests_per_minute": 5}
    plain = digests[hash_key("sk-a")]
    assert [plain[k] for k in scope] == ["loraplex-api-keys-1", ["*"], [], None]
    b = digests[hash_key("sk-b")]
    assert [b[k] for k in scope] == ["b", ["m"], ["kb", "docs"], "t1"]
    assert b["limits"]["requests_per_minute"] == 7 and b["limits"]["max_concurrent"] == 64
    assert "sk-team" not in repr(digests) and "sk-a" not in repr(digests)
    # a cluster's Secret carries only hashes: NAME=SHA256, with the same fields
    hashed = cfg.key_digests(
        {"LORAPLEX_API_KEY_HASHES": f"ci={hash_key('sk-ci')};tenant=ci;concurrent=2"}
    )
    ci = hashed[hash_key("sk-ci")]
    assert (ci["name"], ci["tenant"], ci["limits"]["max_concurrent"]) == ("ci", "ci", 2)
    for env, reason in [
        ({"LORAPLEX_API_KEY_HASHES": "ci=sk-plain-key"}, "expected NAME=SHA256"),
        ({"LORAPLEX_API_KEYS": "sk-ops"}, "keys ops and loraplex-api-keys-1 are the same secret"),
        ({"LORAPLEX_API_KEYS": "team=sk-x"}, "two keys are named team"),
        ({"LORAPLEX_API_KEYS": "sk-x;models=nope"}, "unknown models ['nope']"),
        ({"LORAPLEX_API_KEYS": "sk-x;colour=red"}, "item 1: unknown field 'colour'"),
        ({"LORAPLEX_API_KEYS": "sk-x,sk-y;tenant=a/b"}, "item 2: tenant"),
        ({"LORAPLEX_API_KEYS": "sk-x;rpm=0"}, "item 1: limits.requests_per_minute"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)) as e:
            cfg.key_digests(env)
        assert "sk-plain-key" not in str(e.value) and "sk-x" not in str(e.value)


def test_serve_run_builder_takes_a_path_or_an_inline_config(tiny_base, ray_local, tmp_path):
    """`serve run` / RayService call build_app(args); k8s render inlines the config."""
    from ray.serve.deployment import Application

    from loraplex.serving.builder import build_app

    inline = {"models": [{"id": "tiny", "source": str(tiny_base.model_dir)}], "retriever": None}
    # without keys `serve run` / a RayService refuses to start ...
    with pytest.raises(Exception, match=r"no API keys .*refusing to serve openly"):
        build_app({"config": inline, "settings": [f"home={tmp_path}"]})
    # ... unless the config asks for loopback-only anonymous serving
    inline["auth"] = {"allow_anonymous": True}
    app = build_app({"config": inline, "settings": [f"home={tmp_path}"]})
    assert isinstance(app, Application)
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(inline))
    app = build_app(
        {"config": str(path), "overrides": ["models.0.max_n=2"], "settings": [f"home={tmp_path}"]}
    )
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="folder /nope does not exist"):
        build_app(
            {
                "config": {"models": [{"id": "x", "source": "/nope"}]},
                "settings": [f"home={tmp_path}"],
            }
        )


def test_keyless_serving_answers_only_loopback_clients_naming_this_machine() -> None:
    from loraplex.serving.gate import loopback_refusal

    for client, host in [
        ("127.0.0.1", "127.0.0.1:8000"),
        ("127.0.0.1", "localhost"),
        ("::1", "[::1]:8000"),
    ]:
        assert loopback_refusal(client, host) is None
    refused = [
        ("10.0.0.7", "10.0.0.1:8000"),  # another machine
        ("127.0.0.1", "evil.example:8000"),  # DNS rebinding: a page's own name
        ("127.0.0.1", ""),
    ]
    for client, host in refused:
        e = loopback_refusal(client, host)
        assert e is not None and e.status == 403 and "loopback clients only" in e.message


def test_alias_resolution_survives_a_registry_outage(tmp_path) -> None:
    """A real MLflow server is stopped while an alias is in use: the alias keeps its last
    version (counted as stale), a never-resolved one is 'registry unavailable', and only
    a registry that answers 'no such model' makes a 404 ('not in the registry')."""
    import asyncio

    from helpers import free_port, start_mlflow_server, stop
    from mlflow import MlflowClient

    from loraplex.config import load_settings
    from loraplex.errors import InputError
    from loraplex.serving.aliases import (
        AliasResolver,
        RegistryUnavailable,
        short_registry_timeouts,
    )

    proc, url = start_mlflow_server(tmp_path, free_port())
    try:
        client = MlflowClient(tracking_uri=url)
        run = client.create_run("0").info.run_id
        for name in ("answers", "other"):
            client.create_registered_model(name)
            client.create_model_version(name, source=f"runs:/{run}/{name}", run_id=run)
        client.set_registered_model_alias("answers", "production", "1")
        client.set_registered_model_alias("other", "production", "1")
        settings = load_settings(
            overrides=[f"home={tmp_path / 'home'}", f"mlflow.tracking_uri={url}"]
        )
        short_registry_timeouts(2)
        resolver = AliasResolver(settings, refresh_s=0.1, timeout_s=2)
        assert asyncio.run(resolver.resolve("answers@production")) == ("answers", "1")
        with pytest.raises(InputError, match="not in the registry"):
            asyncio.run(resolver.resolve("answers@canary"))
        with pytest.raises(InputError, match="not in the registry"):
            asyncio.run(resolver.resolve("missing@production"))
    finally:
        stop(proc)
    time.sleep(0.2)  # past refresh_s: the next lookup asks the (stopped) registry
    assert asyncio.run(resolver.resolve("answers@production")) == ("answers", "1")
    with pytest.raises(RegistryUnavailable, match=r"cannot be reached|did not answer"):
        asyncio.run(resolver.resolve("other@production"))  # never resolved before


START_ORDER = """
import json, sys
import ray
from loraplex.config import load_settings
from loraplex.serving import builder
from loraplex.serving.config import ServingConfig

def build(cfg, settings, checked=None):  # what Ray looks like when the app is built
    cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    print(json.dumps({"cpus": cpus}))
    ray.shutdown()
    sys.exit(0)

builder.build = build
settings = load_settings(overrides=[f"home={sys.argv[1]}", "ray.num_cpus=5"])
cfg = ServingConfig.model_validate({"models": [{"id": "m", "source": sys.argv[1]}]})
builder.start(cfg, settings, checked=object())
"""


def test_start_brings_up_ray_as_configured_before_building_the_app(tmp_path) -> None:
    """Ray Serve LLM's builder starts a default Ray (one CPU per core) when none runs:
    ``start`` must have started the configured one first, or on a 2-core machine the
    retriever and ingress replicas never schedule."""
    import json
    import subprocess
    import sys

    from helpers import clean_env

    proc = subprocess.run(
        [sys.executable, "-c", START_ORDER, str(tmp_path)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cpus": 5.0}


def test_auto_dtype_is_float32_on_a_cpu_that_emulates_bfloat16(settings, tmp_path) -> None:
    """vLLM's own `auto` keeps a bfloat16 checkpoint in bfloat16; on a CPU without native
    bfloat16 (this 2-core AVX2 machine) that ran SmolLM2 at 23 tokens/s at 8 requests
    against 89 in float32 (benchmarks/RESULTS.md), so loraplex's `auto` asks for float32
    there and leaves explicit choices and GPUs alone."""
    import torch

    from loraplex.serving.builder import llm_config
    from loraplex.serving.config import BaseModelSpec

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

    def engine_dtype(**spec: object) -> str:
        conf = llm_config(BaseModelSpec(id="m", **spec), tmp_path, settings, False, "models:/m/1")
        return conf.engine_kwargs["dtype"]

    assert engine_dtype() == ("auto" if native else "float32")
    assert engine_dtype(dtype="bfloat16") == "bfloat16"
    assert engine_dtype(dtype="float32") == "float32"
    assert engine_dtype(accelerator="gpu") == "auto"


def test_custom_resources_decide_where_each_deployment_may_go(ray_local, settings, tmp_path):
    """`resources` of a deployment's scaling (a KubeRay group started with
    ``--resources '{"cpu-pool": 1}'``) reach Ray: the ingress and the retriever as the
    replica actor's resources, the LLM server inside its placement group's replica bundle
    beside the engine's CPU, with the CPUs loraplex reserves left as they were."""
    from loraplex.serving.adapters import LoraplexLLMServer
    from loraplex.serving.builder import llm_config
    from loraplex.serving.config import BaseModelSpec, ServingConfig

    pool = {"cpu-pool": 0.01}
    cfg = ServingConfig.model_validate(
        {
            "models": [{"id": "m", "num_cpus": 0.5, "scaling": {"resources": pool}}],
            "ingress": {"num_cpus": 0.25, "resources": pool},
            "retriever": {"resources": pool},
        }
    )
    for scaling, cpus in ((cfg.ingress, 0.25), (cfg.retriever, 1.0)):
        assert scaling.deployment_config()["ray_actor_options"] == {
            "num_cpus": cpus,
            "resources": pool,
        }
    spec: BaseModelSpec = cfg.models[0]
    conf = llm_config(spec, tmp_path, settings, False, "models:/m/1")
    options = LoraplexLLMServer.get_deployment_options(conf)
    # one bundle: the replica actor's 0.5 CPU and the pool, with the CPU engine's 1 CPU
    assert options["placement_group_bundles"][0] == {"cpu-pool": 0.01, "CPU": 1.5, "GPU": 0}
