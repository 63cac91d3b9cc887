"""``loraplex doctor``: show the stack, the hardware, the active settings and the services.

Owns: rendering :mod:`loraplex.doctor`'s report (a table, or JSON with ``--json``) and
the exit code: 1 with the fix named when something required is broken. Does not own
the checks themselves.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from loraplex import doctor as checks
from loraplex.cli.context import CliState, pass_state


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_state
def doctor(state: CliState, as_json: bool) -> None:
    """Check the installed stack, hardware and configured services.

    Exits 0 when everything required works, 1 (naming the fix) when it does not.

    Example: loraplex doctor --json
    """
    cfg = state.settings()
    report = checks.run(cfg)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _render(report)
    if report.failed:
        for c in report.failed:
            click.echo(
                f"loraplex: error: {c.name}: {c.detail}" + (f" -> fix: {c.fix}" if c.fix else ""),
                err=True,
            )
        raise click.exceptions.Exit(1)


def _render(report: checks.Report) -> None:
    console = Console(highlight=False)
    stack = Table(title="stack", show_header=False, box=None, padding=(0, 2))
    for name, version in report.versions.items():
        if version is not None or name not in (*checks.VLLM_DISTRIBUTIONS, *checks.TRAP_PACKAGES):
            stack.add_row(name, version or "[red]missing[/red]")
    console.print(stack)

    hw = report.hardware
    gpus = ", ".join(hw.get("gpus") or []) or "none (CPU)"
    console.print(
        f"\n[bold]hardware[/bold]  cpus={hw.get('cpus')}  memory={hw.get('memory_gib')} GiB  "
        f"numa node0={hw.get('numa_node0_memory_gib')} GiB  gpus={gpus}"
    )

    cfg = report.config
    console.print(f"\n[bold]settings[/bold]  home={cfg['home']}")
    for section in ("mlflow", "milvus", "ray", "adapters"):
        values = "  ".join(f"{k}={v}" for k, v in cfg[section].items() if v is not None)
        console.print(f"  {section}: {values}")

    table = Table(title="\nchecks", box=None, padding=(0, 2))
    table.add_column("")
    table.add_column("check")
    table.add_column("detail")
    for c in report.checks:
        if c.area == "stack" and c.ok and c.name != "transformers model import":
            continue  # installed packages are already listed above
        mark = (
            "[green]ok[/green]" if c.ok else ("[red]FAIL[/red]" if c.required else "[yellow]warn")
        )
        table.add_row(mark, c.name, c.detail + (f"\n[bold]fix:[/bold] {c.fix}" if c.fix else ""))
    console.print(table)
    verdict = "[red]problems found[/red]" if report.failed else "[green]all required checks pass"
    console.print(f"\n{verdict}")
