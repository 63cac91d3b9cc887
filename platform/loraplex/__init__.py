"""loraplex: fine-tune (Ray Train + DeepSpeed + LoRA), retrieve (Milvus), serve (vLLM on
Ray Serve) and evaluate customised open LLMs. See README.md for the user's manual."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraplex")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
