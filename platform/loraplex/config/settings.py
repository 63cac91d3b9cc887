"""The platform settings: where MLflow, Milvus, Ray and adapter storage live.

Owns: :class:`LoraplexConfig` (the typed model), the embedded defaults under
``LORAPLEX_HOME`` (default ``./.loraplex``), and :func:`load_settings`, which layers a
YAML file, ``LORAPLEX_*`` environment variables and ``--setting`` flags over them.
Does not own: connecting to any service (see ``loraplex.doctor`` and the service
modules) or job configs (training, serving, evaluation).

Embedded defaults (nothing to start)::

    home/mlflow.db            MLflow tracking + registry (sqlite)
    home/mlartifacts/         MLflow artifacts
    home/milvus/milvus.db     Milvus Lite data
    home/ray_results/         Ray Train storage
    home/adapters/            adapter storage for serving

Production: point ``mlflow.tracking_uri``, ``milvus.uri`` (+ ``milvus.token``),
``ray.address`` and ``adapters.uri`` at real services; nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator

from loraplex.config.loading import StrictModel, load_model

ENV_PREFIX = "LORAPLEX_"
ENV_CONFIG_FILE = "LORAPLEX_CONFIG"
# LORAPLEX_* variables that are not settings: the config file, the endpoint and key of
# the serving clients (loraplex chat/eval), the server's keys and key hashes (the k8s
# secret), the canary split's secret, and a serving replica's base-model reference and
# adapter disk budget (serving.builder).
ENV_NOT_SETTINGS = (
    ENV_CONFIG_FILE,
    "LORAPLEX_URL",
    "LORAPLEX_API_KEY",
    "LORAPLEX_API_KEYS",
    "LORAPLEX_API_KEY_HASHES",
    "LORAPLEX_CANARY_SECRET",
    "LORAPLEX_BASE_MODEL",
    "LORAPLEX_ADAPTER_DISK_BYTES",
)
DEFAULT_HOME = ".loraplex"

_MLFLOW_SCHEMES = {"sqlite", "file", "http", "https", "postgresql", "mysql", "databricks"}
_MILVUS_SCHEMES = {"http", "https", "tcp", "grpc"}
_STORAGE_SCHEMES = {"s3", "gs", "abfss", "azure", "file"}


class MlflowSettings(StrictModel):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(
        default=None, description="Default: sqlite:///<home>/mlflow.db (embedded)."
    )
    registry_uri: str | None = Field(default=None, description="Default: the tracking URI.")
    artifact_location: str | None = Field(
        default=None,
        description=(
            "Where new experiments keep artifacts. Default: <home>/mlartifacts with the "
            "embedded store; with a tracking server, the server's own (proxied) store."
        ),
    )
    experiment: str = Field(default="loraplex", min_length=1)
    timeout_s: float = Field(default=5.0, gt=0, description="Reachability check timeout.")

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = urlparse(v).scheme.split("+")[0]
        if scheme not in _MLFLOW_SCHEMES:
            raise ValueError(
                f"unsupported MLflow URI scheme {scheme or '(none)'!r}; "
                f"use one of {', '.join(sorted(_MLFLOW_SCHEMES))}"
            )
        if scheme in ("http", "https") and not urlparse(v).hostname:
            raise ValueError("an http(s) MLflow URI needs a host")
        return v

    @property
    def is_local(self) -> bool:
        """A tracking store on this machine's disk (sqlite, file), not one reached by URI."""
        return urlparse(self.tracking_uri or "").scheme in ("", "sqlite", "file")


class MilvusSettings(StrictModel):
    """Milvus: a Lite data file (embedded) or a server URI."""

    uri: str | None = Field(
        default=None, description="A path ending in .db (Milvus Lite) or http(s)://host:19530."
    )
    token: SecretStr | None = Field(default=None, description="user:password or an API key.")
    db_name: str = Field(default="default", min_length=1)
    timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("uri")
    @classmethod
    def _lite_or_server(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "://" in v:
            parsed = urlparse(v)
            if parsed.scheme not in _MILVUS_SCHEMES or not parsed.hostname:
                raise ValueError(
                    "a Milvus server URI must look like http://host:19530 "
                    f"(schemes: {', '.join(sorted(_MILVUS_SCHEMES))})"
                )
        elif not v.endswith(".db"):
            raise ValueError("a Milvus Lite location must be a file path ending in .db")
        return v

    @property
    def is_lite(self) -> bool:
        return self.uri is not None and "://" not in self.uri


class RaySettings(StrictModel):
    """Ray: local (started in-process) or an existing cluster."""

    address: str | None = Field(
        default=None,
        description="None: a local Ray inside the command. 'auto', host:port or ray://host:10001.",
    )
    num_cpus: int | None = Field(
        default=8,
        ge=1,
        description="Logical CPUs of a local Ray. Oversubscribed on purpose: Ray Serve LLM "
        "reserves CPU bundles per replica and never schedules on a 2-core count.",
    )
    storage_path: str | None = Field(
        default=None, description="Ray Train storage. Default: <home>/ray_results."
    )

    @field_validator("address")
    @classmethod
    def _address_form(cls, v: str | None) -> str | None:
        if v is None or v in ("auto", "local"):
            return v
        target = v.removeprefix("ray://")
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("use 'auto', 'local', host:port or ray://host:port")
        return v


class AdapterStorageSettings(StrictModel):
    """Where served adapters are staged (a local folder or an object store URI)."""

    uri: str | None = Field(default=None, description="Default: <home>/adapters.")

    @field_validator("uri")
    @classmethod
    def _storage_scheme(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and urlparse(v).scheme not in _STORAGE_SCHEMES:
            raise ValueError(f"use a local folder or one of {', '.join(sorted(_STORAGE_SCHEMES))}")
        return v


class RetrievalSettings(StrictModel):
    """How documents become chunks and chunks become search results."""

    collection: str = Field(
        default="knowledge",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$",
        description="Default collection for ingest, search and serving routes.",
    )
    chunk_size: int = Field(default=1000, ge=100, le=16000, description="Characters per chunk.")
    chunk_overlap: int = Field(default=150, ge=0, description="Characters shared by neighbours.")
    max_file_mb: float = Field(default=20.0, gt=0, description="Larger files are refused.")
    max_pdf_pages: int = Field(default=2000, ge=1, description="Longer PDFs are refused.")
    max_file_seconds: float = Field(
        default=60.0, gt=0, description="A file that takes longer to read is skipped."
    )
    ingest_lock_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="How long an ingest waits for another ingest of the same collection "
        "(Milvus server) before it is refused; 0 refuses at once.",
    )
    embed_batch_size: int = Field(default=64, ge=1, le=4096)
    top_k: int = Field(default=5, ge=1, le=1000)
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    rrf_k: int = Field(
        default=10,
        ge=1,
        description="Reciprocal-rank-fusion constant (chosen on benchmarks/data/stdlib-docs "
        "and the embedded world together; see benchmarks/RESULTS.md).",
    )
    fusion: Literal["weighted_rrf", "rrf"] = Field(
        default="weighted_rrf",
        description="hybrid: 'rrf' = Milvus hybrid_search with RRFRanker (equal weights); "
        "'weighted_rrf' = dense and BM25 searches fused with the weights below.",
    )
    dense_weight: float = Field(default=1.0, ge=0)
    bm25_weight: float = Field(default=1.0, ge=0, description="BM25's weight in weighted_rrf.")
    identifier_bm25_weight: float = Field(
        default=3.0,
        ge=0,
        description="BM25's weight when the query holds an identifier (a term with a digit).",
    )
    language: Literal["english", "none"] = Field(
        default="english",
        description="Analysis under BM25 for new collections: english (stop words out, "
        "Snowball stems, identifiers exact) or none (text as it is, for code or ids). A "
        "collection keeps the analysis it was built with.",
    )
    hnsw_m: int = Field(default=16, ge=4, le=64)
    hnsw_ef_construction: int = Field(default=200, ge=8)
    hnsw_ef: int = Field(default=64, ge=1, description="Search-time HNSW breadth.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RetrievalSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        return self


class LoraplexConfig(StrictModel):
    """Everything loraplex commands share. Derived paths are filled in from ``home``."""

    home: Path = Field(default=Path(DEFAULT_HOME), description="Root of the embedded defaults.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    adapters: AdapterStorageSettings = Field(default_factory=AdapterStorageSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("home")
    @classmethod
    def _usable_home(cls, v: Path) -> Path:
        v = v.expanduser().absolute()
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} exists and is not a directory")
        return v

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> LoraplexConfig:
        # Assigning through object.__setattr__ avoids re-running validation recursively.
        h = self.home
        if self.mlflow.tracking_uri is None:
            object.__setattr__(self.mlflow, "tracking_uri", f"sqlite:///{h / 'mlflow.db'}")
        server = urlparse(self.mlflow.tracking_uri).scheme in ("http", "https", "databricks")
        if self.mlflow.artifact_location is None and not server:
            # with a tracking server the experiment takes the server's artifact store
            # (mlflow-artifacts:/, proxied): a folder of this machine's disk would hold
            # adapters no other node or pod can download
            object.__setattr__(self.mlflow, "artifact_location", str(h / "mlartifacts"))
        if self.milvus.uri is None:
            object.__setattr__(self.milvus, "uri", str(h / "milvus" / "milvus.db"))
        if self.ray.storage_path is None:
            object.__setattr__(self.ray, "storage_path", str(h / "ray_results"))
        if self.adapters.uri is None:
            object.__setattr__(self.adapters, "uri", str(h / "adapters"))
        return self

    def public_dict(self) -> dict[str, Any]:
        """The resolved settings with secrets masked, for display."""
        data = self.model_dump(mode="json")
        if self.milvus.token is not None:
            data["milvus"]["token"] = "****"
        return data


def load_settings(
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> LoraplexConfig:
    """Defaults < YAML file (argument or $LORAPLEX_CONFIG) < LORAPLEX_* variables < overrides."""
    env = os.environ if env is None else env
    path = config_file if config_file is not None else env.get(ENV_CONFIG_FILE) or None
    return load_model(
        LoraplexConfig,
        path,
        overrides,
        env_prefix=ENV_PREFIX,
        env=env,
        env_reserved=ENV_NOT_SETTINGS,
        override_flag="--setting",
    )
