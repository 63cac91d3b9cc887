"""``loraplex pairs build``: preference pairs from an adapter's own mistakes.

Owns: the command's options and its printed summary. Does not own: sampling and judging
(``loraplex.evaluation.pairs``) or the pair format (``loraplex.training.pairs``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from loraplex.cli.context import CliState
from loraplex.cli.retrieval import collection_name


@click.group()
def pairs() -> None:
    """Preference pairs for `method: dpo` / `orpo` training."""


@pairs.command()
@click.option(
    "--questions",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="A training world's queries.jsonl (or JSONL with answer and gold_doc_ids).",
)
@click.option("--adapter", required=True, help="The adapter's name on the endpoint.")
@click.option("--version", required=True, help="The registry version that answers (pinned).")
@click.option("--registry-name", help="Its registered model (default: the adapter's name).")
@click.option("--collection", required=True, help="The collection holding that world's docs.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--url", help="Endpoint (default: $LORAPLEX_URL or http://127.0.0.1:8000/v1).")
@click.option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (also $LORAPLEX_API_KEY).")
@click.option("--base", "base_model", help="Base model id (default: the endpoint's first).")
@click.option("--split", default="train", show_default=True, help="Questions of this split.")
@click.option("--limit", type=click.IntRange(1), help="At most this many questions.")
@click.option("--samples", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top-k", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--mode", type=click.Choice(["dense", "bm25", "hybrid"]), default="hybrid")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def build(ctx: click.Context, as_json: bool, collection: str, **options) -> None:
    """Sample the adapter's answers on a world it was trained on (retrieval as in
    production) and write one pair per wrong answer: chosen = the gold answer citing the
    gold passage, rejected = the adapter's own answer.

    \b
    Example:
      loraplex pairs build --questions .loraplex/worlds/seed-0/queries.jsonl \\
          --adapter json-answer --version 1 --collection world_seed_0 --out pairs.jsonl
    """
    from loraplex.evaluation.pairs import PairOptions, build_pairs

    state = ctx.find_object(CliState) or CliState()
    opts = PairOptions(collection=collection_name(collection) or collection, **options)
    result = build_pairs(state.settings(), opts, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    kinds = ", ".join(f"{k} {v}" for k, v in result["by_kind"].items())
    click.echo(
        f"{result['pairs']} pairs from {result['answers']} answers to {result['questions']} "
        f"questions ({result['correct']} right; wrong: {kinds}; gold passage not retrieved "
        f"for {result['gold_not_retrieved']}) -> {result['out']} (sha256 "
        f"{result['sha256'][:12]})"
    )
    if result["refused"]:
        click.echo(f"{result['refused']} questions refused, first: {result['first_refusal']}")
