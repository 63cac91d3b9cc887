"""Replacing a folder only once its successor is complete.

Owns: :func:`staging_folder` (a temporary sibling of the target, same filesystem) and
:func:`replace_folder` (rename into place; an existing target is moved aside first and
removed after). Used wherever loraplex writes a world, a model or a report.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def staging_folder(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def replace_folder(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
