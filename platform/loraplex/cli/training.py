"""``loraplex train`` and ``loraplex adapters list|promote|rollback|register|canary``.

Owns: loading and validating a training config (YAML + ``--set``) before anything
starts, printing a job's outcome, and the registry commands' arguments and tables.
Does not own: training or the registry conventions (``loraplex.training``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from loraplex.cli.context import CliState, pass_state
from loraplex.errors import InputError
from loraplex.training.config import load_train_config

log = logging.getLogger("loraplex.adapters")


def gate_endpoint_options(command):
    """Where a gate asks: --url (a running endpoint), --serve (started here), --api-key."""
    for option in reversed(
        [
            click.option(
                "--url", default=None, help="Endpoint for --gate (default: $LORAPLEX_URL or local)."
            ),
            click.option(
                "--serve",
                "serve_config",
                type=click.Path(path_type=Path, dir_okay=False),
                help="No endpoint running: start this serving config for --gate, then stop it.",
            ),
            click.option(
                "--api-key", envvar="LORAPLEX_API_KEY", help="API key (also $LORAPLEX_API_KEY)."
            ),
        ]
    ):
        command = option(command)
    return command


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Override a config key, e.g. --set train.max_steps=20 (repeatable).",
)
@click.option("--resume", is_flag=True, help="Continue the job's unfinished last run.")
@click.option(
    "--gate",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Then measure the new version against --promote-to's and promote it if it passes.",
)
@click.option("--promote-to", default="production", show_default=True, help="Alias for --gate.")
@gate_endpoint_options
@pass_state
def train(
    state: CliState,
    config: Path,
    overrides: tuple[str, ...],
    resume: bool,
    gate: Path | None,
    promote_to: str,
    url: str | None,
    serve_config: Path | None,
    api_key: str | None,
) -> None:
    """Fine-tune a LoRA adapter with Ray Train + HF Trainer + PEFT + DeepSpeed, tracked in
    MLflow and registered as a new version of the configured model (alias `candidate`).
    With --gate, the new version is then gated and promoted (`adapters promote --gate`):
    train, evaluate and promote as one job.

    \b
    Examples:
      loraplex train jobs/configs/json_answer.yaml
      loraplex train jobs/configs/json_answer.yaml --set train.max_steps=20 --set ray.num_workers=1
      loraplex train jobs/configs/json_answer.yaml --resume
      loraplex train jobs/configs/smollm2/json_answer.yaml --gate jobs/configs/smollm2/gate.yaml
    """
    from loraplex.evaluation.gate import load_gate
    from loraplex.training.job import run_training

    if gate is not None:
        load_gate(gate, state.settings().home)  # a bad gate file fails before training
        _one_gate_endpoint(url, serve_config)
    cfg = load_train_config(config, overrides, state.settings().home)  # before Ray starts
    result = run_training(cfg, state.settings(), resume=resume)
    verb = "resumed and finished" if result.resumed else "finished"
    click.echo(f"run {result.run_name} {verb}: MLflow run {result.mlflow_run_id}")
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
    click.echo(f"metrics: {metrics}")
    click.echo(
        f"registered {result.registered_model} version {result.version} "
        f"(alias {result.alias}); adapter files in {result.adapter_location}"
    )
    if gate is not None:
        name, version = result.registered_model, str(result.version)
        _gated_promote(state, name, version, promote_to, gate, url, api_key, None, serve_config)


@click.group()
def adapters() -> None:
    """LoRA adapters in the MLflow model registry."""


def _client(state: CliState):
    import mlflow

    from loraplex import tracking

    tracking.setup(state.settings())
    return mlflow.MlflowClient()


@adapters.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """Adapter names, versions, aliases, base model, rank and metrics.

    Example: loraplex adapters list
    """
    from loraplex.models.adapters import list_adapters

    rows = list_adapters(_client(state))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    if not rows:
        click.echo("no adapters registered yet (train one with `loraplex train CONFIG`)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("name", "version", "aliases", "base", "rank", "metrics"):
        table.add_column(col)
    for r in rows:
        metrics = " ".join(f"{k}={v}" for k, v in sorted(r.metrics.items()))
        table.add_row(r.name, r.version, ",".join(r.aliases), r.base_model, r.rank, metrics)
    Console(width=160).print(table)


@adapters.command()
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True)
@click.option(
    "--gate",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A gate file: measure VERSION against the alias's version first; move only if it passes.",
)
@gate_endpoint_options
@click.option("--out", type=click.Path(path_type=Path), help="The gate's report folder.")
@click.option(
    "--force",
    is_flag=True,
    help="Move the alias without a gate (unmeasured; recorded as forced in the alias log).",
)
@pass_state
def promote(
    state: CliState,
    name: str,
    version: str,
    alias: str,
    gate: Path | None,
    url: str | None,
    serve_config: Path | None,
    api_key: str | None,
    out: Path | None,
    force: bool,
) -> None:
    """Point an alias at a version (serving follows the alias), after checking that the
    version's files download and fit its base model; `rollback` undoes it. With --gate,
    both versions first answer the gate's questions through the endpoint, and the alias
    moves only when every rule of the gate holds (refused: exit 1, one line per failing
    metric). Without a gate the move needs --force, and the alias log says so.

    \b
    Examples:
      loraplex adapters promote json-answer 4 --gate jobs/configs/smollm2/gate.yaml
      loraplex adapters promote json-answer 3 --alias production --force
    """
    from loraplex.models.adapters import check_loads
    from loraplex.models.adapters import promote as do_promote

    if not version.isdigit():
        raise InputError(f"version must be a number, not {version!r}")
    if gate is not None:
        _gated_promote(state, name, version, alias, gate, url, api_key, out, serve_config)
        return
    if serve_config is not None or url is not None:
        raise InputError("--url and --serve are for --gate")
    if not force:
        raise InputError(
            f"promoting {name} {version} without --gate would move @{alias} unmeasured: "
            "give --gate GATE_FILE, or --force to move it anyway"
        )
    client = _client(state)
    log.warning("moving %s@%s to version %s without a gate (--force)", name, alias, version)
    before = do_promote(
        client, name, version, alias, check=check_loads(state.settings()), why="promote --force"
    )
    was = f" (was version {before})" if before else ""
    click.echo(f"{name}@{alias} -> version {version}{was}")


def _one_gate_endpoint(url: str | None, serve_config: Path | None) -> None:
    if url is not None and serve_config is not None:
        raise InputError("--url and --serve exclude each other: gate on one endpoint")


def _gated_promote(
    state, name, version, alias, gate, url, api_key, out=None, serve_config=None
) -> None:
    from loraplex.evaluation.gate import temporary_endpoint
    from loraplex.models.adapters import check_loads
    from loraplex.models.adapters import promote as do_promote

    _one_gate_endpoint(url, serve_config)
    client = _client(state)
    if serve_config is not None:
        with temporary_endpoint(state.settings(), serve_config) as local:
            why = _gate(state, client, name, version, alias, gate, local, api_key, out)
    else:
        why = _gate(state, client, name, version, alias, gate, url, api_key, out)
    before = do_promote(client, name, version, alias, check=check_loads(state.settings()), why=why)
    was = f" (was version {before})" if before else ""
    click.echo(f"{name}@{alias} -> version {version}{was}")


def _gate(state, client, name, version, alias, gate, url, api_key, out) -> str:
    """Run the gate; the reason for the alias log when it passes, GateRefused otherwise."""
    import os

    from loraplex.cli.serving import DEFAULT_URL
    from loraplex.errors import LoraplexError
    from loraplex.evaluation.gate import load_gate, run_gate

    cfg = load_gate(gate, state.settings().home)
    try:
        incumbent = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        incumbent = None  # a first promotion: only the gate's absolute rules apply
    if incumbent == version:
        raise InputError(f"{name}@{alias} already points at version {version}")
    endpoint = url or os.environ.get("LORAPLEX_URL") or DEFAULT_URL
    result = run_gate(
        state.settings(), cfg, name, version, alias, incumbent, endpoint, api_key, out
    )
    for c in result.checks:
        click.echo(("  ok      " if c.passed else "  FAILED  ") + c.line())
    click.echo(f"report {result.report}; MLflow run {result.mlflow_run_id}")
    if not result.passed:
        for c in result.failing():
            click.echo(f"refused: {c.line()}", err=True)
        raise LoraplexError(
            f"gate refused {name} version {version} for @{alias}: "
            f"{len(result.failing())} rule(s) failed; alias not moved"
        )
    return f"gate {gate.name} passed (MLflow run {result.mlflow_run_id})"


@adapters.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True)
@pass_state
def rollback(state: CliState, name: str, alias: str) -> None:
    """Move an alias back to the version it pointed at before its last move.

    Example: loraplex adapters rollback json-answer --alias production
    """
    from loraplex.models.adapters import rollback as do_rollback

    was, now = do_rollback(_client(state), name, alias)
    click.echo(f"{name}@{alias} -> version {now} (rolled back from version {was})")


@adapters.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Registered model name.")
@click.option("--base", "base_model", default="embedded", show_default=True, help="Base model.")
@click.option("--alias", default="candidate", show_default=True)
@pass_state
def register(state: CliState, path: Path, name: str, base_model: str, alias: str) -> None:
    """Register a LoRA adapter trained elsewhere (a PEFT folder), after checking it fits
    the base model: files complete and loadable, target modules present, tensor shapes
    right, rank within the serving maximum.

    Example: loraplex adapters register ./my-adapter --name support-tone
    """
    from loraplex import tracking
    from loraplex.models.adapters import register_external
    from loraplex.models.resolve import resolve_base_model

    _valid(name, alias)
    settings = state.settings()
    base_dir, base_ref = resolve_base_model(base_model, settings)
    client = _client(state)
    version = register_external(
        client, path, name, base_dir, base_ref, alias, tracking.setup(settings)
    )
    click.echo(f"registered {name} version {version} (alias {alias}) on base {base_ref}")


def _valid(name: str, alias: str) -> bool:
    from pydantic import ValidationError

    from loraplex.training.config import TrackingConfig

    try:
        TrackingConfig(registered_model=name, alias=alias)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(
            f"{'--name' if first['loc'][0] == 'registered_model' else '--alias'}: {first['msg']}"
        ) from None
    return True


@adapters.command()
@click.argument("name")
@click.option("--url", default=None, help="Endpoint (default: $LORAPLEX_URL or the local one).")
@click.option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (also $LORAPLEX_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def canary(name: str, url: str | None, api_key: str | None, as_json: bool) -> None:
    """The canary (and shadow) of an adapter on a running endpoint: the split, its state
    (active, halted with the reason, ended once promoted) and both versions over the
    window; for a shadow, its agreement with the served answers.

    NAME is the adapter as the serving config names it (json-answer or base:json-answer).

    Example: loraplex adapters canary json-answer --url http://127.0.0.1:8000/v1
    """
    import os

    import httpx

    from loraplex.cli.serving import DEFAULT_URL
    from loraplex.errors import LoraplexError

    base = (url or os.environ.get("LORAPLEX_URL") or DEFAULT_URL).rstrip("/")
    try:
        r = httpx.get(
            f"{base}/canaries",
            headers={"authorization": f"Bearer {api_key or 'none'}"},
            timeout=30,
        )
    except httpx.HTTPError:
        raise LoraplexError(f"cannot reach {base}: is `loraplex serve` running?") from None
    if r.status_code != 200:
        try:
            reason = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = r.text[:200]
        raise LoraplexError(f"{r.status_code}: {reason}")
    rows = r.json().get("data", [])
    found = [c for c in rows if name in (c["adapter"], c["adapter"].split(":", 1)[-1])]
    if not found:
        known = ", ".join(c["adapter"] for c in rows) or "none"
        raise InputError(
            f"{base} serves no canary or shadow of {name!r} to this key (there: {known})"
        )
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    for c in found:
        click.echo(f"{c['adapter']}: {c['stable']['registry']} (version {c['stable']['version']})")
        if c.get("shadow"):
            sh = c["shadow"]
            agreement = "-" if sh["agreement_rate"] is None else f"{sh['agreement_rate']:.0%}"
            click.echo(
                f"  shadow {sh['registry']} on {sh['percent']:g}% (last {sh['window_s']:g} s, "
                f"this replica): {sh['requests']} requests, {sh['errors']} errors, "
                f"agreement {agreement}, JSON failures {sh['format_failure_rate']:.0%}, "
                f"p95 {sh['p95_latency_s']} s against {sh['served_p95_latency_s']} s served, "
                f"{sh['skipped_at_capacity']} not shadowed (at capacity)"
            )
        if not c.get("canary"):
            continue
        state = c["state"] + (f": {c['reason']}" if c.get("reason") else "")
        click.echo(
            f"  canary {c['canary']['registry']} (version {c['canary']['version']}) at "
            f"{c['canary']['percent']:g}% by {c['canary']['sticky_by']}; {state}"
        )
        table = Table(title=f"this replica, last {c['window_s']:g} s")
        for col in ("side", "version", "requests", "5xx rate", "p95 s", "JSON failures"):
            table.add_column(col)
        for arm in ("stable", "canary"):
            w = c["window"][arm]
            p95 = w["p95_latency_s"]
            table.add_row(
                arm,
                str(c[arm]["version"]),
                str(w["requests"]),
                f"{w['error_rate']:.1%}",
                "-" if p95 is None else f"{p95:.2f}",
                f"{w['format_failure_rate']:.1%} of {w['structured_requests']}",
            )
        Console(width=120).print(table)
