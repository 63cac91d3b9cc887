"""The end-to-end demo: from nothing to a served, evaluated "RAG or fine-tuning?" answer.

Owns: the recipe ``loraplex demo`` / ``make demo`` runs, for one of :data:`DEMO_MODELS`
(the tiny model ``loraplex bootstrap`` trains, or SmolLM2-135M-Instruct, a real
pretrained chat model), each step reusing what exists: the embedded world and the base
model (bootstrapped, or imported); train the adapters (Ray Train +
DeepSpeed, tracked in MLflow, registered) unless a version trained on the current base
model is registered; generate a held-out world (a seed never used in training) and
ingest its documents; start the serving application; run the four-way evaluation on
the held-out questions; print the table, the report, how to open MLflow, and how to call
the endpoint. Does not own: any of those steps (each lives in its own module).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.config import LoraplexConfig
from loraplex.errors import InputError
from loraplex.evaluation.run import EvalOptions, evaluate_endpoint
from loraplex.models.adapters import parse_registry_ref
from loraplex.models.importer import import_model
from loraplex.models.resolve import models_dir, resolve_base_model
from loraplex.retrieval.retriever import Retriever
from loraplex.serving.builder import check, start
from loraplex.serving.config import AdapterSpec, load_serving_config
from loraplex.training.config import load_train_config
from loraplex.training.dataset import dataset_sha256
from loraplex.training.job import run_training
from loraplex.world.generate import generate_world, is_current

if TYPE_CHECKING:
    from loraplex.training.config import TrainConfig

log = logging.getLogger("loraplex.demo")
REPO = Path(__file__).resolve().parents[2]
PRODUCTION = "production"  # the alias the shipped serving configs serve
CONFIGS = REPO / "jobs" / "configs"


@dataclass(frozen=True)
class DemoModel:
    """What the demo runs for one base model."""

    base_model: str  # the training configs' base_model: "embedded" or an imported name
    serving_config: Path
    adapter_configs: dict[str, Path]
    top_k: int  # retrieved chunks per question in the +rag configurations
    first_time: str  # what step 1 costs the first time


DEMO_MODELS: dict[str, DemoModel] = {
    "tiny": DemoModel(
        base_model="embedded",
        serving_config=REPO / "serving" / "local.yaml",
        adapter_configs={
            "json-answer": CONFIGS / "json_answer.yaml",
            "ticket-classify": CONFIGS / "ticket_classify.yaml",
            "raft-json": CONFIGS / "raft_json.yaml",
        },
        top_k=1,
        first_time="about 14 minutes the first time: pretraining",
    ),
    "smollm2-135m-instruct": DemoModel(
        base_model="smollm2-135m-instruct",
        serving_config=REPO / "serving" / "smollm2.yaml",
        adapter_configs={
            "json-answer": CONFIGS / "smollm2" / "json_answer.yaml",
            "ticket-classify": CONFIGS / "smollm2" / "ticket_classify.yaml",
        },
        top_k=3,
        first_time="about 2 minutes the first time: import and checks",
    ),
}


@dataclass
class DemoOptions:
    eval_seed: int = 7
    questions: int = 100
    port: int = 8000
    raft: bool = False
    train_overrides: list[str] = field(default_factory=list)
    top_k: int | None = None  # None: the model's default
    model: str = "smollm2-135m-instruct"


def step(n: int, total: int, text: str) -> None:
    log.info("[demo %d/%d] %s", n, total, text)


def reusable_version(settings: LoraplexConfig, cfg: TrainConfig) -> str | None:
    """The ``candidate`` version of ``cfg``'s adapter if it was trained on the current
    base model and on the current dataset files, else None (it must be trained)."""
    from mlflow import MlflowClient

    name = cfg.mlflow.registered_model
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    base_dir = resolve_base_model(cfg.base_model, settings)[0]
    built = max(p.stat().st_mtime for p in base_dir.iterdir() if p.is_file()) * 1000
    try:
        current = client.get_model_version_by_alias(name, "candidate")
        trained_on = client.get_run(current.run_id).data.tags.get("loraplex.dataset_sha256")
    except Exception:  # not registered yet, or its run is gone
        return None
    if current.creation_timestamp < built:
        log.info("adapter %s version %s was trained on an older base model", name, current.version)
        return None
    if trained_on != dataset_sha256(cfg.data):
        log.info("adapter %s version %s was trained on other datasets", name, current.version)
        return None
    return str(current.version)


def ensure_adapter(settings: LoraplexConfig, config: Path, overrides: list[str]) -> str:
    """A registered version of the adapter ``config`` trains, trained on the current base
    model and datasets: reused when one exists, trained otherwise."""

    cfg = load_train_config(config, tuple(overrides), settings.home)
    name = cfg.mlflow.registered_model
    version = reusable_version(settings, cfg)
    if version is not None:
        log.info("adapter %s version %s reused (same base model and datasets)", name, version)
        return version
    log.info("training adapter %s (Ray Train + DeepSpeed, tracked in MLflow)", name)
    return run_training(cfg, settings).version


def release_first_version(settings: LoraplexConfig, name: str, version: str) -> str:
    """The version ``name@production`` serves. An adapter without one gets ``version`` as
    its first release (nothing to gate it against; the alias log says the demo moved it);
    an existing ``@production`` moves only through ``loraplex adapters promote --gate``."""
    from mlflow import MlflowClient

    from loraplex.models.adapters import promote

    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    try:
        return str(client.get_model_version_by_alias(name, PRODUCTION).version)
    except Exception:  # no @production yet: this is the first release
        pass
    promote(client, name, version, PRODUCTION, why="first release by loraplex demo")
    log.info(
        "adapter %s version %s is the first @%s (nothing to gate against)",
        name,
        version,
        PRODUCTION,
    )
    return version


def prepare_base(settings: LoraplexConfig, model: str) -> None:
    """The embedded world (seed 0, the adapters' training data) and the base model."""
    # here, not at the top: torch and transformers take seconds to import; only this
    # step needs them
    from loraplex.basemodel.bootstrap import DEFAULT_SEED, bootstrap, world_dir

    if model == "tiny":
        bootstrap(settings)
        return
    world = world_dir(settings, DEFAULT_SEED)
    if not is_current(world):
        log.info("generating the embedded world (seed %d) in %s", DEFAULT_SEED, world)
        generate_world(DEFAULT_SEED, world, force=world.exists())
    folder = models_dir(settings) / model
    if (folder / "config.json").exists():
        log.info("base model %s reused (%s)", model, folder)
    else:
        import_model(model, settings)


def run_demo(settings: LoraplexConfig, opts: DemoOptions, serve_forever: bool) -> dict[str, Any]:
    import ray
    from ray import serve

    # here, not at the top: torch and transformers take seconds to import; only this
    # step needs them
    from loraplex.basemodel.bootstrap import world_dir

    total = 6
    started = time.perf_counter()
    if opts.model not in DEMO_MODELS:
        raise InputError(f"--model {opts.model!r}: use one of {', '.join(DEMO_MODELS)}")
    demo_model = DEMO_MODELS[opts.model]
    names = ["json-answer", "ticket-classify"] + (["raft-json"] if opts.raft else [])
    missing = [n for n in names if n not in demo_model.adapter_configs]
    if missing:
        raise InputError(f"--model {opts.model} has no {', '.join(missing)} adapter config")
    if opts.eval_seed == 0:
        raise InputError("--eval-seed 0 is the training world; choose another seed")
    top_k = opts.top_k or demo_model.top_k
    cfg = load_serving_config(demo_model.serving_config, [f"http.port={opts.port}"])
    if opts.raft:
        cfg.adapters.append(
            AdapterSpec(name="raft-json", base=cfg.models[0].id, registry="raft-json@production")
        )

    step(1, total, f"embedded world and base model {opts.model} ({demo_model.first_time})")
    prepare_base(settings, opts.model)
    step(2, total, f"adapters: {', '.join(names)}")
    versions = {
        n: ensure_adapter(settings, demo_model.adapter_configs[n], opts.train_overrides)
        for n in names
    }
    # the demo evaluates the versions it trained (or reused), named by number; the shipped
    # configs serve @production, which the demo sets only for an adapter's first release
    released = {}
    for a in cfg.adapters:
        if a.name in versions:
            registered = parse_registry_ref(a.registry)[0]
            released[a.name] = release_first_version(settings, registered, versions[a.name])
            a.registry = f"{registered}/{versions[a.name]}"

    step(3, total, f"held-out world (seed {opts.eval_seed}) and the knowledge collections")
    eval_world = world_dir(settings, opts.eval_seed)
    if not is_current(eval_world):
        generate_world(opts.eval_seed, eval_world, force=eval_world.exists())
    eval_collection = f"eval_seed_{opts.eval_seed}"
    with Retriever(settings) as r:  # closing frees Milvus Lite for the serving replica
        r.ingest([world_dir(settings) / "docs"], settings.retrieval.collection)
        r.ingest([eval_world / "docs"], eval_collection)

    step(4, total, "serving: vLLM behind Ray Serve, adapters, retriever (1-2 minutes)")
    checked = check(cfg, settings)
    owned_ray = not ray.is_initialized()
    url = start(cfg, settings, checked, port=opts.port)
    try:
        step(
            5,
            total,
            f"four-way evaluation on the held-out test questions (<= {opts.questions}), "
            "then the ticket route on held-out tickets",
        )
        configs = "base,base+rag,adapter,adapter+rag"
        if opts.raft:
            configs += ",adapter:raft-json+rag"
        result = evaluate_endpoint(
            settings,
            EvalOptions(
                questions=eval_world / "queries.jsonl",
                split="test",
                limit=opts.questions,
                configs=configs,
                url=url,
                collection=eval_collection,
                top_k=top_k,
            ),
        )
        tickets = evaluate_endpoint(
            settings,
            EvalOptions(
                questions=eval_world / "tickets.jsonl",
                split="test",
                limit=opts.questions,
                configs="tickets",
                url=url,
                max_tokens=8,
            ),
        )
        result |= {
            "tickets": tickets["summary"]["tickets"],
            "url": url,
            "versions": versions,
            "production": released,
            "model": opts.model,
            "serving_config": str(demo_model.serving_config),
            "seconds": time.perf_counter() - started,
        }
        step(6, total, f"done in {result['seconds'] / 60:.1f} min")
        _print_summary(settings, result, cfg, serving=serve_forever)
        if serve_forever:
            _wait_for_ctrl_c(url)
    finally:
        serve.shutdown()
        if owned_ray:
            ray.shutdown()
    return result


def _print_summary(settings: LoraplexConfig, result: dict[str, Any], cfg, serving: bool) -> None:
    route = cfg.routes[0].name if cfg.routes else cfg.models[0].id
    print()
    print(result["markdown_table"])
    print()
    print(result["recommendation"])
    t = result.get("tickets")
    if t and t.get("label_accuracy") is not None:
        print(
            f"\nTicket classification (route `tickets`, adapter ticket-classify): label "
            f"accuracy {t['label_accuracy']:.2f} on {t['questions']} held-out tickets."
        )
    for a in cfg.adapters:
        evaluated, serving_now = result["versions"].get(a.name), result["production"].get(a.name)
        if evaluated and serving_now and evaluated != serving_now:
            registered = parse_registry_ref(a.registry)[0]
            print(
                f"\n{a.name}: the table measured version {evaluated}; @production serves "
                f"version {serving_now}. `loraplex adapters promote {registered} {evaluated} "
                "--gate GATE_FILE --serve SERVING_CONFIG` moves it once the gate holds "
                "(docs/command-line.md: Gated promotion)."
            )
    print(f"\nreport:   {result['report']}")
    print(f"MLflow:   mlflow ui --backend-store-uri {settings.mlflow.tracking_uri}")
    if not serving:
        config = Path(result.get("serving_config") or REPO / "serving" / "local.yaml")
        command = "loraplex serve" + (
            "" if config.name == "local.yaml" else f" {config.relative_to(REPO)}"
        )
        print(f"endpoint: stopped (--no-serve); `{command}` starts it, then:")
    else:
        print(f"endpoint: {result['url']}")
    print(
        f"  curl {result['url']}/chat/completions -H 'content-type: application/json' "
        f"""-d '{{"model": "{route}", "messages": [{{"role": "user", """
        """"content": "What is the price of the Urven E100?"}]}'"""
    )
    print(
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{result['url']}', "
        f"api_key='none'); print(c.chat.completions.create(model='{route}', messages=[{{'role': "
        "'user', 'content': 'What is the price of the Urven E100?'}]).choices[0].message.content)\""
    )


def _wait_for_ctrl_c(url: str) -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"\nthe endpoint stays up at {url}: Ctrl-C stops it (--no-serve to skip)")
    while not stop.wait(1.0):
        pass
    print("stopping ...")
