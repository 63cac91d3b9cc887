"""One evaluation run against an endpoint: options -> measurements -> report -> MLflow.

Owns: :class:`EvalOptions` (validated before any request is sent) and
:func:`evaluate_endpoint`, the recipe that the CLI (``loraplex eval``), the Ray job
(``jobs/evaluate.py``) and the demo share: check the endpoint and the key, resolve the
configurations, send every question through each with a progress bar, summarise,
write the report folder atomically, and log one MLflow run (metrics per
configuration, tagged with the adapter versions that answered and the collection,
the report as artifacts). Does not own: requests and scoring (``endpoint``) or the
report's contents (``report``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from loraplex import tracking
from loraplex.config import LoraplexConfig, StrictModel
from loraplex.errors import InputError
from loraplex.evaluation import endpoint, provenance, report
from loraplex.models import tags
from loraplex.world.manifest import world_seed

DEFAULT_URL = "http://127.0.0.1:8000/v1"


class EvalOptions(StrictModel):
    questions: Path
    configs: str = "base,base+rag,adapter,adapter+rag"
    url: str | None = None
    api_key: str | None = None
    base_model: str | None = None
    adapter: str = "json-answer"
    collection: str | None = None
    top_k: int = Field(default=3, ge=1, le=50)
    mode: str = "hybrid"
    split: str | None = None
    limit: int | None = Field(default=None, ge=1)
    schema_file: Path | None = Field(default=None, alias="schema")
    max_tokens: int = Field(default=64, ge=1)
    concurrency: int = Field(default=4, ge=1, le=64)
    out: Path | None = None
    no_mlflow: bool = False
    as_json: bool = False

    model_config = ConfigDict(**StrictModel.model_config, populate_by_name=True)

    def config_names(self) -> list[str]:
        names = [c.strip() for c in self.configs.split(",") if c.strip()]
        if not names:
            raise InputError("--configs is empty")
        if len(set(names)) != len(names):
            raise InputError(f"--configs names a configuration twice: {self.configs}")
        return names


def evaluate_endpoint(
    settings: LoraplexConfig, opts: EvalOptions, progress: bool = True
) -> dict[str, Any]:
    from tqdm import tqdm

    names = opts.config_names()
    questions = endpoint.load_questions(opts.questions, opts.split, opts.limit)
    schema = _read_schema(opts.schema_file) if opts.schema_file else None
    out = opts.out or settings.home / "reports" / f"eval-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if out.exists():
        raise InputError(f"report folder {out} exists: choose another --out")
    url = opts.url or os.environ.get("LORAPLEX_URL") or DEFAULT_URL
    ep = endpoint.Endpoint(url, opts.api_key)
    models = ep.models()
    collection = opts.collection or settings.retrieval.collection
    retrieval = {"collection": collection, "top_k": opts.top_k, "mode": opts.mode}
    names += provenance.preference_columns(settings, names, models, opts.base_model, opts.adapter)
    configs = endpoint.resolve_configs(names, models, opts.base_model, opts.adapter, retrieval)
    trained_on = provenance.check_unseen(
        settings, opts.questions, models, {c.model for c in configs}
    )

    total = len(questions) * len(configs)
    with tqdm(total=total, desc="evaluating", unit="answer", disable=not progress) as bar:
        records = endpoint.run(
            ep, questions, configs, opts.max_tokens, schema, opts.concurrency, bar.update
        )
    summary = endpoint.summarize(records, configs)
    format_required = any(c.json_task for c in configs) or schema is not None
    advice = report.recommend(summary, format_required)
    meta = {
        "url": url,
        "questions_file": str(opts.questions),
        "questions": len(questions),
        "configs": names,
        "collection": collection if any(c.retrieval for c in configs) else None,
        "date": dt.date.today().isoformat(),
        "max_tokens": opts.max_tokens,
        "concurrency": opts.concurrency,
        "world_seed": world_seed(opts.questions),
        "adapters_trained_on_seeds": trained_on,
    }
    folder = report.write_report(out, summary, endpoint.records_as_dicts(records), meta, advice)
    run_id = None if opts.no_mlflow else _log_mlflow(settings, summary, meta, folder)
    table = report.markdown(summary, meta, advice).split("## Recommendation")[0]
    return {
        "summary": summary,
        "recommendation": advice,
        "report": str(folder),
        "mlflow_run_id": run_id,
        "markdown_table": "\n".join(ln for ln in table.splitlines() if ln.startswith("|")),
    }


def _read_schema(path: Path) -> dict[str, Any]:
    import jsonschema

    try:
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except FileNotFoundError:
        raise InputError(f"--schema {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--schema {path}: not JSON ({e})") from None
    except jsonschema.SchemaError as e:
        raise InputError(f"--schema {path}: not a valid JSON schema ({e.message})") from None
    return schema


def metric_key(config: str, metric: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces: base+rag -> base_rag."""
    return f"{re.sub(r'[^A-Za-z0-9_./ -]', '_', config)}.{metric}"


def _log_mlflow(settings: LoraplexConfig, summary: dict, meta: dict, folder: Path) -> str:
    import mlflow

    experiment_id = tracking.setup(settings)
    versions = sorted({v for s in summary.values() for v in s.get("served_versions", [])})
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{folder.name}") as run:
        mlflow.set_tags(
            {
                tags.KIND: tags.KIND_EVALUATION,
                tags.ENDPOINT: meta["url"],
                tags.COLLECTION: meta.get("collection") or "",
                tags.ADAPTER_VERSIONS: ",".join(versions),
            }
        )
        mlflow.log_params(
            {
                "configs": ",".join(meta["configs"]),
                "questions_file": meta["questions_file"],
                "questions": meta["questions"],
                "max_tokens": meta["max_tokens"],
                "concurrency": meta["concurrency"],
            }
        )
        for config, s in summary.items():
            for key in (*endpoint.METRICS, "prompt_tokens", "completion_tokens", "errors"):
                if s.get(key) is not None:
                    mlflow.log_metric(metric_key(config, key), float(s[key]))
                interval = (s.get("intervals") or {}).get(key)
                if interval:
                    mlflow.log_metric(metric_key(config, f"{key}.ci95_low"), interval[0])
                    mlflow.log_metric(metric_key(config, f"{key}.ci95_high"), interval[1])
        mlflow.log_artifacts(str(folder), artifact_path="report")
        return run.info.run_id
