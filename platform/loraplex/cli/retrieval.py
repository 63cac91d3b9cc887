"""``loraplex ingest`` and ``loraplex search``: the knowledge base from the terminal.

Owns: the commands' arguments and how their results are printed (a summary, a table
of hits, or JSON). Does not own: reading, chunking, embedding or Milvus
(``loraplex.retrieval``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from loraplex.cli.context import CliState, pass_state
from loraplex.errors import InputError

_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def collection_name(value: str | None) -> str | None:
    if value is not None and not _COLLECTION.match(value):
        raise InputError(
            f"collection name {value!r}: use letters, digits and underscores, "
            "starting with a letter"
        )
    return value


def _open(state: CliState):
    from loraplex.retrieval.retriever import Retriever

    return Retriever(state.settings())


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--collection", "-c", help="Collection to write (default: retrieval.collection).")
@click.option("--tenant", default="default", show_default=True, help="Partition key value.")
@click.option(
    "--delete",
    "delete_ids",
    multiple=True,
    metavar="DOC_ID",
    help="Remove a document (all its chunks); repeatable. Runs before any PATH.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_state
def ingest(
    state: CliState,
    paths: tuple[Path, ...],
    collection: str | None,
    tenant: str,
    delete_ids: tuple[str, ...],
    as_json: bool,
) -> None:
    """Ingest files and folders (markdown, text, HTML, PDF, JSONL incl. BEIR corpus.jsonl)
    into a Milvus collection: structure-aware chunks, MiniLM embeddings and BM25.
    Re-ingesting unchanged files changes nothing; a changed file replaces its chunks.

    \b
    Examples:
      loraplex ingest docs/ --collection handbook
      loraplex ingest worlds/seed-0/corpus.jsonl
      loraplex ingest --delete guide/setup --collection handbook
    """
    if not paths and not delete_ids:
        raise InputError("give at least one PATH to ingest or --delete DOC_ID")
    collection = collection_name(collection) or state.settings().retrieval.collection
    with _open(state) as retriever:
        removed = None
        if delete_ids:
            removed = retriever.delete(list(delete_ids), collection, tenant)
            if not as_json:
                click.echo(
                    f"deleted {len(delete_ids)} document(s) from {collection!r}: "
                    f"{removed} chunks removed"
                )
        summary = retriever.ingest(list(paths), collection, tenant) if paths else None
    if as_json:
        out = summary.as_dict() if summary else {"collection": collection}
        if removed is not None:
            out["deleted_chunks"] = removed
        click.echo(json.dumps(out, indent=2))
    elif summary:
        for line in summary.lines():
            click.echo(line)


@click.command()
@click.argument("query")
@click.option("--collection", "-c", help="Collection to search (default: retrieval.collection).")
@click.option(
    "--mode",
    type=click.Choice(["dense", "bm25", "hybrid"]),
    default=None,
    help="Dense vectors, BM25, or both fused by reciprocal rank (default: retrieval.mode).",
)
@click.option("--filter", "filter_", default="", help='Milvus expression, e.g. doc_id like "faq%".')
@click.option("-k", "top_k", type=click.IntRange(1, 100), default=None, help="Number of chunks.")
@click.option("--tenant", default=None, help="Only this partition-key value.")
@click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
@pass_state
def search(
    state: CliState,
    query: str,
    collection: str | None,
    mode: str | None,
    filter_: str,
    top_k: int | None,
    tenant: str | None,
    as_json: bool,
) -> None:
    """Search a collection and print ranked chunks with scores, doc ids and sources.

    \b
    Examples:
      loraplex search "warranty of the Fenpra M300" -k 3
      loraplex search "battery life" --mode bm25 --filter 'doc_id like "fenpra%"'
    """
    from loraplex.retrieval.retriever import SearchRequest

    settings = state.settings().retrieval
    if not query.strip():
        raise InputError("the query is empty")
    request = SearchRequest(
        query=query,
        collection=collection_name(collection) or settings.collection,
        top_k=top_k or settings.top_k,
        mode=mode or settings.mode,  # type: ignore[arg-type]
        filter=filter_,
        tenant=tenant,
    )
    with _open(state) as retriever:
        hits = retriever.search(request)
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in hits], indent=2))
        return
    if not hits:
        click.echo("no matching chunks")
        return
    for rank, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())
        snippet = snippet[:240] + ("…" if len(snippet) > 240 else "")
        click.echo(f"[{rank}] {h.score:.4f}  {h.doc_id}  ({h.source}, chars {h.start}-{h.end})")
        if h.heading:
            click.echo(f"    {h.heading}")
        click.echo(f"    {snippet}")
