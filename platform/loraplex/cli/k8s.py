"""``loraplex k8s render``: regenerate the RayService serve configs from ``serving/``.

Owns: the command and its ``--check`` mode (exit 1 when a generated file is out of
date). Does not own: what is generated (``loraplex.k8s``).
"""

from __future__ import annotations

import click

from loraplex.errors import LoraplexError


@click.group()
def k8s() -> None:
    """Kubernetes manifests (KubeRay) generated from the repo's configs."""


@k8s.command()
@click.option("--check", is_flag=True, help="Only check that the generated files are current.")
def render(check: bool) -> None:
    """Write k8s/overlays/<overlay>/serve-config.yaml (the RayService serveConfigV2) from
    serving/serve_config.yaml and the overlay's serving config.

    \b
    Then: kubectl apply -k k8s/overlays/cpu-dev   (or gpu)
    """
    from loraplex import k8s as manifests

    if check:
        stale = manifests.stale()
        if stale:
            raise LoraplexError(
                f"generated serve configs out of date for {', '.join(stale)}: "
                "run `loraplex k8s render`"
            )
        click.echo(f"serve configs current: {', '.join(manifests.OVERLAYS)}")
        return
    for path in manifests.render():
        click.echo(f"wrote {path.relative_to(manifests.REPO)}")
