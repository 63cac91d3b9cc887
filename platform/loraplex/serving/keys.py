"""API keys: who may call the endpoint, and what each key may reach.

Owns: :class:`ApiKey` (a key kept only as its SHA-256, with the models, collections and
tenant it may use and its limits), :class:`KeyLimits`, :class:`AuthConfig` (the keys of
the serving config plus those from the environment or a Secret, turned by
:meth:`AuthConfig.key_digests` into the digest -> scope records the replicas hold) and
:func:`hash_key`. Does not own: checking a request's key (the ``gate`` middleware) or
enforcing the limits (``limits``).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from pydantic import Field, model_validator

from loraplex.config import NAME, StrictModel
from loraplex.retrieval.spec import TENANT


class KeyLimits(StrictModel):
    """What one key may use; ``null`` is no limit. Enforced by the ingress (429)."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Prompt + completion tokens (token bucket)."
    )
    max_concurrent: int | None = Field(default=None, ge=1, description="Requests at once.")


class ApiKey(StrictModel):
    """One API key, kept only as its SHA-256, with what it may use and read."""

    name: str = Field(pattern=NAME, description="Who the key belongs to (shown in logs).")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = Field(
        default=None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Read the key from this environment variable at start-up and hash it.",
    )
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Routes, base models, base:adapter ids and 'embeddings' this key may "
        "use; '*' for all.",
    )
    collections: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Collections this key's requests may search; '*' for all.",
    )
    tenant: str | None = Field(
        default=None,
        pattern=TENANT,
        description="Every search of this key is confined to this tenant, whatever it sends.",
    )
    limits: KeyLimits | None = Field(default=None, description="Default: auth.default_limits.")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.sha256 is None) == (self.env is None):
            raise ValueError("give exactly one of sha256 and env")
        return self

    def digest(self) -> str:
        if self.sha256:
            return self.sha256
        value = os.environ.get(self.env or "", "")
        if not value:
            raise ValueError(f"key {self.name}: environment variable {self.env} is not set")
        return hash_key(value)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AuthConfig(StrictModel):
    keys: list[ApiKey] = Field(default_factory=list)
    keys_env: str = Field(
        default="LORAPLEX_API_KEYS",
        description="Also read comma-separated keys (allowed everything) from this variable.",
    )
    hashes_env: str = Field(
        default="LORAPLEX_API_KEY_HASHES",
        description="Also read comma-separated NAME=SHA256 (or bare SHA256) key hashes "
        "(allowed everything) from this variable: a cluster's Secret holds only hashes.",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve without keys, to loopback clients only (127.0.0.1). Without "
        "keys and without this, the application refuses to start.",
    )
    default_limits: KeyLimits = Field(
        default_factory=lambda: KeyLimits(
            requests_per_minute=1200, tokens_per_minute=2_000_000, max_concurrent=64
        ),
        description="Limits of keys that set none (and of anonymous clients, together).",
    )

    def key_digests(self, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """sha256 -> what the key may do (name, models, collections, tenant, limits); the
        plain keys never leave this function."""
        env = dict(os.environ) if env is None else env
        limits = self.default_limits

        def record(name: str, key: ApiKey | None = None) -> dict[str, Any]:
            return {
                "name": name,
                "models": key.models if key else ["*"],
                "collections": key.collections if key else ["*"],
                "tenant": key.tenant if key else None,
                "limits": ((key.limits if key else None) or limits).model_dump(),
            }

        out = {k.digest(): record(k.name, k) for k in self.keys}
        for i, key in enumerate(filter(None, env.get(self.keys_env, "").split(","))):
            out[hash_key(key.strip())] = record(f"{self.keys_env}[{i}]")
        for i, item in enumerate(filter(None, env.get(self.hashes_env, "").split(","))):
            name, _, digest = item.strip().rpartition("=")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(
                    f"${self.hashes_env} item {i + 1}: expected NAME=SHA256 "
                    "(64 lowercase hex digits)"
                )
            out[digest] = record(name or f"{self.hashes_env}[{i}]")
        return out

    def anonymous_record(self) -> dict[str, Any]:
        """What keyless (loopback) clients may do, together: everything, default limits."""
        return {
            "name": "anonymous",
            "models": ["*"],
            "collections": ["*"],
            "tenant": None,
            "limits": self.default_limits.model_dump(),
        }
