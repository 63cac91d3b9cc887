"""``loraplex models import``: a base model from a GGUF file, a folder, a hub id or a
built-in name, into a checked Hugging Face folder and the MLflow registry.

Owns: telling the kinds of source apart, reading a GGUF file's header before anything
heavy (magic, architecture, quantization: a truncated or foreign file is refused in a
second), converting GGUF to a plain HF folder (transformers dequantizes it; the weights
are copied into a model built without ``quantization_config``, because transformers
refuses to save a GGUF-loaded model), the checks (loads in transformers as a causal
LM; optionally greedy parity with vLLM, as ``models.parity`` does), the provenance
marker, and the order that leaves nothing half-written: everything happens in a
staging folder, the registry version is created from it, and only then is it renamed
into ``LORAPLEX_HOME/models/<name>``. Does not own: resolving references (``resolve``)
or the registry conventions (``registry``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraplex import tracking
from loraplex.config import LoraplexConfig
from loraplex.errors import InputError, LoraplexError, first_line
from loraplex.folders import replace_folder, staging_folder
from loraplex.models import tags
from loraplex.models.builtin import BUILTIN, builtin_file
from loraplex.models.parity import agreement, chat_prompts, hf_greedy, vllm_greedy
from loraplex.models.registry import register_base_model
from loraplex.models.resolve import (
    EMBEDDED,
    MARKER,
    NAME,
    _from_hub,
    meta_model,
    models_dir,
    plain_config,
    read_marker,
)

log = logging.getLogger("loraplex.models")
Dtype = Literal["bfloat16", "float16", "float32"]
PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
)


@dataclass
class Source:
    kind: Literal["builtin", "gguf", "folder", "hub"]
    ref: str  # what the user gave
    path: Path | None = None  # gguf file or folder
    license: str = "unknown"
    quantization: str = "none"
    architecture: str = "unknown"


@dataclass
class ImportResult:
    name: str
    folder: Path
    version: str | None
    parameters: int
    seconds: float
    marker: dict[str, Any]


def default_name(source: str) -> str:
    if source in BUILTIN:
        return source
    stem = Path(source).name
    for suffix in (".gguf", ".GGUF"):
        stem = stem.removesuffix(suffix)
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem.lower()).strip("-.")
    return cleaned[:64] or "model"


def identify(source: str) -> Source:
    """What ``source`` is, checked as far as can be without loading weights."""
    if source in BUILTIN:
        b = BUILTIN[source]
        path = builtin_file(b)
        arch, quant = read_gguf_header(path)
        return Source("builtin", source, path, b.license, quant, arch)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{source}: a file must be a .gguf model (or give an HF folder)")
        arch, quant = read_gguf_header(path)
        meta_model(path.parent, gguf_file=path.name, label=source)
        return Source("gguf", source, path.absolute(), "unknown", quant, arch)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{source}: not a Hugging Face model folder (no config.json)")
        meta_model(path, label=source)
        return Source("folder", source, path.absolute())
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf"):
        raise InputError(f"{source}: no such file or folder")
    if source.count("/") == 1 and all(NAME.match(p) for p in source.split("/")):
        return Source("hub", source)
    known = ", ".join(sorted(BUILTIN))
    raise InputError(
        f"{source!r} is not a GGUF file, an HF folder, a hub id (org/name) or a built-in "
        f"model ({known})"
    )


def read_gguf_header(path: Path) -> tuple[str, str]:
    """(architecture, quantization) from a GGUF header; InputError when the file is not
    a complete GGUF model transformers can convert to a causal LM."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = str(field.contents()) if field is not None else ""
        size = path.stat().st_size
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:
        raise InputError(
            f"{path}: not a readable GGUF file (truncated or damaged? {first_line(e, 120)})"
        ) from None
    if not reader.tensors or end > size:
        raise InputError(
            f"{path}: the GGUF file is truncated (its tensors need {end} bytes, it has {size})"
        )
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in readable:
        raise InputError(
            f"{path}: GGUF architecture {arch or '(none)'!r} cannot be converted "
            f"(transformers reads: {', '.join(readable)})"
        )
    file_type = reader.fields.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
    except Exception:
        quant = "unknown"
    return arch, quant


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(path: Path, out: Path, dtype: Dtype) -> None:
    """Dequantize with transformers, then save a plain (unquantized) HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config = plain_config(path.parent, name, label=str(path))  # causal: checked by identify
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()  # tied embeddings stay one tensor (as in the GGUF)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    tokenizer.save_pretrained(out)


def _copy_folder(path: Path, out: Path) -> None:
    keep = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py", ".tiktoken")
    for p in path.iterdir():
        if p.is_file() and p.suffix in keep and p.name != MARKER:
            shutil.copy2(p, out / p.name)


def _check_transformers(folder: Path) -> tuple[int, str]:
    """Loads as a causal LM and generates: (parameters, a short greedy reply)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta_model(folder)  # InputError when not a causal LM
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except Exception as e:
        raise InputError(
            f"the converted model does not load in transformers: {first_line(e)}"
        ) from None
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": PARITY_PROMPTS[0]}],
            tokenize=False,
            add_generation_prompt=True,
        )
    else:
        log.warning("the model has no chat template: training and chat need one")
        prompt = PARITY_PROMPTS[0]
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(p.numel() for p in model.parameters()), reply.strip()


def _check_vllm(folder: Path, n_tokens: int = 8) -> float:
    prompts = chat_prompts(folder, PARITY_PROMPTS)
    hf = hf_greedy(folder, prompts, n_tokens)
    try:
        vl = vllm_greedy(folder, prompts, n_tokens)
    except LoraplexError as e:
        raise InputError(f"the converted model does not load in vLLM: {e}") from None
    return agreement(hf, vl, n_tokens)


def import_model(
    source: str,
    settings: LoraplexConfig,
    name: str | None = None,
    force: bool = False,
    dtype: Dtype = "bfloat16",
    check_vllm: bool = True,
    register: bool = True,
) -> ImportResult:
    started = time.perf_counter()
    name = name or default_name(source)
    if not NAME.match(name) or name == EMBEDDED:
        raise InputError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), not {EMBEDDED!r}"
        )
    target = models_dir(settings) / name
    if target.exists() and any(target.iterdir()) and not force:
        was = (read_marker(target) or {}).get("source", "an earlier import or bootstrap")
        raise InputError(
            f"base model {name} already exists in {target} (from {was}); --force replaces it"
        )
    src = identify(source)
    log.info("importing %s (%s) as base model %s", source, src.kind, name)
    staging = staging_folder(target)
    try:
        marker = _build(src, staging, dtype, check_vllm)
        marker |= {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        version = None
        if register:
            version = _register(settings, staging, name, marker)
            marker["registered"] = {"name": name, "version": version}
            tmp = staging / f"{MARKER}.tmp"
            tmp.write_text(json.dumps(marker, indent=2))
            os.replace(tmp, staging / MARKER)
        _readable(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("base model %s ready in %s (%.0f s)", name, target, seconds)
    return ImportResult(name, target, version, int(marker["parameters"]), seconds, marker)


def _readable(folder: Path) -> None:
    """A model folder others may read (staging folders start private)."""
    folder.chmod(0o755)
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(0o644)


def _build(src: Source, staging: Path, dtype: Dtype, check_vllm: bool) -> dict[str, Any]:
    marker: dict[str, Any] = {"source": src.ref, "source_kind": src.kind}
    if src.kind in ("builtin", "gguf"):
        assert src.path is not None
        log.info("reading %s (sha256, %.0f MB)", src.path.name, src.path.stat().st_size / 1e6)
        marker["source_sha256"] = sha256_file(src.path)
        log.info(
            "dequantizing %s %s weights to %s (about 30 s)",
            src.architecture,
            src.quantization,
            dtype,
        )
        _convert_gguf(src.path, staging, dtype)
    elif src.kind == "folder":
        assert src.path is not None
        _copy_folder(src.path, staging)
    else:
        _copy_folder(_from_hub(src.ref)[0], staging)
    log.info("checking the folder loads in transformers and generates")
    parameters, reply = _check_transformers(staging)
    config = json.loads((staging / "config.json").read_text())
    marker |= {
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "model_type": config.get("model_type"),
        "quantization": src.quantization,
        "license": src.license,
        "parameters": parameters,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "sample_reply": reply[:200],
    }
    if check_vllm:
        log.info("checking greedy parity with vLLM (starts an engine: about 1 minute)")
        marker["vllm_parity"] = _check_vllm(staging)
        if marker["vllm_parity"] < 1.0:
            log.warning(
                "vLLM and transformers agree on %.0f%% of the greedy parity prompts",
                100 * marker["vllm_parity"],
            )
    return marker


def _register(settings: LoraplexConfig, folder: Path, name: str, marker: dict[str, Any]) -> str:
    import mlflow

    experiment_id = tracking.setup(settings)
    version_tags = {
        f"{tags.PROVENANCE_PREFIX}{k}": str(marker[k])
        for k in (
            "source",
            "source_kind",
            "source_sha256",
            "quantization",
            "license",
            "parameters",
            "architecture",
            "dtype",
            "vllm_parity",
        )
        if k in marker
    }
    log.info("registering %s in MLflow (%s)", name, settings.mlflow.tracking_uri)
    return register_base_model(mlflow.MlflowClient(), experiment_id, folder, name, version_tags)
