"""Entry point of the ``loraplex`` console script: the command group and error handling.

Owns: the top-level group, its global options, registering each command, and the rule
that no traceback reaches a user: a known error prints ``loraplex: error: <one line>``
and exits with its code (2 for bad input or config), anything unexpected prints one
line and exits 1 (``--debug`` shows the traceback). Does not own: any command's work.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from loraplex import __version__
from loraplex.cli.bootstrap import bootstrap
from loraplex.cli.context import CliState
from loraplex.cli.demo import demo
from loraplex.cli.doctor import doctor
from loraplex.cli.evaluate import evaluate
from loraplex.cli.k8s import k8s
from loraplex.cli.models import models
from loraplex.cli.pairs import pairs
from loraplex.cli.retrieval import ingest, search
from loraplex.cli.serving import chat, serve
from loraplex.cli.training import adapters, train
from loraplex.cli.world import world
from loraplex.errors import LoraplexError, first_line

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="loraplex")
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    envvar="LORAPLEX_CONFIG",
    help="Platform settings YAML (also $LORAPLEX_CONFIG).",
)
@click.option(
    "--home", metavar="DIR", help="Root of the embedded defaults (overrides $LORAPLEX_HOME)."
)
@click.option(
    "--setting",
    "-s",
    "settings_overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Override one setting, e.g. -s ray.num_cpus=4 (repeatable).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: str | None,
    home: str | None,
    settings_overrides: tuple[str, ...],
    debug: bool,
) -> None:
    """loraplex: fine-tune, retrieve, serve and evaluate customised open LLMs.

    Settings come from (lowest to highest priority) the embedded defaults under
    $LORAPLEX_HOME (./.loraplex), --config FILE, LORAPLEX_* variables (LORAPLEX_RAY__NUM_CPUS=4)
    and --setting flags.
    """
    ctx.obj = CliState(
        config_file=config_file, home=home, settings_overrides=list(settings_overrides)
    )
    ctx.meta["debug"] = debug


cli.add_command(bootstrap)
cli.add_command(doctor)
cli.add_command(models)
cli.add_command(world)
cli.add_command(ingest)
cli.add_command(search)
cli.add_command(evaluate)
cli.add_command(train)
cli.add_command(adapters)
cli.add_command(pairs)
cli.add_command(serve)
cli.add_command(chat)
cli.add_command(demo)
cli.add_command(k8s)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # a line per HTTP request is not for users (openai uses httpx2 in this stack)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = cli.main(args=argv, prog_name="loraplex", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.Abort:
        click.echo("loraplex: aborted", err=True)
        code = 130
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"loraplex: error: {e.format_message()}{hint}", err=True)
        code = 2
    except click.ClickException as e:
        click.echo(f"loraplex: error: {e.format_message()}", err=True)
        code = e.exit_code
    except LoraplexError as e:
        click.echo(f"loraplex: error: {e}", err=True)
        code = e.exit_code
    except KeyboardInterrupt:
        click.echo("loraplex: interrupted", err=True)
        code = 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        click.echo(
            f"loraplex: internal error: {type(e).__name__}: {first_line(e)} "
            "(re-run with --debug for the traceback)",
            err=True,
        )
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
