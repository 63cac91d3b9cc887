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
from loraplex.retrieval.retriever import Retriever, SearchRequest
from loraplex.serving.errors import ApiError, error_body, public_reason
from loraplex.serving.gate import Gate, refuse_open_anonymous
from loraplex.serving.grounding import narrow
from loraplex.serving.keys import AuthConfig
from loraplex.serving.scaling import RetrieverScaling, Scaling

log = logging.getLogger("loraplex.retriever")
MAX_INPUTS = 256
MAX_INPUT_CHARS = 16_000  # the model reads 256 tokens of each; longer text is cut


class EmbeddingRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def retriever_options(scaling: Scaling, lite: bool) -> dict[str, Any]:
    """Serve options; Milvus Lite (one process per data dir) runs exactly one replica."""
    if lite and scaling.most > 1:
        raise InputError(
            "Milvus Lite admits one process per data dir: run one retriever replica, "
            "or set milvus.uri to a Milvus server to scale out"
        )
    return scaling.deployment_config()


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    return openai_error(
        400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None
    )


class RetrieverDeployment:
    def __init__(self, settings: dict[str, Any]) -> None:

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

        try:
            req = SearchRequest.model_validate(request)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"retrieval.{where}: {first['msg']}") from None
        return [h.as_dict() for h in self.retriever.search(req)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.retriever.embed(texts)

    def openai_embeddings(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, OpenAI-shaped body) for an embeddings request; also used by the
        serving ingress through a handle."""
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return 400, error_body(400, f"{where}: {first['msg']}", where)
        name, dim = self.retriever.model
        if req.model not in (None, name, name.split("/")[-1]):
            return 404, error_body(
                404, f"model {req.model!r:.80} not found; this endpoint embeds with {name}", "model"
            )
        if req.dimensions not in (None, dim):
            return 400, error_body(
                400,
                f"{name} makes {dim}-d vectors; dimensions={req.dimensions} is not supported",
                "dimensions",
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            return 400, error_body(
                400,
                "input must be a non-empty string or list of strings (token ids are not supported)",
                "input",
            )
        if len(texts) > MAX_INPUTS:
            return 400, error_body(400, f"at most {MAX_INPUTS} inputs per request", "input")
        if any(len(t) > MAX_INPUT_CHARS for t in texts):
            return 400, error_body(400, f"an input is over {MAX_INPUT_CHARS} characters", "input")
        if any(not t.strip() for t in texts):
            return 400, error_body(400, "input contains an empty string", "input")
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


def http_deployment(auth: AuthConfig, max_body_bytes: int = 1_048_576, share: float = 1.0):
    """The deployment with its own HTTP routes, behind the same gate as serving: the
    keys of ``auth`` (or loopback clients only with ``allow_anonymous``), their
    collections and tenant confining ``/v1/retrieve``, their limits."""

    keys = auth.key_digests()
    if not keys and not auth.allow_anonymous:
        raise InputError(
            f"no API keys (auth.keys or ${auth.keys_env}): refusing to serve the retriever "
            "openly; add keys, or set auth.allow_anonymous: true for loopback clients only"
        )
    app = FastAPI(title="loraplex retriever", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_middleware(
        Gate,
        keys=keys,
        anonymous=auth.anonymous_record(),
        max_body_bytes=max_body_bytes,
        share=share,
    )

    @serve.ingress(app)
    class RetrieverHTTP(RetrieverDeployment):
        def __init__(self, settings: dict[str, Any]) -> None:
            if not keys:
                refuse_open_anonymous()
            super().__init__(settings)

        @app.get("/v1/models")
        def models(self) -> dict[str, Any]:
            name, dim = self.retriever.model
            card = {"id": name, "object": "model", "owned_by": "loraplex", "dimensions": dim}
            return {"object": "list", "data": [card]}

        @app.post("/v1/embeddings")
        def embeddings(self, body: dict[str, Any], request: Request) -> Any:
            key = request.state.key
            if "*" not in key["models"] and "embeddings" not in key["models"]:
                return openai_error(403, "this API key may not use embeddings", "model")
            status, content = self.openai_embeddings(body)
            return JSONResponse(status_code=status, content=content)

        @app.post("/v1/retrieve")
        def retrieve(self, body: dict[str, Any], request: Request) -> Any:

            query = body.get("query")
            try:
                spec = narrow(
                    None,
                    request.state.key,
                    {k: v for k, v in body.items() if k != "query"},
                    self.settings.retrieval.collection,
                )
                assert spec is not None
                hits = self.search({"query": query, **spec.model_dump(exclude={"on_unavailable"})})
            except ApiError as e:
                return e.response()
            except InputError as e:
                status = 404 if "unknown collection" in str(e) else 400
                return openai_error(status, public_reason(e))
            except LoraplexError as e:
                return openai_error(503, public_reason(e))
            return {"object": "list", "data": [{"rank": i, **h} for i, h in enumerate(hits, 1)]}

    return serve.deployment(name="Retriever")(RetrieverHTTP)


# Without HTTP routes: a backend of the serving application, whose ingress owns the
# HTTP surface (Ray Serve allows one FastAPI ingress per application).
RetrieverBackend = serve.deployment(name="Retriever")(RetrieverDeployment)


def build_retriever(
    settings: LoraplexConfig,
    scaling: Scaling | None = None,
    http: bool = True,
    auth: AuthConfig | None = None,
):
    """The bound deployment (an Application) for a settings object: with its HTTP routes
    behind ``auth`` (refused without keys unless ``allow_anonymous``), or, with
    ``http=False``, the serving application's backend (Python API only)."""
    scaling = scaling or RetrieverScaling()
    options = retriever_options(scaling, lite=settings.milvus.is_lite)
    if http:
        deployment = http_deployment(auth or AuthConfig(), share=1.0 / scaling.most)
    else:
        deployment = RetrieverBackend
    return deployment.options(**options).bind(settings.model_dump())


class RetrieverAppArgs(StrictModel):
    """Arguments of ``serve run loraplex.serving.retriever:build_app``."""

    settings_file: str | None = None
    settings: list[str] = Field(default_factory=list, description="KEY=VALUE overrides.")
    scaling: Scaling = Field(default_factory=RetrieverScaling)
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="Keys, as in a serving config (refuses to start without keys unless "
        "allow_anonymous).",
    )


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (``serve run`` / RayService ``import_path``)."""
    parsed = RetrieverAppArgs.model_validate(args or {})
    settings = load_settings(parsed.settings_file, parsed.settings)
    return build_retriever(settings, parsed.scaling, auth=parsed.auth)
