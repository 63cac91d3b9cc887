"""API keys: who may call the endpoint, and what each key may reach.

Owns: :class:`ApiKey` (a key kept only as its SHA-256, with the models, collections and
tenant it may use and its limits), :class:`KeyLimits`, :class:`AuthConfig` (the keys of
the serving config plus those from the environment or a Secret, each with its scope,
turned by :meth:`AuthConfig.key_digests` into the digest -> scope records the replicas
hold; a secret or a name given twice is refused), :func:`parse_env_item` (the
``NAME=SECRET;models=a|b;collections=c;tenant=t;rpm=60`` items of those variables),
:func:`describe` (a key's effective scope in words) and :func:`hash_key`.

Scoped by default: a key that names no collections may search none by request (a
route's own retrieval comes with the route), and one that names no tenant reads the
``default`` tenant only; ``*`` widens either on purpose.
Does not own: checking a request's key (the ``gate`` middleware), applying the scope to
a search (``grounding.narrow``) or enforcing the limits (``limits``).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from pydantic import Field, model_validator

from loraplex.config import NAME, StrictModel
from loraplex.retrieval.spec import TENANT

# a key's tenant: one tenant, or "*" for every tenant (the request may pick one)
KEY_TENANT = rf"^(\*|{TENANT.removeprefix('^')[:-1]})$"


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
        default_factory=list,
        description="Collections this key's requests may name; '*' for all. Default: "
        "none (a route's own retrieval comes with the route).",
    )
    tenant: str | None = Field(
        default=None,
        pattern=KEY_TENANT,
        description="Every search of this key is confined to this tenant, whatever it "
        "sends; '*': any tenant the request names (all when it names none). Default: "
        "the 'default' tenant, unless the route names one.",
    )
    may_pin_versions: bool = Field(
        default=False,
        description="May send `adapter_version` (a promotion gate's key): another version "
        "of a route's adapter than the one its alias serves, never a halted one.",
    )
    may_assert_users: bool = Field(
        default=False,
        description="May name its end users (x-loraplex-user or `user`) for a canary's "
        "sticky split; otherwise the key itself is the user.",
    )
    limits: KeyLimits | None = Field(
        default=None,
        description="Each limit left out is auth.default_limits' (set it to null for none).",
    )

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
        description="Also read keys from this variable: comma-separated items "
        "`[NAME=]KEY[;models=a|b][;collections=c|d][;tenant=t][;rpm=N][;tpm=N]"
        "[;concurrent=N]`, scoped like auth.keys (no collections, the default tenant "
        "unless given).",
    )
    hashes_env: str = Field(
        default="LORAPLEX_API_KEY_HASHES",
        description="Also read key hashes from this variable, items as in keys_env with "
        "the key's SHA-256 in place of the key: a cluster's Secret holds only hashes.",
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

    def all_keys(self, env: dict[str, str] | None = None) -> list[tuple[ApiKey, str]]:
        """Every key (those of the config, then the environment's) with its digest;
        ValueError when an item is malformed or a name or a secret is given twice."""
        env = dict(os.environ) if env is None else env
        keys = [(k, k.digest()) for k in self.keys]
        for variable, hashed in ((self.keys_env, False), (self.hashes_env, True)):
            items = [i.strip() for i in env.get(variable, "").split(",") if i.strip()]
            keys += [parse_env_item(item, variable, n, hashed) for n, item in enumerate(items)]
        names: dict[str, str] = {}
        digests: dict[str, str] = {}
        for key, digest in keys:
            if key.name in names:
                raise ValueError(f"two keys are named {key.name}: give each key its own name")
            if digest in digests:
                raise ValueError(
                    f"keys {digests[digest]} and {key.name} are the same secret: "
                    "list each key once, with one scope"
                )
            names[key.name] = digests[digest] = key.name
        return keys

    def key_digests(self, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """sha256 -> what the key may do (name, models, collections, tenant, limits); the
        plain keys never leave this function."""
        return {digest: self.record(key) for key, digest in self.all_keys(env)}

    def record(self, key: ApiKey) -> dict[str, Any]:
        return {
            "name": key.name,
            "models": key.models,
            "collections": key.collections,
            "tenant": key.tenant,
            "may_pin_versions": key.may_pin_versions,
            "may_assert_users": key.may_assert_users,
            # a limit the key leaves out is the default's (null: none)
            "limits": self.default_limits.model_dump()
            | (key.limits.model_dump(exclude_unset=True) if key.limits else {}),
        }

    def anonymous_record(self) -> dict[str, Any]:
        """What keyless (loopback) clients may do, together: everything (every collection
        and tenant too: they are this machine's own users), default limits."""
        return {
            "name": "anonymous",
            "models": ["*"],
            "collections": ["*"],
            "tenant": "*",
            "may_pin_versions": True,
            "may_assert_users": True,
            "limits": self.default_limits.model_dump(),
        }


MAY = ("may_pin_versions", "may_assert_users")
_LIMIT_FIELDS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "concurrent": "max_concurrent",
}


def parse_env_item(item: str, variable: str, index: int, hashed: bool) -> tuple[ApiKey, str]:
    """One item of ``$LORAPLEX_API_KEYS`` (``hashed=False``) or
    ``$LORAPLEX_API_KEY_HASHES``: ``[NAME=]SECRET;field=value;...`` -> (key, digest).
    Error messages name the variable and the item's position, never the secret."""
    where = f"${variable} item {index + 1}"
    head, *fields = item.split(";")
    name, _, secret = head.strip().rpartition("=")
    secret = secret.strip()
    if hashed and not re.fullmatch(r"[0-9a-f]{64}", secret):
        raise ValueError(f"{where}: expected NAME=SHA256 (64 lowercase hex digits)")
    if not secret:
        raise ValueError(f"{where}: the key is empty")
    spec: dict[str, Any] = {
        "name": name.strip() or f"{variable.lower().replace('_', '-')}-{index + 1}",
        "sha256": secret if hashed else hash_key(secret),
    }
    limits: dict[str, Any] = {}
    for field in filter(None, (f.strip() for f in fields)):
        k, sep, v = field.partition("=")
        k = k.strip()
        if not sep:
            raise ValueError(f"{where}: {k!r} is not field=value")
        if k in ("models", "collections"):
            spec[k] = [x.strip() for x in v.split("|") if x.strip()]
        elif k in ("tenant", *MAY):
            spec[k] = v.strip()
        elif k in _LIMIT_FIELDS:
            limits[_LIMIT_FIELDS[k]] = v.strip()
        else:
            known = ("models", "collections", "tenant", *_LIMIT_FIELDS, *MAY)
            raise ValueError(f"{where}: unknown field {k!r} ({', '.join(known)})")
    if limits:
        spec["limits"] = limits
    try:
        key = ApiKey.model_validate(spec)
    except ValueError as e:
        errors = getattr(e, "errors", lambda: [])()
        if errors:
            err = errors[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {loc}: {err['msg']}") from None
        raise ValueError(f"{where}: {e}") from None
    return key, spec["sha256"]


def describe(record: dict[str, Any]) -> str:
    """A key's effective scope in one line (``serve --check``)."""
    collections = record["collections"]
    tenant = record["tenant"]
    limits = ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in record["limits"].items() if v is not None
    )
    may = [k.removeprefix("may_").replace("_", " ") for k in MAY if record.get(k)]
    return (
        f"{record['name']}: models {', '.join(record['models'])}; collections "
        f"{', '.join(collections) if collections else 'none but its routes'}; tenant "
        f"{'any' if tenant == '*' else tenant or 'default (or its route)'}; "
        f"{limits or 'no limits'}" + (f"; may {', '.join(may)}" if may else "")
    )
