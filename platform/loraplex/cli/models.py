"""``loraplex models import|list``: base models, imported and registered.

Owns: the commands' arguments, progress messages and tables. Does not own: importing
or resolving (``loraplex.models``).
"""

from __future__ import annotations

import json

import click

from loraplex.cli.context import CliState, pass_state


@click.group()
def models() -> None:
    """Base models: import a pretrained model (GGUF, HF folder, hub id, built-in name)
    and list what is imported and registered."""


@models.command(name="import")
@click.argument("source")
@click.option("--name", help="Name to use in configs (default: from the source).")
@click.option("--force", is_flag=True, help="Replace a base model of the same name.")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="Weights dtype of the written folder (GGUF sources).",
)
@click.option(
    "--check-vllm/--no-check-vllm",
    default=True,
    show_default=True,
    help="Check greedy parity with vLLM (starts an engine, about a minute).",
)
@click.option(
    "--register/--no-register",
    default=True,
    show_default=True,
    help="Record the model as a version in the MLflow registry.",
)
@pass_state
def import_(
    state: CliState,
    source: str,
    name: str | None,
    force: bool,
    dtype: str,
    check_vllm: bool,
    register: bool,
) -> None:
    """Import SOURCE as a base model: a .gguf file, a Hugging Face folder, a hub id
    (org/name, where the hub is reachable) or a built-in name. Writes a checked HF
    folder to $LORAPLEX_HOME/models/NAME and registers it in MLflow (alias `current`);
    configs then name it as `base_model: NAME` or `models:/NAME@current`.

    \b
    Examples:
      loraplex models import smollm2-135m-instruct
      loraplex models import ./my-model.Q4_K_M.gguf --name my-model
      loraplex models import ./hf-folder --name support-base --no-check-vllm
    """
    from loraplex.models.importer import import_model

    result = import_model(
        source,
        state.settings(),
        name=name,
        force=force,
        dtype=dtype,  # type: ignore[arg-type]
        check_vllm=check_vllm,
        register=register,
    )
    parity = result.marker.get("vllm_parity")
    quant = result.marker.get("quantization")
    origin = f", dequantized from {quant}" if quant not in (None, "none") else ""
    click.echo(
        f"imported {result.name}: {result.parameters / 1e6:.1f}M parameters "
        f"({result.marker.get('architecture')}{origin}) in {result.folder} "
        f"({result.seconds:.0f} s)"
    )
    if parity is not None:
        click.echo(f"vLLM greedy parity with transformers: {parity:.0%} of prompts")
    if result.version:
        click.echo(f"registered as models:/{result.name}/{result.version} (alias current)")


@models.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """Base models in $LORAPLEX_HOME/models and in the MLflow registry.

    Example: loraplex models list
    """
    from loraplex.models.listing import list_models

    rows = list_models(state.settings())
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
        return
    if not rows:
        click.echo(
            "no base models yet (`loraplex models import smollm2-135m-instruct` or "
            "`loraplex bootstrap`)"
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("name", "parameters", "source", "local folder", "registry"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.name,
            f"{r.parameters / 1e6:.1f}M" if r.parameters else "?",
            r.source,
            str(r.folder) if r.folder else "-",
            r.registry or "-",
        )
    Console(width=160).print(table)
