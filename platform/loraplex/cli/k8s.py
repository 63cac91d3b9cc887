"""``loraplex k8s render``: regenerate the RayService serve configs from ``serving/``.

Owns: the command and its ``--check`` mode (exit 1 when a generated file is out of
date). Does not own: what is generated (``loraplex.k8s``).
"""

from __future__ import annotations

from pathlib import Path

import click

from loraplex.errors import InputError, LoraplexError


@click.group()
def k8s() -> None:
    """Kubernetes manifests (KubeRay) generated from the repo's configs."""


@k8s.command()
@click.option("--check", is_flag=True, help="Only check that the generated files are current.")
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The checkout to render (default: the one loraplex runs from).",
)
def render(check: bool, repo: Path | None) -> None:
    """Write k8s/overlays/<overlay>/serve-config.yaml (the RayService serveConfigV2) from
    serving/serve_config.yaml and the overlay's serving config.

    \b
    Then: kubectl apply -k k8s/overlays/cpu-dev   (or gpu)
    """
    from loraplex import k8s as manifests

    repo = (repo or manifests.REPO).absolute()
    if not (repo / "k8s" / "overlays").is_dir() or not (repo / "serving").is_dir():
        raise InputError(f"{repo} is not a loraplex checkout (no k8s/overlays or serving/)")
    if check:
        stale = manifests.stale(repo)
        if stale:
            raise LoraplexError(
                f"generated serve configs out of date for {', '.join(stale)}: "
                "run `loraplex k8s render`"
            )
        click.echo(f"serve configs current: {', '.join(manifests.OVERLAYS)}")
        return
    for path in manifests.render(repo):
        click.echo(f"wrote {path.relative_to(repo)}")
