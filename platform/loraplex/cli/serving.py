"""``loraplex serve`` and ``loraplex chat``: the endpoint and a terminal client for it.

Owns: the commands' arguments, starting Ray Serve on the chosen host and port, the
ready message (URL, routes, how to stop), waiting until Ctrl-C / SIGTERM and stopping
what was started; the streaming chat client (the official ``openai`` SDK) that prints
tokens as they come and the sources after the answer. Does not own: the application
(``loraplex.serving.builder``) or request handling (``loraplex.serving.ingress``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from loraplex.cli.context import CliState, pass_state
from loraplex.errors import InputError, LoraplexError

DEFAULT_URL = "http://127.0.0.1:8000/v1"


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key.")
@click.option("--host", help="Bind address (default: 127.0.0.1 without keys, 0.0.0.0 with).")
@click.option("--port", type=int, help="HTTP port (default: http.port, 8000).")
@click.option("--check", "check_only", is_flag=True, help="Validate and check, start nothing.")
@pass_state
def serve(
    state: CliState,
    config: Path | None,
    overrides: tuple[str, ...],
    host: str | None,
    port: int | None,
    check_only: bool,
) -> None:
    """Serve base models, adapters and routes behind one OpenAI-compatible endpoint
    (vLLM behind Ray Serve). Runs until Ctrl-C.

    \b
    Examples:
      loraplex serve                                  # serving/local.yaml
      loraplex serve serving/local.yaml --port 8100
      loraplex serve --set models.0.scaling.num_replicas=2
    """
    from loraplex.serving.builder import DEFAULT_CONFIG, check
    from loraplex.serving.config import load_serving_config

    path = config or DEFAULT_CONFIG
    if not path.exists():
        raise InputError(f"serving config {path} does not exist")
    cfg = load_serving_config(path, overrides)
    if port is not None:
        if not 1 <= port <= 65535:
            raise InputError(f"--port {port}: use 1-65535")
        cfg.http.port = port
    settings = state.settings()
    checked = check(cfg, settings)
    bind = _bind_host(host or cfg.http.host, bool(checked.key_digests))
    if check_only:
        from loraplex.serving.keys import describe

        click.echo(f"{path}: ok ({_summary(cfg)}); would listen on http://{bind}:{cfg.http.port}")
        records = list(checked.key_digests.values()) or [cfg.anonymous_record()]
        for record in records:  # what each key may reach, as the replicas will enforce it
            click.echo(f"  key {describe(record)}")
        return
    _run(cfg, settings, checked, bind)


def _bind_host(asked: str | None, with_keys: bool) -> str:
    if with_keys:
        return asked or "0.0.0.0"
    if asked not in (None, "127.0.0.1", "localhost"):
        click.echo(
            f"no API keys are configured: listening on 127.0.0.1 only, not {asked} "
            "(add auth.keys or LORAPLEX_API_KEYS to serve other machines)",
            err=True,
        )
    else:
        click.echo("no API keys are configured: listening on 127.0.0.1 only", err=True)
    return "127.0.0.1"


def _summary(cfg) -> str:
    return (
        f"{len(cfg.models)} base model(s), {len(cfg.adapters)} adapter(s), "
        f"{len(cfg.routes)} route(s)"
    )


def _run(cfg, settings, checked, host: str) -> None:
    import ray
    from ray import serve as ray_serve
    from rich.console import Console

    from loraplex.ray_runtime import init_ray
    from loraplex.serving.builder import start

    console = Console(stderr=True)
    stop = threading.Event()
    init_ray(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    local = settings.ray.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    try:
        with console.status(
            f"starting {_summary(cfg)}: vLLM loads the model (about 1-2 minutes on CPU)"
        ):
            url = start(cfg, settings, checked, host=host)
        click.echo(f"loraplex is serving at {url} (OpenAI-compatible)")
        for m in cfg.models:
            click.echo(f"  base model  {m.id}")
        for a in cfg.adapters:
            click.echo(f"  adapter     {a.base}:{a.name}  ({a.registry})")
        for r in cfg.routes:
            extra = [f"adapter {r.adapter}"] if r.adapter else []
            extra += [f"retrieval top_k={r.retrieval.top_k}"] if r.retrieval else []
            click.echo(f"  route       {r.name}  ({', '.join([r.base, *extra])})")
        click.echo(f"try: loraplex chat {cfg.routes[0].name if cfg.routes else cfg.models[0].id}")
        click.echo(f"stop: Ctrl-C (or kill -TERM {os.getpid()})")
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
        click.echo("stopping loraplex serve ...")
    finally:
        try:  # on a shared cluster remove only this application
            ray_serve.shutdown() if local else ray_serve.delete(cfg.name)
        finally:
            ray.shutdown()


@click.command()
@click.argument("route")
@click.option("--url", default=None, help=f"Endpoint (default: $LORAPLEX_URL or {DEFAULT_URL}).")
@click.option("--api-key", envvar="LORAPLEX_API_KEY", help="API key (also $LORAPLEX_API_KEY).")
@click.option("--message", "-m", multiple=True, help="Ask this and exit (repeatable).")
@click.option("--max-tokens", type=click.IntRange(1, 100000), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each answer as one JSON line.")
def chat(
    route: str,
    url: str | None,
    api_key: str | None,
    message: tuple[str, ...],
    max_tokens: int,
    temperature: float,
    as_json: bool,
) -> None:
    """Chat with a route, base model or base:adapter; tokens stream, sources follow.

    \b
    Examples:
      loraplex chat docs-qa
      loraplex chat docs-json -m "What is the warranty of the Urven E100?"
    """
    import openai

    client = openai.OpenAI(
        base_url=url or os.environ.get("LORAPLEX_URL") or DEFAULT_URL,
        api_key=api_key or "none",
        max_retries=0,
        timeout=300,
    )
    history: list[dict[str, str]] = []
    questions = iter(message) if message else _prompt_lines()
    for question in questions:
        history.append({"role": "user", "content": question})
        try:
            answer = _ask(client, route, history, max_tokens, temperature, as_json)
        except openai.APIStatusError as e:
            raise LoraplexError(f"{e.status_code}: {_api_message(e)}") from None
        except openai.APIConnectionError:
            raise LoraplexError(
                f"cannot reach {client.base_url}: is `loraplex serve` running?"
            ) from None
        history.append({"role": "assistant", "content": answer})


def _prompt_lines():
    click.echo("type a question, empty line or Ctrl-D to quit", err=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if not line or line in ("exit", "quit"):
            return
        yield line


def _ask(client, route, history, max_tokens, temperature, as_json) -> str:
    stream = client.chat.completions.create(
        model=route,
        messages=history,
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
    )
    parts: list[str] = []
    sources: list[dict] = []
    cites: list = []
    for chunk in stream:
        extra = chunk.model_extra or {}
        sources = extra.get("sources", sources)
        cites = extra.get("citations", cites)
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
                if not as_json:
                    click.echo(c.delta.content, nl=False)
    answer = "".join(parts)
    if as_json:
        click.echo(json.dumps({"answer": answer, "sources": sources, "citations": cites}))
        return answer
    click.echo()
    cited = {c.get("source") for c in (cites[0] if cites else [])}
    for s in sources:
        mark = "*" if s["id"] in cited else " "
        click.echo(f" {mark}[{s['id']}] {s['doc_id']}  {s.get('heading') or s.get('title') or ''}")
    return answer


def _api_message(e) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return (err.get("message") if isinstance(err, dict) else None) or str(e)
