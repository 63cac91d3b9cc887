"""``loraplex eval ...``: measured quality, printed as a table and logged to MLflow.

Owns: the ``eval`` command group and ``eval retrieval`` (ingest a BEIR folder's corpus,
score dense, BM25 and hybrid search on its judged queries). Does not own: the metrics
(``loraplex.evaluation``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from loraplex.cli.context import CliState, pass_state
from loraplex.cli.retrieval import collection_name
from loraplex.errors import InputError


@click.group(name="eval", invoke_without_command=True)
@click.option(
    "--questions",
    type=click.Path(path_type=Path),
    help="JSONL: question/text, answer, gold_doc_ids, label (or a BEIR queries.jsonl).",
)
@click.option(
    "--configs",
    default="base,base+rag,adapter,adapter+rag",
    show_default=True,
    help="Comma-separated: base, base+rag, adapter, adapter+rag, routes or models (+rag).",
)
@click.option("--url", help="Endpoint (default: $LORAPLEX_URL or http://127.0.0.1:8000/v1).")
@click.option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (also $LORAPLEX_API_KEY).")
@click.option("--base", "base_model", help="Base model id (default: the endpoint's first).")
@click.option("--adapter", default="json-answer", show_default=True, help="Adapter name.")
@click.option("--collection", help="Collection for +rag (default: retrieval.collection).")
@click.option("--top-k", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="hybrid")
@click.option("--split", help="Only questions of this split (a BEIR queries.jsonl's).")
@click.option("--limit", type=click.IntRange(1), help="At most this many questions.")
@click.option("--schema", type=click.Path(path_type=Path, dir_okay=False), help="JSON schema.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Report folder (must not exist).")
@click.option("--no-mlflow", is_flag=True, help="Write the report only.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def evaluate(ctx: click.Context, questions: Path | None, **options) -> None:
    """Evaluate configurations of a served endpoint on your questions (the four-way
    comparison: base, base+rag, adapter, adapter+rag), or retrieval alone (`eval retrieval`).

    \b
    Examples:
      loraplex eval --questions .loraplex/worlds/seed-7/queries.jsonl --split test
      loraplex eval --questions q.jsonl --configs docs-qa,docs-json --url http://host:8000/v1
    """
    if ctx.invoked_subcommand is not None:
        return
    if questions is None:
        raise click.UsageError("give --questions FILE (or a subcommand: eval retrieval)")
    from loraplex.evaluation.run import EvalOptions, evaluate_endpoint

    state = ctx.find_object(CliState) or CliState()
    opts = EvalOptions(questions=questions, **options)
    result = evaluate_endpoint(state.settings(), opts, progress=not options["as_json"])
    if options["as_json"]:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result["markdown_table"])
    click.echo(result["recommendation"])
    click.echo(f"report: {result['report']}")
    if result.get("mlflow_run_id"):
        click.echo(f"MLflow run: {result['mlflow_run_id']}")


@evaluate.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    multiple=True,
    help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (repeat for several).",
)
@click.option("--split", default="test", show_default=True, help="Which qrels file to score.")
@click.option(
    "--collection",
    "-c",
    help="Collection holding the corpus (default: eval_<folder name>, ingested first); "
    "one --data only.",
)
@click.option("--no-ingest", is_flag=True, help="Search --collection as it is.")
@click.option("--no-mlflow", is_flag=True, help="Print only; log nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@pass_state
def retrieval(
    state: CliState,
    data: tuple[Path, ...],
    split: str,
    collection: str | None,
    no_ingest: bool,
    no_mlflow: bool,
    as_json: bool,
) -> None:
    """Recall@k, MRR@10 and nDCG@10 of dense, BM25 and hybrid search over BEIR folders.

    Each corpus is ingested into its collection first (idempotent: a second run writes
    nothing), every judged query of the split is searched in each mode, and the
    results go to one table per folder and to one MLflow run per folder.

    Example: loraplex eval retrieval --data .loraplex/worlds/seed-0 --data my-beir-folder
    """
    from loraplex.evaluation.retrieval import evaluate_retrieval, load_beir, log_to_mlflow
    from loraplex.retrieval.retriever import Retriever

    if collection and len(data) > 1:
        raise InputError("--collection names the collection of one --data folder only")
    settings = state.settings()
    sets = [(folder, load_beir(folder, split)) for folder in data]  # all read before searching
    reports = []
    with Retriever(settings) as retriever:
        for folder, beir in sets:
            name = collection_name(collection) or "eval_" + re.sub(
                r"[^A-Za-z0-9_]", "_", folder.absolute().name
            )
            if not no_ingest:
                summary = retriever.ingest([beir.corpus], name)
                if not as_json:
                    click.echo(summary.lines()[0])
            results = evaluate_retrieval(retriever, beir, name)
            run_id = None if no_mlflow else log_to_mlflow(settings, beir, name, results)
            reports.append({"collection": name, "mlflow_run_id": run_id, "metrics": results})
            if not as_json:
                _print_retrieval_table(folder, split, name, results)
                if run_id:
                    click.echo(f"MLflow run {run_id} ({settings.mlflow.tracking_uri})")
    if as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))


def _print_retrieval_table(folder: Path, split: str, name: str, results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from loraplex.evaluation.retrieval import MODES

    keys = [k for k in results[MODES[0]] if k != "queries"]
    queries = int(results[MODES[0]]["queries"])
    table = Table(title=f"{folder} ({split}: {queries} queries, collection {name})")
    table.add_column("mode")
    for k in keys:
        table.add_column(k.replace("_at_", "@"), justify="right")
    for mode in MODES:
        table.add_row(mode, *(f"{results[mode][k]:.3f}" for k in keys))
    Console().print(table)
