"""The source layout does not shadow the stdlib `platform` module or the `mlflow` library."""

import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_no_package_markers_at_top_level():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "mlflow" / "__init__.py").exists()
    assert (REPO / "platform" / "loraplex" / "__init__.py").exists()


def test_platform_and_mlflow_resolve_to_the_real_modules_from_repo_root():
    code = (
        "import platform, mlflow, sysconfig, loraplex;"
        "print(platform.__file__); print(mlflow.__file__); print(loraplex.__file__);"
        "print(platform.python_version()); print(sysconfig.get_paths()['stdlib'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    platform_file, mlflow_file, loraplex_file, pyver, stdlib = out
    assert platform_file.startswith(stdlib)
    assert "site-packages" in mlflow_file and str(REPO / "mlflow") not in mlflow_file
    assert loraplex_file == str(REPO / "platform" / "loraplex" / "__init__.py")
    assert pyver.startswith("3.11")


def test_every_module_imports_and_the_layers_hold():
    """Every module of the package imports (a move that left an old path behind fails
    here with the module's name), and the layer contracts in pyproject.toml are kept."""
    code = (
        "import importlib, pkgutil, loraplex\n"
        "for m in pkgutil.walk_packages(loraplex.__path__, 'loraplex.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('imported', m.name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0, lint.stdout[-3000:]
    assert "0 broken" in lint.stdout
