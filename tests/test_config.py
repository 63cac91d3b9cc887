"""Platform settings: embedded defaults, layering (YAML < env < flags), one-line errors."""

from pathlib import Path

import pytest
from helpers import clean_env, one_line_error, run_cli

from loraplex.config import load_settings
from loraplex.errors import ConfigError


def test_embedded_defaults_live_under_home(tmp_path: Path):
    cfg = load_settings(env={"LORAPLEX_HOME": str(tmp_path)})
    assert cfg.home == tmp_path
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.mlflow.artifact_location == str(tmp_path / "mlartifacts")
    assert cfg.milvus.uri == str(tmp_path / "milvus" / "milvus.db")
    assert cfg.milvus.is_lite
    assert cfg.ray.address is None and cfg.ray.num_cpus == 8
    assert cfg.ray.storage_path == str(tmp_path / "ray_results")
    assert cfg.adapters.uri == str(tmp_path / "adapters")


def test_variables_of_other_parts_are_not_settings(tmp_path: Path):
    """A serving pod holds LORAPLEX_API_KEY_HASHES (the k8s secret) and each replica
    LORAPLEX_BASE_MODEL: the settings every process loads must not trip over them."""
    env = {
        "LORAPLEX_HOME": str(tmp_path),
        "LORAPLEX_API_KEY_HASHES": "ops=" + "0" * 64,
        "LORAPLEX_BASE_MODEL": "models:/tiny-llama/1",
        "LORAPLEX_API_KEYS": "k",
        "LORAPLEX_API_KEY": "k",
        "LORAPLEX_URL": "http://127.0.0.1:8000/v1",
        "LORAPLEX_CANARY_SECRET": "s",
        "LORAPLEX_ADAPTER_DISK_BYTES": "4294967296",
    }
    assert load_settings(env=env).home == tmp_path
    # every such variable the code reads is in the list
    from loraplex.serving.adapters import BASE_MODEL_ENV, DISK_BYTES_ENV
    from loraplex.serving.canary import CANARY_SECRET_ENV

    assert {BASE_MODEL_ENV, DISK_BYTES_ENV, CANARY_SECRET_ENV} <= set(env)


def test_a_tracking_server_keeps_artifacts_in_its_own_store(tmp_path: Path):
    """With a server, experiments are created without a location of this machine's disk
    (the server's proxied store): adapters must be downloadable from every node."""
    env = {"LORAPLEX_HOME": str(tmp_path), "LORAPLEX_MLFLOW__TRACKING_URI": "http://mlflow:5000"}
    assert load_settings(env=env).mlflow.artifact_location is None
    env["LORAPLEX_MLFLOW__ARTIFACT_LOCATION"] = "s3://bucket/mlflow"
    assert load_settings(env=env).mlflow.artifact_location == "s3://bucket/mlflow"


def test_default_home_is_dot_loraplex_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}).home == tmp_path / ".loraplex"


def test_layers_yaml_then_env_then_flags(tmp_path: Path):
    f = tmp_path / "prod.yaml"
    f.write_text(
        "mlflow:\n  tracking_uri: http://mlflow.internal:5000\n"
        "milvus:\n  uri: http://milvus.internal:19530\n  token: root:Milvus\n"
        "ray:\n  address: ray://head:10001\n  num_cpus: 4\n"
        "adapters:\n  uri: s3://bucket/adapters\n"
    )
    env = {"LORAPLEX_HOME": str(tmp_path), "LORAPLEX_RAY__NUM_CPUS": "6"}
    cfg = load_settings(f, ["ray.num_cpus=12", "log_level=debug"], env=env)
    assert cfg.mlflow.tracking_uri == "http://mlflow.internal:5000"
    assert cfg.milvus.uri == "http://milvus.internal:19530" and not cfg.milvus.is_lite
    assert cfg.milvus.token.get_secret_value() == "root:Milvus"
    assert cfg.public_dict()["milvus"]["token"] == "****"
    assert cfg.ray.address == "ray://head:10001"
    assert cfg.ray.num_cpus == 12  # flag beats env beats file
    assert cfg.log_level == "DEBUG"
    assert cfg.adapters.uri == "s3://bucket/adapters"
    # LORAPLEX_CONFIG names the file when no argument does
    cfg2 = load_settings(env={**env, "LORAPLEX_CONFIG": str(f)})
    assert cfg2.ray.num_cpus == 6 and cfg2.ray.address == "ray://head:10001"
    # the serving clients' and server's variables are not settings
    clients = {"LORAPLEX_URL": "http://x/v1", "LORAPLEX_API_KEY": "k", "LORAPLEX_API_KEYS": "a,b"}
    assert load_settings(env={**env, **clients}).ray.num_cpus == 6


@pytest.mark.parametrize(
    ("yaml_text", "env", "overrides", "expected"),
    [
        ("ray:\n  num_cpu: 4\n", {}, [], "ray.num_cpu: unknown config key (from config file"),
        ("ray:\n  num_cpus: many\n", {}, [], "ray.num_cpus: Input should be a valid integer"),
        ("", {"LORAPLEX_MLFLOW__TRACKING_URI": "ftp://x"}, [], "mlflow.tracking_uri: unsupported"),
        ("", {"LORAPLEX_RAY__ADRESS": "x"}, [], "environment variable LORAPLEX_RAY__ADRESS"),
        ("", {}, ["milvus.uri=/tmp/no-suffix"], "milvus.uri: a Milvus Lite location must"),
        ("", {}, ["ray.address=nohostport"], "ray.address: use 'auto'"),
        ("", {}, ["novalue"], "is not of the form key=value"),
        ("- a\n- b\n", {}, [], "must hold a mapping"),
        ("ray: [unclosed\n", {}, [], "not valid YAML at line"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, env, overrides, expected):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_settings(f, overrides, env={"LORAPLEX_HOME": str(tmp_path), **env})
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mlflow:\n  experment: x\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases = [
        (["--config", str(bad), "doctor"], {}, "mlflow.experment: unknown config key"),
        (["--config", str(tmp_path / "missing.yaml"), "doctor"], {}, "does not exist"),
        (["--config", str(tmp_path), "doctor"], {}, "is a directory"),
        (["--config", str(binary), "doctor"], {}, "is not UTF-8 text"),
        (["-s", "ray.num_cpus=-1", "doctor"], {}, "ray.num_cpus: Input should be greater"),
        (["doctor"], {"LORAPLEX_RAY__NUMCPUS": "4"}, "LORAPLEX_RAY__NUMCPUS"),
        (["doctor"], {"LORAPLEX_LOG_LEVEL": "LOUD"}, "log_level: Input should be"),
        (["--home", str(binary), "doctor"], {}, "home: " + str(binary)),
    ]
    for args, env, expected in cases:
        proc = run_cli(*args, env=clean_env(LORAPLEX_HOME=str(tmp_path / "h"), **env))
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in one_line_error(proc), (args, proc.stderr)
