"""Retrieval quality on a BEIR-layout folder: recall@k, MRR@10 and nDCG@10 per mode.

Owns: reading a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``),
the ranking metrics (document level: chunks are mapped to their doc ids, first
occurrence counts), running dense, BM25 and hybrid search over every judged query,
and logging the result to MLflow (one run per evaluation). Does not own: ingestion
or search (``loraplex.retrieval``), the CLI table (``loraplex.cli.evaluate``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loraplex.errors import InputError
from loraplex.models import tags
from loraplex.tracking import setup

MODES = ("dense", "bm25", "hybrid")
KS = (1, 3, 5, 10)


@dataclass(frozen=True)
class BeirData:
    root: Path
    corpus: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    split: str


def load_beir(root: Path, split: str = "test") -> BeirData:
    root = Path(root)
    corpus, queries_file = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_file = root / "qrels" / f"{split}.tsv"
    for f in (corpus, queries_file, qrels_file):
        if not f.is_file():
            raise InputError(f"{root} is not a BEIR folder: {f.relative_to(root)} is missing")
    queries: dict[str, str] = {}
    for n, line in enumerate(queries_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            queries[str(row["_id"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f"{queries_file}:{n}: expected a JSON object with _id and text"
            ) from None
    qrels: dict[str, dict[str, int]] = {}
    with qrels_file.open(encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and row[0] in ("query-id", "query_id", "qid")):
                continue
            if len(row) < 3:
                raise InputError(f"{qrels_file}:{n}: expected query-id, corpus-id, score")
            try:
                score = int(row[2])
            except ValueError:
                raise InputError(f"{qrels_file}:{n}: score {row[2]!r} is not an integer") from None
            if row[0] not in queries:
                raise InputError(f"{qrels_file}:{n}: query {row[0]!r} is not in queries.jsonl")
            if score > 0:
                qrels.setdefault(row[0], {})[row[1]] = score
    if not qrels:
        raise InputError(f"{qrels_file}: no relevant (query, document) pairs")
    return BeirData(root, corpus, queries, qrels, split)


def unique_docs(doc_ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [d for d in doc_ids if not (d in seen or seen.add(d))]


def recall_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def mrr_at(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    return next((1 / i for i, d in enumerate(ranked[:k], 1) if d in relevant), 0.0)


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** relevant.get(d, 0) - 1) / math.log2(i + 1) for i, d in enumerate(ranked[:k], 1))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum((2**r - 1) / math.log2(i + 1) for i, r in enumerate(ideal, 1))
    return dcg / idcg if idcg else 0.0


def score_rankings(
    rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """Mean metrics over the judged queries (a query with no ranking scores zero)."""
    sums: dict[str, list[float]] = {f"recall_at_{k}": [] for k in KS}
    sums |= {"mrr_at_10": [], "ndcg_at_10": []}
    for qid, relevant in qrels.items():
        ranked = unique_docs(rankings.get(qid, []))
        for k in KS:
            sums[f"recall_at_{k}"].append(recall_at(ranked, relevant, k))
        sums["mrr_at_10"].append(mrr_at(ranked, relevant))
        sums["ndcg_at_10"].append(ndcg_at(ranked, relevant))
    return {name: math.fsum(v) / len(v) for name, v in sums.items()}


def evaluate_retrieval(
    retriever, data: BeirData, collection: str, modes=MODES, depth: int = 10
) -> dict[str, dict[str, float]]:
    """mode -> metrics, searching ``collection`` (already holding the corpus)."""
    qids = sorted(data.qrels)
    texts = [data.queries[q] for q in qids]
    vectors = retriever.embed(texts, progress=len(texts) > 200)
    results: dict[str, dict[str, float]] = {}
    # chunks, not documents, come back: ask for more so `depth` distinct documents remain
    k = depth * 3
    for mode in modes:
        rankings = {}
        for qid, text, vec in tqdm(
            list(zip(qids, texts, vectors, strict=True)), desc=f"{mode} search", unit="query"
        ):
            hits = retriever.store.search(collection, text, vec, mode=mode, k=k)
            rankings[qid] = [h.doc_id for h in hits]
        results[mode] = score_rankings(rankings, data.qrels) | {"queries": float(len(qids))}
    return results


def log_to_mlflow(settings, data: BeirData, collection: str, results: dict) -> str:
    """One MLflow run with every mode's metrics; returns the run id."""
    import mlflow

    experiment_id = setup(settings)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"eval-retrieval-{data.root.name}"
    ) as run:
        mlflow.set_tags({tags.KIND: tags.KIND_EVAL_RETRIEVAL, tags.COLLECTION: collection})
        mlflow.log_params(
            {
                "data": str(data.root.absolute()),
                "split": data.split,
                "collection": collection,
                "queries": len(data.qrels),
                "chunk_size": settings.retrieval.chunk_size,
                "chunk_overlap": settings.retrieval.chunk_overlap,
                "rrf_k": settings.retrieval.rrf_k,
            }
        )
        mlflow.log_metrics(
            {f"{mode}.{k}": v for mode, metrics in results.items() for k, v in metrics.items()}
        )
        mlflow.log_dict(results, "retrieval_metrics.json")
        return run.info.run_id
