"""``loraplex world generate``: write a seeded synthetic world to a folder.

Owns: the command's arguments and its summary. Does not own the world's content
(``loraplex.world``).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def world() -> None:
    """The embedded synthetic world: documents, questions, datasets."""


@world.command()
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Non-negative integer; each seed draws different facts.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to create (refused if it exists and is not empty).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option(
    "--pretraining",
    is_flag=True,
    help="Also write the base model's pretraining text (what `loraplex bootstrap` reads; "
    "about ten times the time of the rest).",
)
def generate(seed: int, out: Path, force: bool, pretraining: bool) -> None:
    """Generate a world: knowledge documents, BEIR questions and qrels, adapter datasets
    (alpaca, sharegpt and openai JSONL), with --pretraining the base model's pretraining
    text.

    Example: loraplex world generate --seed 7 --out worlds/seed7
    """
    from loraplex.world.generate import generate_world

    manifest = generate_world(seed, out, force=force, pretraining=pretraining)
    q, t = manifest["questions"], manifest["tickets"]
    click.echo(
        f"world seed {seed} written to {out.absolute()}: {manifest['products']} products, "
        f"{manifest['documents']} documents, questions {q['train']} train / {q['test']} test, "
        f"tickets {t['train']} / {t['test']}"
        + (f", {manifest['pretrain_records']} pretraining records" if pretraining else "")
    )
