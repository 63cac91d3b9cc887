"""Base models in the MLflow model registry.

Owns: recording a base-model folder as a version of a registered model
(:func:`register_base_model`: a run of kind ``base-model`` holding the folder as its
``base_model`` artifact, a model version carrying the provenance tags, the alias
``current`` moved to it) and listing registered base models. Adapters share the
registry but never these tags: ``loraplex.kind=base-model`` on the registered model
and its versions tells the two apart. Does not own: building the folder (``importer``,
``basemodel.bootstrap``) or downloading it again (``resolve``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import InputError
from loraplex.models import tags as mlflow_tags
from loraplex.models.search import all_registered_models, all_versions

ARTIFACT = "base_model"
KIND_TAG = mlflow_tags.KIND
KIND = mlflow_tags.KIND_BASE_MODEL
ALIAS = "current"


def register_base_model(
    client, experiment_id: str, folder: Path, name: str, tags: dict[str, str]
) -> str:
    """Log ``folder`` in a run of its own and register it as a new version of ``name``;
    returns the version. Refuses a name the registry already uses for an adapter."""
    _check_name(client, name)
    run = client.create_run(experiment_id, run_name=f"import-{name}", tags={KIND_TAG: KIND, **tags})
    run_id = run.info.run_id
    try:
        for key, value in tags.items():
            client.log_param(run_id, key.removeprefix("loraplex."), value[:500])
        client.log_artifacts(run_id, str(folder), ARTIFACT)
        version = register_run_artifact(client, run_id, name, tags)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return version


def register_run_artifact(client, run_id: str, name: str, tags: dict[str, str]) -> str:
    """Register the run's ``base_model`` artifact as a new version of ``name`` (created
    as a base model if new) and move the alias ``current`` to it."""
    import mlflow

    _check_name(client, name)
    try:
        client.create_registered_model(name, tags={KIND_TAG: KIND})
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e).lower():
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT}"
    mv = client.create_model_version(name, source, run_id=run_id, tags={KIND_TAG: KIND, **tags})
    client.set_registered_model_alias(name, ALIAS, mv.version)
    return str(mv.version)


def _check_name(client, name: str) -> None:
    import mlflow

    try:
        existing = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return
    if (existing.tags or {}).get(KIND_TAG) != KIND:
        raise InputError(
            f"{name!r} is already a registered model that is not a base model (an adapter?); "
            "choose another --name"
        )


@dataclass
class BaseModelVersion:
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    source: str


def list_base_models(client) -> list[BaseModelVersion]:
    """Every version of every registered base model (all pages)."""
    out = []
    for rm in all_registered_models(client):
        if (rm.tags or {}).get(KIND_TAG) != KIND:
            continue
        by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in all_versions(client, rm.name):
            out.append(
                BaseModelVersion(
                    rm.name,
                    str(mv.version),
                    sorted(by_version.get(str(mv.version), [])),
                    dict(mv.tags or {}),
                    mv.source,
                )
            )
    return sorted(out, key=lambda v: (v.name, int(v.version)))
