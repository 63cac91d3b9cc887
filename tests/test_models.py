"""Base models: the packaged SmolLM2 GGUF imported into a temporary home (the folder
complete, registered with its provenance, loading in transformers and in vLLM), every
reference form resolved, and every bad source refused with one line, leaving nothing
half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import clean_env, one_line_error, run_cli

SMOLLM2 = "smollm2-135m-instruct"


def test_the_packaged_gguf_becomes_a_checked_registered_folder(smollm2) -> None:
    from mlflow import MlflowClient

    from loraplex.models.builtin import BUILTIN, builtin_file
    from loraplex.models.importer import sha256_file

    settings, result = smollm2
    folder = result.folder
    assert folder == settings.home / "models" / SMOLLM2
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    # tied embeddings stay one tensor: 134.5M parameters in bf16 is ~269 MB, not ~325
    assert (folder / "model.safetensors").stat().st_size < 280e6
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()

    marker = result.marker
    assert marker["parameters"] == 134_515_008 == result.parameters
    assert marker["quantization"] == "Q4_1" and marker["license"] == "Apache-2.0"
    assert marker["source_sha256"] == sha256_file(builtin_file(BUILTIN[SMOLLM2]))
    assert marker["vllm_parity"] == 1.0  # vLLM loaded it and agreed with transformers
    assert "paris" in marker["sample_reply"].lower()  # a pretrained model, not noise

    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    mv = client.get_model_version_by_alias(SMOLLM2, "current")
    assert str(mv.version) == result.version == "1"
    assert mv.tags["loraplex.kind"] == "base-model"
    assert mv.tags["loraplex.source_sha256"] == marker["source_sha256"]
    assert mv.tags["loraplex.parameters"] == "134515008"

    proc = run_cli("--home", str(settings.home), "models", "list", "--json", env=clean_env())
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows[SMOLLM2]["registry"] == "v1 (current)"
    assert rows[SMOLLM2]["parameters"] == 134_515_008


def test_every_reference_form_resolves_to_the_same_weights(smollm2) -> None:
    from loraplex.errors import InputError
    from loraplex.models.resolve import resolve_base_model

    settings, result = smollm2
    folder, ref = resolve_base_model(SMOLLM2, settings)
    assert folder == result.folder and ref == f"models:/{SMOLLM2}/1"

    cached, ref = resolve_base_model(f"models:/{SMOLLM2}@current", settings)
    assert ref == f"models:/{SMOLLM2}/1" and cached != folder
    assert cached == settings.home / "cache" / "base-models" / SMOLLM2 / "1"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (cached / name).read_bytes() == (folder / name).read_bytes()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    again, _ = resolve_base_model(f"models:/{SMOLLM2}/1", settings)  # downloaded once
    assert again == cached and (cached / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(InputError, match="not in the MLflow registry"):
        resolve_base_model(f"models:/{SMOLLM2}@nosuchalias", settings)
    with pytest.raises(InputError, match="models:/NAME@ALIAS"):
        resolve_base_model("models:/", settings)
    with pytest.raises(InputError, match="not imported yet: run `loraplex models import"):
        from loraplex.config import load_settings

        empty = load_settings(env={"LORAPLEX_HOME": str(settings.home / "empty")})
        resolve_base_model(SMOLLM2, empty)


def _gguf(path: Path, arch: str) -> Path:
    """A small, well-formed GGUF file of another architecture."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_sources_are_refused_in_one_line_leaving_nothing(smollm2, tmp_path: Path) -> None:
    from transformers import T5Config

    from loraplex.models.builtin import BUILTIN, builtin_file

    settings, result = smollm2
    real = builtin_file(BUILTIN[SMOLLM2]).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(real[: len(real) // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(real[:100_000])
    t5 = tmp_path / "t5-folder"
    T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=1, d_kv=8).save_pretrained(t5)
    no_config = tmp_path / "empty-folder"
    no_config.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    cases = [
        ([str(truncated)], "truncated"),
        ([str(header_only)], "truncated"),
        ([str(_gguf(tmp_path / "bert.gguf", "bert"))], "architecture 'bert' cannot be converted"),
        ([str(tmp_path / "missing.gguf")], "no such file"),
        ([str(t5), "--name", "t5"], "not a causal LM"),
        ([str(no_config)], "no config.json"),
        ([str(notes)], "a file must be a .gguf model"),
        (["not-a-model"], "is not a GGUF file, an HF folder, a hub id"),
        ([SMOLLM2, "--name", "embedded"], "--name 'embedded'"),
        ([SMOLLM2], "already exists"),  # the session's import, without --force
    ]
    before = (result.folder / "loraplex_model.json").read_bytes()
    models = settings.home / "models"
    listing = sorted(p.name for p in models.iterdir())
    env = clean_env()
    for args, reason in cases:
        proc = run_cli(
            "--home", str(settings.home), "models", "import", *args, "--no-check-vllm", env=env
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert reason in one_line_error(proc), (args, proc.stderr)
        assert sorted(p.name for p in models.iterdir()) == listing, args  # no staging left
    assert (result.folder / "loraplex_model.json").read_bytes() == before


def test_the_bootstrap_model_is_one_registered_base_model_among_others(tiny_base, settings) -> None:
    from loraplex.models.resolve import resolve_base_model

    folder, ref = resolve_base_model("models:/tiny-llama@current", settings)
    assert ref.startswith("models:/tiny-llama/")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tiny_base.model_dir / name).read_bytes()
    proc = run_cli("--home", str(settings.home), "models", "list", "--json", env=clean_env())
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["tiny-llama"]["folder"] == str(tiny_base.model_dir)
    assert "(current)" in rows["tiny-llama"]["registry"]
    assert rows["tiny-llama"]["parameters"] > 0


def test_an_hf_folder_imports_without_vllm_or_registry(smollm2, tmp_path: Path) -> None:
    _, result = smollm2
    home = tmp_path / "home"
    proc = run_cli(
        "--home",
        str(home),
        "models",
        "import",
        str(result.folder),
        "--name",
        "copy",
        "--no-check-vllm",
        "--no-register",
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "imported copy: 134.5M parameters (LlamaForCausalLM)" in proc.stdout
    copied = home / "models" / "copy"
    marker = json.loads((copied / "loraplex_model.json").read_text())
    assert marker["source_kind"] == "folder" and "registered" not in marker
    assert (copied / "model.safetensors").read_bytes() == (
        result.folder / "model.safetensors"
    ).read_bytes()
    assert not (home / "mlflow.db").exists()  # --no-register touched no registry
