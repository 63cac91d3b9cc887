"""Looking without touching: is a folder writable, does a port answer.

Owns: the two probes the health checks of MLflow, Milvus, Ray and storage share. Does
not own: what a failed probe means for a service (``tracking``, ``doctor``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def writable_dir(path: Path) -> tuple[bool, str]:
    """Whether ``path`` (a folder, existing or to be created) can be written."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False, f"no existing parent of {path}"
        probe = probe.parent
    if not probe.is_dir():
        return False, f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return False, f"{probe} is not writable"
    return True, f"{path} ({'exists' if path.exists() else 'will be created'})"


def tcp_reachable(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port} accepts connections"
    except OSError as e:
        return False, f"{host}:{port} does not answer ({e.strerror or e})"
