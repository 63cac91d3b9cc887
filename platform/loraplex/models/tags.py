"""Every MLflow tag name loraplex writes or reads, in one place.

Owns: the names (and the ``kind`` values) of the tags on runs, registered models and
model versions, so that a writer and its readers cannot drift apart. Does not own what
any tag's value means beyond its comment: each writer documents its own.
"""

from __future__ import annotations

# What a run or a registered model is: one of the KIND_* values below.
KIND = "loraplex.kind"
KIND_BASE_MODEL = "base-model"
KIND_FINETUNE = "finetune"
KIND_ADAPTER_REGISTRATION = "adapter-registration"
KIND_EVALUATION = "evaluation"
KIND_EVAL_RETRIEVAL = "eval-retrieval"
KIND_PROMOTION_GATE = "promotion-gate"

# On adapter versions (and the runs that made them).
BASE_MODEL = "loraplex.base_model"  # the base-model reference the adapter was trained on
LORA_RANK = "loraplex.lora_rank"
RUN_ID = "loraplex.run_id"
# On the registered model: JSON lists of an alias's earlier versions and of its moves.
ALIAS_HISTORY = "loraplex.alias_history.{alias}"
ALIAS_LOG = "loraplex.alias_log.{alias}"
# On a canary's model version: JSON, why and when the canary was halted.
CANARY_HALTED = "loraplex.canary_halted"

# On fine-tuning runs.
JOB = "loraplex.job"
DATASET_SHA256 = "loraplex.dataset_sha256"  # the training data's fingerprint
GIT_COMMIT = "loraplex.git_commit"
STORAGE = "loraplex.storage"
WORLD_SEEDS = "loraplex.world_seeds"  # comma-separated seeds of the worlds trained on
METHOD = "loraplex.method"  # sft, dpo or orpo
PARENT_VERSION = "loraplex.parent_version"  # NAME/VERSION a preference run started from

# On base-model runs and versions (bootstrap, import).
WORLD_SEED = "loraplex.world_seed"
BASE_MODEL_PATH = "loraplex.base_model_path"
SOURCE = "loraplex.source"
PARAMETERS = "loraplex.parameters"
ARCHITECTURE = "loraplex.architecture"
LICENSE = "loraplex.license"
PROVENANCE_PREFIX = "loraplex."  # + each key of an imported model's provenance

# On evaluation and gate runs.
ENDPOINT = "loraplex.endpoint"
COLLECTION = "loraplex.collection"
ADAPTER_VERSIONS = "loraplex.adapter_versions"
ADAPTER = "loraplex.adapter"
ALIAS = "loraplex.alias"
CANDIDATE_VERSION = "loraplex.candidate_version"
INCUMBENT_VERSION = "loraplex.incumbent_version"
DECISION = "loraplex.decision"
