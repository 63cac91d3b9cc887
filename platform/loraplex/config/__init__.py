"""Configuration: typed pydantic models and the one way they are loaded.

``settings`` holds the platform settings (home folder, MLflow, Milvus, Ray, adapter
storage); ``loading`` layers YAML, ``LORAPLEX_*`` variables and flags for every config.
"""

from loraplex.config.loading import NAME, StrictModel, load_model, read_yaml
from loraplex.config.settings import LoraplexConfig, load_settings

__all__ = ["NAME", "LoraplexConfig", "StrictModel", "load_model", "load_settings", "read_yaml"]
