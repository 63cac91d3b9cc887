"""Reading the MLflow model registry completely and safely.

Owns: :func:`all_registered_models` and :func:`all_versions`, which page through
MLflow's search results (MLflow returns 100 registered models per page by default, so
a registry with more would otherwise be cut short), and :func:`quoted`, the one way a
name goes into a registry filter string (quoted with the quote character it does not
contain). Used by the adapter and base-model registries alike. Does not own: what the models mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraplex.errors import InputError


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow filter string. MLflow's parser takes
    no escapes: a name is quoted with the quote character it does not contain."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise InputError(f"registry name {value[:80]!r} holds both quote characters")


def all_registered_models(client: Any) -> Iterator[Any]:
    """Every registered model, all pages."""
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def all_versions(client: Any, name: str) -> Iterator[Any]:
    """Every version of one registered model, all pages."""
    token = None
    while True:
        page = client.search_model_versions(
            f"name = {quoted(name)}", max_results=200, page_token=token
        )
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return
