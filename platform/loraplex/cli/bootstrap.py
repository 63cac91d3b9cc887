"""``loraplex bootstrap``: build (or reuse) the embedded world and tiny base model.

Owns: the command's options and its closing summary. Does not own the work
(``loraplex.basemodel.bootstrap``).
"""

from __future__ import annotations

from pathlib import Path

import click

from loraplex.cli.context import CliState, pass_state
from loraplex.config import load_model


@click.command()
@click.option("--force", is_flag=True, help="Rebuild the world and the model even if they exist.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Pretraining config YAML (model shape, curriculum, workers).",
)
@click.option(
    "--set",
    "overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Override a pretraining setting, e.g. --set num_workers=2 (repeatable).",
)
@pass_state
def bootstrap(
    state: CliState, force: bool, config_file: Path | None, overrides: tuple[str, ...]
) -> None:
    """Generate the default world (seed 0) and pretrain the tiny base model with Ray Train.

    Both are kept under $LORAPLEX_HOME (worlds/seed-0, models/tiny-llama) and recorded in
    MLflow; a second run reuses them and says so.

    Example: loraplex bootstrap --set num_workers=2
    """
    # Imported here: the CLI must start (and `loraplex doctor` run) even when torch or
    # transformers are broken, which is what doctor is for.
    from loraplex.basemodel.bootstrap import bootstrap as run_bootstrap
    from loraplex.basemodel.pretrain import PretrainConfig

    settings = state.settings()
    cfg = load_model(PretrainConfig, config_file, overrides)  # validated before Ray starts
    result = run_bootstrap(settings, force=force, config=cfg)
    verb = "reused" if result.reused else f"built in {result.seconds / 60:.1f} min"
    click.echo(f"base model {verb}: {result.model_dir}")
    click.echo(f"world: {result.world_dir}")
    if result.run_id:
        click.echo(f"MLflow run: {result.run_id} (tracking URI {settings.mlflow.tracking_uri})")
