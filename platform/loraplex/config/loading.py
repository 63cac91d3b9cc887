"""Building a pydantic config from layers: a YAML file, environment variables, CLI overrides.

Owns: reading YAML, turning ``LORAPLEX_A__B`` variables and ``a.b=value`` flags into
nested dicts, merging the layers (later wins), validating once, and reporting the
first problem as one line that names the key and where its value came from.
Does not own: any particular config model (see ``settings`` and the job configs).

Every loraplex config (platform settings, training, serving, evaluation) is loaded
through :func:`load_model`, so they all accept the same override syntax and give the
same kind of error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from loraplex.errors import ConfigError, first_line

M = TypeVar("M", bound=BaseModel)
# every name a config gives: base models, adapters, routes, keys
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


@dataclass
class Layers:
    """The merged data plus, for each dotted key, a description of where it came from."""

    data: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def add(self, nested: Mapping[str, Any], source: str | Mapping[str, str]) -> None:
        for dotted, value in _flatten(nested):
            _set_dotted(self.data, dotted, value)
            self.sources[dotted] = (
                source if isinstance(source, str) else _longest_prefix(source, dotted) or "?"
            )

    def source_of(self, dotted: str) -> str | None:
        return _longest_prefix(self.sources, dotted)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a one-line ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory, not a YAML file") from None
    except PermissionError:
        raise ConfigError(f"config file {p} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def parse_value(text: str) -> Any:
    """Parse a flag or environment value: YAML scalars/lists/maps, otherwise the raw string."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_overrides(
    items: Iterable[str], flag: str = "--set"
) -> tuple[dict[str, Any], dict[str, str]]:
    """``["a.b=1", "c=x"]`` -> nested dict and per-key sources; a malformed item is an error."""
    nested: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. ray.num_cpus=8)"
            )
        _set_dotted(nested, key, parse_value(value))
        sources[key] = f"{flag} {item}"
    return nested, sources


def env_overrides(
    prefix: str, env: Mapping[str, str], reserved: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """``PREFIX_RAY__NUM_CPUS=8`` -> ``{"ray": {"num_cpus": 8}}``; ``__`` separates levels."""
    reserved_names = set(reserved)
    nested: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(prefix) or name in reserved_names:
            continue
        key = ".".join(part.lower() for part in name[len(prefix) :].split("__"))
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"environment variable {name} does not name a config key")
        # Values from the environment stay strings unless they look like a list or mapping:
        # pydantic converts "8" or "true" for typed fields, and a string field keeps "007".
        parsed: Any = value
        if value.strip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"environment variable {name} holds malformed JSON") from None
        _set_dotted(nested, key, parsed)
        sources[key] = f"environment variable {name}"
    return nested, sources


def validate(model: type[M], layers: Layers) -> M:
    """Validate merged layers; the first error becomes one line naming key and source."""
    try:
        return model.model_validate(layers.data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, layers)) from None


def describe_validation_error(e: ValidationError, layers: Layers | None = None) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        msg = "unknown config key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    src = layers.source_of(loc) if layers else None
    more = len(e.errors()) - 1
    tail = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{loc}: {msg}" + (f" (from {src})" if src else "") + tail


def load_model(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    env_prefix: str | None = None,
    env: Mapping[str, str] | None = None,
    env_reserved: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
    override_flag: str = "--set",
) -> M:
    """Load ``model`` from (in increasing priority) ``base``, a YAML file, env vars, overrides."""
    layers = Layers()
    if base:
        layers.add(base, "defaults")
    if path is not None:
        layers.add(read_yaml(path), f"config file {path}")
    if env_prefix is not None:
        nested, sources = env_overrides(
            env_prefix, os.environ if env is None else env, env_reserved
        )
        layers.add(nested, sources)
    nested, sources = parse_overrides(overrides, override_flag)
    layers.add(nested, sources)
    return validate(model, layers)


def _longest_prefix(by_key: Mapping[str, str], dotted: str) -> str | None:
    """The value recorded for ``dotted`` or for its nearest enclosing key."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        found = by_key.get(".".join(parts[:n]))
        if found:
            return found
    return None


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c``; a numeric part indexes an existing list (``models.0.max_n=4``)."""
    parts = dotted.split(".")
    node: Any = target
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
            continue
        child = node.get(part)
        if not isinstance(child, dict | list):
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, dotted)
        index = int(last)
        if isinstance(value, dict) and isinstance(node[index], dict):
            for k, v in _flatten(value):
                _set_dotted(node[index], k, v)
        else:
            node[index] = value
    elif isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in _flatten(value):
            _set_dotted(node[last], k, v)
    else:
        node[last] = value


def _list_item(items: list[Any], part: str, dotted: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"{dotted}: the list has {len(items)} item(s); use an index 0-{len(items) - 1}"
        )
    return items[int(part)]
