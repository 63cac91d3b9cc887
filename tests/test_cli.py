"""The `loraplex` command line: --help everywhere, one-line usage errors, exit codes."""

import click
from click.testing import CliRunner
from helpers import one_line_error, run_cli

from loraplex.cli.main import cli


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*prefix, name))


def test_every_command_has_help():
    runner = CliRunner()
    commands = list(_all_commands(cli))
    assert ("doctor",) in commands
    for path in [(), *commands]:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output and len(result.output.splitlines()) > 3


def test_version_and_usage_errors():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("loraplex, version ")
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "No such command 'no-such-command'" in one_line_error(proc)
    proc = run_cli("doctor", "--no-such-flag")
    assert proc.returncode == 2
    assert "No such option '--no-such-flag'" in one_line_error(proc)


def test_cli_starts_without_importing_the_ml_stack():
    """`loraplex doctor` must run when torch/transformers are broken: command modules
    import the heavy libraries inside their commands, never at start-up."""
    import subprocess
    import sys

    code = (
        "import sys, loraplex.cli.main;"
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'vllm', 'mlflow') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
