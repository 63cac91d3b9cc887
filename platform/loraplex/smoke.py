"""The smoke check that ends ``make setup``: the stack imports together.

Owns: importing vllm, ray.serve.llm, deepspeed, peft, mlflow and pymilvus and
``from transformers import LlamaForCausalLM`` in one process, finding the built-in
models' files (the SmolLM2 GGUF), and saying which one failed. Does not own: deeper
checks of services (``loraplex doctor``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time

from loraplex.errors import InputError
from loraplex.models.builtin import BUILTIN, builtin_file

MODULES = ("vllm", "ray.serve.llm", "deepspeed", "peft", "mlflow", "pymilvus", "gguf")


def main() -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:
            print(f"smoke check failed: import {name}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    try:
        from transformers import LlamaForCausalLM  # noqa: F401
    except Exception as e:
        print(
            "smoke check failed: from transformers import LlamaForCausalLM: "
            f"{e} (run `loraplex doctor` for the fix)",
            file=sys.stderr,
        )
        return 1

    for model in BUILTIN.values():
        try:
            builtin_file(model)
        except InputError as e:
            print(f"smoke check failed: {e}", file=sys.stderr)
            return 1
    print(
        f"smoke check ok: {', '.join(MODULES)}, transformers, built-in models "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
