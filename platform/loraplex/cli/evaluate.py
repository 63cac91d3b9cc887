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


@click.group(name="eval")
def evaluate() -> None:
    """Evaluate retrieval (and, with a served endpoint, models) on your own data."""


@evaluate.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.",
)
@click.option("--split", default="test", show_default=True, help="Which qrels file to score.")
@click.option(
    "--collection",
    "-c",
    help="Collection holding the corpus (default: eval_<folder name>, ingested first).",
)
@click.option("--no-ingest", is_flag=True, help="Search --collection as it is.")
@click.option("--no-mlflow", is_flag=True, help="Print only; log nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@pass_state
def retrieval(
    state: CliState,
    data: Path,
    split: str,
    collection: str | None,
    no_ingest: bool,
    no_mlflow: bool,
    as_json: bool,
) -> None:
    """Recall@k, MRR@10 and nDCG@10 of dense, BM25 and hybrid search over a BEIR folder.

    The corpus is ingested into the collection first (idempotent: a second run writes
    nothing), every judged query of the split is searched in each mode, and the
    results go to a table and to one MLflow run.

    Example: loraplex eval retrieval --data .loraplex/worlds/seed-0
    """
    from loraplex.evaluation.retrieval import MODES, evaluate_retrieval, load_beir, log_to_mlflow
    from loraplex.retrieval.retriever import Retriever

    settings = state.settings()
    beir = load_beir(data, split)
    name = collection_name(collection) or "eval_" + re.sub(
        r"[^A-Za-z0-9_]", "_", data.absolute().name
    )
    with Retriever(settings) as retriever:
        if not no_ingest:
            summary = retriever.ingest([beir.corpus], name)
            if not as_json:
                click.echo(summary.lines()[0])
        results = evaluate_retrieval(retriever, beir, name)
    run_id = None if no_mlflow else log_to_mlflow(settings, beir, name, results)
    if as_json:
        click.echo(
            json.dumps({"collection": name, "mlflow_run_id": run_id, "metrics": results}, indent=2)
        )
        return
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in results[MODES[0]] if k != "queries"]
    table = Table(
        title=f"{data} ({split}: {int(results[MODES[0]]['queries'])} queries, collection {name})"
    )
    table.add_column("mode")
    for k in keys:
        table.add_column(k.replace("_at_", "@"), justify="right")
    for mode in MODES:
        table.add_row(mode, *(f"{results[mode][k]:.3f}" for k in keys))
    Console().print(table)
    if run_id:
        click.echo(f"MLflow run {run_id} ({settings.mlflow.tracking_uri})")
