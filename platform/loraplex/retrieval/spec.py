"""What one search asks for: the retrieval settings shared by routes, requests and the CLI.

Owns: :class:`RetrievalSpec` (collection, top_k, mode, filter, tenant), the one model
that a serving route's ``retrieval``, the retriever deployment's search request and
``loraplex retrieve`` all validate against, and :data:`TENANT`, the pattern a tenant
id must match. Does not own: running the search (``retriever``), or deciding what a
client may ask for (``loraplex.serving.grounding`` narrows a route's spec by the key).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from loraplex.config import StrictModel

# No "/": a chunk id is "/<tenant>/<doc id>#..." for tenants other than the default,
# and doc ids never start with "/", so two tenants' chunk ids cannot collide.
TENANT = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# the tenant of documents ingested without one, and of searches by keys without one
DEFAULT_TENANT = "default"
COLLECTION = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"
MAX_TOP_K = 50


class RetrievalSpec(StrictModel):
    """Where to search and how much to bring back."""

    collection: str | None = Field(
        default=None, pattern=COLLECTION, description="Default: retrieval.collection."
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    filter: str = Field(default="", max_length=4000, description="A Milvus boolean expression.")
    tenant: str | None = Field(
        default=None, pattern=TENANT, description="Only this tenant's documents (partition key)."
    )

    @field_validator("filter")
    @classmethod
    def _self_contained(cls, v: str) -> str:
        return check_filter(v)


def check_filter(expr: str) -> str:
    """``expr`` if it is one self-contained expression: its parentheses balance outside
    string literals and never close one they did not open, and its strings end. Such an
    expression stays inside the parentheses it is wrapped in when a route's filter or
    the tenant clause is ANDed to it (``x == 1) or (true`` cannot escape them)."""
    depth = 0
    quote: str | None = None
    escaped = False
    for ch in expr:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("the filter closes a parenthesis it did not open")
    if quote is not None:
        raise ValueError("the filter has a string that does not end")
    if depth:
        raise ValueError("the filter leaves a parenthesis open")
    return expr


def and_filters(*exprs: str) -> str:
    """Self-contained filters ANDed, each in its own parentheses."""
    parts = [e.strip() for e in exprs if e and e.strip()]
    return " and ".join(f"({p})" for p in parts) if len(parts) > 1 else "".join(parts)
