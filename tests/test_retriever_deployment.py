"""The Retriever Ray Serve deployment on a real local Ray, over real HTTP on 127.0.0.1:
``/v1/embeddings`` through the official ``openai`` client, ``/v1/retrieve``, the Python
API through a deployment handle, and OpenAI-shaped errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from helpers import free_port

from loraplex.errors import InputError


@pytest.fixture(scope="module")
def retriever_app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from ray import serve

    from loraplex.config import load_settings
    from loraplex.retrieval.retriever import Retriever
    from loraplex.serving.keys import AuthConfig
    from loraplex.serving.retriever import build_retriever

    home = tmp_path_factory.mktemp("serve_home")
    docs = tmp_path_factory.mktemp("serve_docs")
    (docs / "lamp.md").write_text("# Orbin lamp\n\nThe Orbin lamp uses a 40 watt bulb.\n")
    (docs / "kettle.md").write_text("# Brava kettle\n\nThe Brava kettle boils in 3 minutes.\n")
    settings = load_settings(overrides=[f"home={home}"])
    with Retriever(settings) as r:  # closing frees the Lite data dir for the replica
        r.ingest([docs], "kb")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_retriever(settings, auth=AuthConfig(allow_anonymous=True))
    handle = serve.run(app, name="retriever", route_prefix="/retriever")
    yield handle, f"http://127.0.0.1:{port}/retriever", settings
    serve.shutdown()  # idempotent: the last test restarts Serve on its own


def test_embeddings_through_the_openai_client(retriever_app) -> None:
    from loraplex.retrieval.embeddings import default_embedder

    _, base, _ = retriever_app
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["The Orbin lamp uses a 40 watt bulb.", "kettle"]
    # the SDK asks for base64 by default; float is the other encoding
    for fmt in (openai.NOT_GIVEN, "float"):
        res = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format=fmt)
        vectors = np.array([d.embedding for d in res.data])
        assert vectors.shape == (2, 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        local = default_embedder().encode(texts)
        assert np.allclose(vectors, local, atol=1e-4)
        assert res.usage.prompt_tokens > 4
    models = [m.id for m in client.models.list()]
    assert models == ["sentence-transformers/all-MiniLM-L6-v2"]

    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-large", input="x")
    assert "not found" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="")
    assert "empty" in e.value.message


def test_retrieve_route_and_errors(retriever_app) -> None:
    _, base, _ = retriever_app
    with httpx.Client(timeout=60) as http:
        r = http.post(
            f"{base}/v1/retrieve",
            json={"query": "Which bulb does the Orbin lamp take?", "collection": "kb", "top_k": 2},
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data[0]["doc_id"] == "lamp" and data[0]["rank"] == 1
        assert "40 watt" in data[0]["text"] and data[0]["source"].endswith("lamp.md")

        r = http.post(f"{base}/v1/retrieve", json={"query": "x", "collection": "nope"})
        assert r.status_code == 404
        assert "unknown collection" in r.json()["error"]["message"]
        r = http.post(
            f"{base}/v1/retrieve", json={"query": "x", "collection": "kb", "filter": "doc_id =="}
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = http.post(f"{base}/v1/retrieve", json={"query": "x", "top_k": 0})
        assert r.status_code == 400 and "top_k" in r.json()["error"]["message"]
        r = http.post(f"{base}/v1/embeddings", json={"inputs": "typo"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = http.post(f"{base}/v1/embeddings", json={"input": ["x"] * 257})
        assert r.status_code == 400 and "at most 256 inputs" in r.json()["error"]["message"]
        # keyless serving: a request naming another host (DNS rebinding) is refused
        r = http.get(f"{base}/v1/models", headers={"host": "evil.example:8000"})
        assert r.status_code == 403 and "loopback clients only" in r.json()["error"]["message"]


def test_python_api_through_a_handle(retriever_app) -> None:
    handle, _, _ = retriever_app
    hits = handle.search.remote(
        {"query": "Brava kettle", "collection": "kb", "mode": "bm25", "top_k": 1}
    ).result(timeout_s=60)
    assert [h["doc_id"] for h in hits] == ["kettle"]
    vectors = handle.embed.remote(["a", "b", "c"]).result(timeout_s=60)
    assert len(vectors) == 3 and len(vectors[0]) == 384


def test_lite_refuses_more_than_one_replica(tmp_path: Path) -> None:
    from loraplex.config import load_settings
    from loraplex.serving.retriever import build_retriever, retriever_options
    from loraplex.serving.scaling import RetrieverScaling

    settings = load_settings(overrides=[f"home={tmp_path}"])
    with pytest.raises(InputError, match="one process per data dir"):
        build_retriever(settings, RetrieverScaling(num_replicas=2))
    server = load_settings(overrides=[f"home={tmp_path}", "milvus.uri=http://127.0.0.1:19530"])
    opts = retriever_options(
        RetrieverScaling(min_replicas=1, max_replicas=3), server.milvus.is_lite
    )
    assert opts["autoscaling_config"]["max_replicas"] == 3


def test_anonymous_app_refuses_to_start_when_serve_listens_beyond_loopback(
    retriever_app, tmp_path: Path
) -> None:
    """Keyless (allow_anonymous) serving binds loopback only: with Serve's proxies on
    every interface, the app's replica refuses to start and says why; without keys and
    without allow_anonymous the app is not even built."""
    from ray import serve

    from loraplex.config import load_settings
    from loraplex.serving.keys import AuthConfig
    from loraplex.serving.retriever import build_retriever

    settings = load_settings(overrides=[f"home={tmp_path}"])
    with pytest.raises(InputError, match="refusing to serve the retriever openly"):
        build_retriever(settings)
    # the module's Serve (on 127.0.0.1) is done with: start one on another address. The
    # refusal takes any address but 127.0.0.1/localhost/::1 as open; 127.0.0.2 keeps the
    # test on this machine's loopback (Linux routes all of 127.0.0.0/8 there)
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.2", "port": free_port()})
    try:
        with pytest.raises(Exception, match="Deploying application anonymous failed"):
            serve.run(
                build_retriever(settings, auth=AuthConfig(allow_anonymous=True)),
                name="anonymous",
                route_prefix="/anonymous",
            )
        status = serve.status().applications["anonymous"]
        why = status.message + " ".join(d.message for d in status.deployments.values())
        assert "binds 127.0.0.1 only" in why and "listens on 127.0.0.2" in why, why
    finally:
        serve.shutdown()
