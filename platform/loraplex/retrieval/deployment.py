"""The Retriever as a Ray Serve deployment, with an OpenAI-style HTTP surface.

Owns: :class:`RetrieverDeployment` (one embedder + one Milvus connection per replica),
its Python API for other deployments (``search``, ``embed`` through a handle), its
HTTP routes (``POST /v1/embeddings`` in the OpenAI shape, float or base64;
``POST /v1/retrieve``; ``GET /v1/models``; errors in OpenAI's error shape), and
:func:`build_retriever` / :func:`build_app`, the builders that serving and
``serve run`` use. Does not own: search itself (``retriever``).

Milvus Lite admits one process per data dir, so with a Lite URI the deployment runs
exactly one replica (more are refused when it is built); a Milvus server allows many.
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from loraplex.config import LoraplexConfig, StrictModel, load_settings
from loraplex.errors import InputError, LoraplexError

log = logging.getLogger("loraplex.retriever")
MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class RetrieverScaling(StrictModel):
    """Replicas of the retriever; ``autoscaling`` wins over ``num_replicas`` when set."""

    num_replicas: int = Field(default=1, ge=1)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)
    num_cpus: float = Field(default=1.0, gt=0)

    def options(self, lite: bool) -> dict[str, Any]:
        most = self.max_replicas or self.num_replicas
        if lite and most > 1:
            raise InputError(
                "Milvus Lite admits one process per data dir: run one retriever replica, "
                "or set milvus.uri to a Milvus server to scale out"
            )
        opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.num_cpus}}
        if self.min_replicas is not None or self.max_replicas is not None:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas or 1,
                "max_replicas": most,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {400: "bad_request", 404: "not_found", 503: "unavailable"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(status, message, param))


app = FastAPI(title="loraplex retriever")


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    return openai_error(
        400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None
    )


class RetrieverDeployment:
    def __init__(self, settings: dict[str, Any]) -> None:
        from loraplex.retrieval.retriever import Retriever

        self.settings = LoraplexConfig.model_validate(settings)
        self.retriever = Retriever(self.settings)
        log.info(
            "retriever ready: Milvus %s, model %s",
            self.settings.milvus.uri,
            self.retriever.model[0],
        )

    # Python API (through a DeploymentHandle)

    def search(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Hits as dicts, best first; raises InputError/LoraplexError with a reason."""
        from loraplex.retrieval.retriever import SearchRequest

        try:
            req = SearchRequest.model_validate(request)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"retrieval.{where}: {first['msg']}") from None
        return [h.as_dict() for h in self.retriever.search(req)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.retriever.embed(texts)

    # HTTP

    @app.get("/v1/models")
    def models(self) -> dict[str, Any]:
        name, dim = self.retriever.model
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "loraplex", "dimensions": dim}],
        }

    def openai_embeddings(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, OpenAI-shaped body) for an embeddings request; also used by the
        serving ingress through a handle."""
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 400, _error_body(400, f"{where}: {first['msg']}", where)
        name, dim = self.retriever.model
        if req.model not in (None, name, name.split("/")[-1]):
            return 404, _error_body(
                404, f"model {req.model!r} not found; this endpoint embeds with {name}", "model"
            )
        if req.dimensions not in (None, dim):
            return 400, _error_body(
                400,
                f"{name} makes {dim}-d vectors; dimensions={req.dimensions} is not supported",
                "dimensions",
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            return 400, _error_body(
                400,
                "input must be a non-empty string or list of strings (token ids are not supported)",
                "input",
            )
        if len(texts) > MAX_INPUTS:
            return 400, _error_body(400, f"at most {MAX_INPUTS} inputs per request", "input")
        if any(not t.strip() for t in texts):
            return 400, _error_body(400, "input contains an empty string", "input")
        vectors = np.asarray(self.retriever.embed(texts), dtype=np.float32)
        tokens = self.retriever.embedder.count_tokens(texts)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (
                base64.b64encode(v.tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return 200, {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/embeddings")
    def embeddings(self, body: dict[str, Any]) -> Any:
        status, content = self.openai_embeddings(body)
        return JSONResponse(status_code=status, content=content)

    @app.post("/v1/retrieve")
    def retrieve(self, body: dict[str, Any]) -> Any:
        try:
            hits = self.search(body)
        except InputError as e:
            status = 404 if "unknown collection" in str(e) else 400
            return openai_error(status, str(e))
        except LoraplexError as e:
            return openai_error(503, str(e))
        return {"object": "list", "data": [{"rank": i, **h} for i, h in enumerate(hits, 1)]}


# The same class twice: with its HTTP routes (an application of its own), and without
# them (a backend of the serving application, whose ingress owns the HTTP surface;
# Ray Serve allows one FastAPI ingress per application).
RetrieverApp = serve.deployment(name="Retriever")(serve.ingress(app)(RetrieverDeployment))
RetrieverBackend = serve.deployment(name="Retriever")(RetrieverDeployment)


def build_retriever(
    settings: LoraplexConfig, scaling: RetrieverScaling | None = None, http: bool = True
):
    """The bound deployment (an Application) for a settings object; ``http=False`` for
    the serving application's backend (Python API only)."""
    scaling = scaling or RetrieverScaling()
    options = scaling.options(lite=settings.milvus.is_lite)
    deployment = RetrieverApp if http else RetrieverBackend
    return deployment.options(**options).bind(settings.model_dump())


class RetrieverAppArgs(StrictModel):
    """Arguments of ``serve run loraplex.retrieval.deployment:build_app``."""

    settings_file: str | None = None
    settings: list[str] = Field(default_factory=list, description="KEY=VALUE overrides.")
    scaling: RetrieverScaling = Field(default_factory=RetrieverScaling)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (``serve run`` / RayService ``import_path``)."""
    parsed = RetrieverAppArgs.model_validate(args or {})
    return build_retriever(load_settings(parsed.settings_file, parsed.settings), parsed.scaling)
