"""SmolLM2-135M-Instruct end to end, once: a short LoRA run on the imported model (Ray
Train + DeepSpeed, tracked in MLflow, registered, tagged with the world it learned
from), served by the application (vLLM on CPU with LoRA, the model's own chat
template) and asked through the official ``openai`` SDK over HTTP, a JSON-schema
request included. The full-size figures come from ``loraplex demo --model
smollm2-135m-instruct`` (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import jsonschema
import openai
import pytest
from helpers import REPO, free_port

# the module's application serves an adapter trained here (a short LoRA run)
pytestmark = pytest.mark.ray_train

KEY = "sk-smollm2-test"


@dataclass
class Served:
    url: str
    adapter_version: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def served(smollm2, ray_local) -> Iterator[Served]:
    from mlflow import MlflowClient
    from ray import serve

    from loraplex.serving.builder import build
    from loraplex.serving.config import ServingConfig, load_serving_config
    from loraplex.serving.keys import hash_key
    from loraplex.training.config import load_train_config
    from loraplex.training.job import run_training
    from loraplex.world.generate import generate_world

    settings, _ = smollm2
    generate_world(0, settings.home / "worlds" / "seed-0")
    overrides = (
        "train.max_steps=3",
        "train.logging_steps=1",
        "data.max_examples=12",
        "data.max_eval_examples=2",
    )
    cfg = load_train_config(
        REPO / "jobs" / "configs" / "smollm2" / "json_answer.yaml", overrides, settings.home
    )
    trained = run_training(cfg, settings)
    run = MlflowClient(tracking_uri=settings.mlflow.tracking_uri).get_run(trained.mlflow_run_id)
    assert run.data.tags["loraplex.base_model"] == "models:/smollm2-135m-instruct/1"
    assert run.data.tags["loraplex.world_seeds"] == "0"

    shipped = load_serving_config(REPO / "serving" / "smollm2.yaml")
    assert shipped.models[0].source == "smollm2-135m-instruct"
    model = shipped.models[0].model_dump() | {"max_model_len": 1024}
    cfg = ServingConfig.model_validate(
        {
            "models": [model],
            "adapters": [
                {
                    "name": "json-answer",
                    "base": "smollm2",
                    "registry": "smollm2-json-answer@candidate",
                }
            ],
            "routes": [
                {"name": "json", "base": "smollm2", "adapter": "json-answer", "task": "json_answer"}
            ],
            "retriever": None,
            "auth": {"keys": [{"name": "t", "sha256": hash_key(KEY)}]},
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg, settings), name="loraplex", route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}/v1", trained.version)
    finally:
        serve.shutdown()


def test_the_pretrained_model_and_its_adapter_answer_through_the_openai_sdk(
    served: Served,
) -> None:
    from loraplex.prompts import JSON_ANSWER_SCHEMA

    c = served.client()
    assert {"smollm2", "smollm2:json-answer", "json"} <= {m.id for m in c.models.list()}

    r = c.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "paris" in r.choices[0].message.content.lower()  # a real pretrained chat model

    source = "The warranty of the Velmo X200 is 24 months."
    r = c.chat.completions.create(
        model="smollm2:json-answer",
        messages=[{"role": "user", "content": f"{source}\n\nHow long is the warranty?"}],
        max_tokens=48,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": JSON_ANSWER_SCHEMA},
        },
    )
    assert r.model == f"smollm2:smollm2-json-answer/{served.adapter_version}"
    jsonschema.validate(json.loads(r.choices[0].message.content), JSON_ANSWER_SCHEMA)

    # the route frames the question for the adapter (the JSON-answer task)
    r = c.chat.completions.create(
        model="json",
        messages=[{"role": "user", "content": "How long is the warranty of the Velmo X200?"}],
        max_tokens=48,
        temperature=0,
    )
    assert r.usage.prompt_tokens > 30 and r.choices[0].message.content


def test_the_shipped_smollm2_configs_validate(smollm2) -> None:
    from loraplex.config import load_model
    from loraplex.serving.config import load_serving_config
    from loraplex.training.config import TrainConfig

    cfg = load_serving_config(REPO / "serving" / "smollm2.yaml")
    assert {a.registry for a in cfg.adapters} == {
        "smollm2-json-answer@production",  # only `adapters promote` moves it
        "smollm2-ticket-classify@production",
    }
    for name in ("json_answer", "ticket_classify"):
        train = load_model(TrainConfig, REPO / "jobs" / "configs" / "smollm2" / f"{name}.yaml", ())
        assert train.base_model == "smollm2-135m-instruct"
        assert train.mlflow.registered_model == f"smollm2-{name.replace('_', '-')}"


def test_a_passage_never_tokenizes_to_a_control_token_of_smollm2(smollm2) -> None:
    """SmolLM2's tokenizer has 17 control tokens (``<filename>``, ``<|im_end|>``, ...):
    none can come out of a retrieved passage."""
    from helpers import assert_passages_stay_text

    _, result = smollm2
    assert_passages_stay_text(result.folder)


def test_an_adapter_is_never_scored_on_the_world_it_learned_from(smollm2, served: Served) -> None:
    from helpers import clean_env, one_line_error, run_cli

    settings, _ = smollm2
    home = settings.home
    args = ["--home", str(home), "eval", "--url", served.url, "--api-key", KEY, "--split", "test"]
    trained_world = home / "worlds" / "seed-0" / "queries.jsonl"
    proc = run_cli(
        *args, "--questions", str(trained_world), "--configs", "adapter", env=clean_env()
    )
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert "world seed 0, which adapter smollm2:json-answer" in line and "held-out" in line
    # the base model alone has no training world: the same questions are scored
    proc = run_cli(
        *args,
        "--questions",
        str(trained_world),
        "--configs",
        "base",
        "--limit",
        "2",
        "--no-mlflow",
        "--json",
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["base"]["questions"] == 2
