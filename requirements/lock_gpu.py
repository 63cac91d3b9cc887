"""Write requirements/lock-gpu.txt: the GPU stack for linux x86_64, CPython 3.11.

Resolves pyproject's dependencies with the ``gpu`` and ``dev`` extras for that platform
with ``pip install --dry-run --report`` against PyPI (only metadata is fetched: no
wheel is downloaded, so this runs on a machine without a GPU, of any platform). pip's
local settings (find-links, extra indexes, constraints) are left out, so the CPU torch
of a developer's machine cannot leak in. deepspeed publishes only an sdist, which pip
cannot resolve for another platform: it keeps its pin and its own requirements (read
from the installed deepspeed) are resolved with the rest.

Usage: make lock-gpu   (or .venv/bin/python requirements/lock_gpu.py)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-gpu.txt"
PYTHON = "3.11.7"
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(5, 36)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
HEADER = """\
# The GPU stack for linux x86_64, CPython 3.11 (CUDA torch as vLLM 0.29.0 pins it), for
# `make setup EXTRA=gpu` and the GPU image. Written by `make lock-gpu`
# (requirements/lock_gpu.py) from pyproject's dependencies + the gpu and dev extras,
# from package metadata only (pip --dry-run --report for that platform: no wheel is
# downloaded). deepspeed publishes only an sdist: pinned as pyproject pins it, its own
# requirements resolved with the rest.
"""


def main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["gpu"] + extras["dev"]
    deepspeed = next(r for r in wanted if r.startswith("deepspeed=="))
    reqs = [r for r in wanted if r != deepspeed]
    reqs += [r for r in importlib.metadata.requires("deepspeed") or [] if "extra" not in r]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "reqs.txt").write_text("\n".join(reqs) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run"]
        cmd += ["--ignore-installed", "--index-url", "https://pypi.org/simple"]
        cmd += ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
        cmd += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
        cmd += ["--report", str(report), "-r", str(Path(tmp) / "reqs.txt")]
        subprocess.run(cmd, check=True, env=env)
        installed = json.loads(report.read_text())["install"]
    pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in installed}
    pins["deepspeed"] = deepspeed.split("==")[1]
    LOCK.write_text(HEADER + "\n".join(sorted(f"{k}=={v}" for k, v in pins.items())) + "\n")
    print(f"wrote {LOCK.relative_to(REPO)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
