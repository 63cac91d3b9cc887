"""Benchmark of retrieval (issue: Retrieval).

Measures, in one run, on a fresh Milvus Lite home:
1. quality on two sets: the embedded world (seed 0, the world `loraplex bootstrap`
   makes; questions that name products and model codes) and ``data/stdlib-docs`` (95
   documents of real English shipped with Python, 76 questions written by reading
   them): recall@k, MRR@10 and nDCG@10 of dense, BM25 and hybrid search, BM25 with the
   English analysis and without it (``retrieval.language=none``), and hybrid under a
   small grid of fusion settings (BM25 weight, BM25 weight for queries with an
   identifier, rrf_k) so the defaults are chosen on both sets together;
2. at each scale (default 10,000 and 100,000 chunks of product documents drawn from
   fresh catalogues): ingest throughput through the real pipeline (read, chunk, embed,
   upsert), search latency p50/p95 per mode, and Milvus Lite's HNSW dense search
   against exact brute-force search (numpy) on the same vectors in the same run:
   latency ratio and recall@10 of the index against the exact answer.

Usage: .venv/bin/python benchmarks/retrieval.py [--scales 10000 100000] [--queries 200]
Prints markdown tables to paste into benchmarks/RESULTS.md and writes retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loraplex.config import load_settings
from loraplex.evaluation.retrieval import MODES, evaluate_retrieval, load_beir
from loraplex.retrieval.ingest import ingest
from loraplex.retrieval.retriever import Retriever, SearchRequest
from loraplex.world.catalog import ATTRIBUTE_KEYS, draw_catalog
from loraplex.world.documents import catalog_documents
from loraplex.world.generate import generate_world
from loraplex.world.tasks import question_text


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p))


STDLIB_DOCS = Path(__file__).with_name("data") / "stdlib-docs"
FUSION_GRID = [  # (bm25_weight, identifier_bm25_weight, rrf_k)
    (1.0, 3.0, 60),
    (1.0, 1.0, 60),
    (3.0, 3.0, 60),
    (0.5, 3.0, 60),
    (1.0, 3.0, 20),
    (1.0, 3.0, 10),
]


def quality(retriever: Retriever, tmp: Path) -> dict:
    """Both sets: each mode with the defaults, BM25 without analysis, the fusion grid."""
    world = tmp / "world-seed-0"
    generate_world(0, world)
    out: dict = {}
    defaults = retriever.store.settings
    for name, folder in (("world_seed_0", world), ("stdlib_docs", STDLIB_DOCS)):
        data = load_beir(folder, "test")
        retriever.ingest([data.corpus], name)
        res = {"defaults": evaluate_retrieval(retriever, data, name)}
        plain = defaults.model_copy(update={"language": "none"})
        retriever.store.settings = plain
        retriever.ingest([data.corpus], f"{name}_plain")  # built without analysis
        res["bm25_without_analysis"] = evaluate_retrieval(retriever, data, f"{name}_plain")["bm25"]
        res["fusion_grid"] = {}
        for bm25, ident, k in FUSION_GRID:
            retriever.store.settings = defaults.model_copy(
                update={"bm25_weight": bm25, "identifier_bm25_weight": ident, "rrf_k": k}
            )
            key = f"bm25={bm25:g} ident={ident:g} rrf_k={k}"
            res["fusion_grid"][key] = evaluate_retrieval(retriever, data, name)["hybrid"]
        retriever.store.settings = defaults
        out[name] = res
    return out


def write_corpus(n_docs: int, folder: Path) -> tuple[list[Path], list[str]]:
    """JSONL files of product documents (10k per file) and fact questions about them."""
    folder.mkdir(parents=True)
    files, questions, rows = [], [], []
    rng = random.Random(n_docs)
    i = 0
    with tqdm(total=n_docs, desc=f"drawing {n_docs} documents") as bar:
        while len(rows) < n_docs:
            catalog = draw_catalog(7, n_families=1, stream=f"bench-{i}")
            i += 1
            for doc in catalog_documents(catalog):
                if doc.entity and len(rows) < n_docs:
                    rows.append({"_id": f"{doc.doc_id}-{i}", "title": doc.title, "text": doc.text})
                    bar.update(1)
            if len(questions) < 2000:
                p = rng.choice(catalog.products)
                questions.append(question_text(rng, p, rng.choice(ATTRIBUTE_KEYS)))
    for k in range(0, len(rows), 10_000):
        f = folder / f"part-{k // 10_000:03d}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows[k : k + 10_000]))
        files.append(f)
    return files, questions


def scale(
    retriever: Retriever, n: int, n_queries: int, tmp: Path, base: np.ndarray | None = None
) -> dict:
    """With ``base`` (real embeddings of another corpus), vectors are not computed but
    drawn as base[i % len(base)] plus small noise, renormalised: MiniLM embeds about 50
    chunks/s on these 2 cores, so 100k real embeddings alone would take over half an
    hour. Texts, BM25 and the Milvus write path stay real."""
    files, questions = write_corpus(n, tmp / f"corpus-{n}")
    name = f"bench_{n}"
    vectors: list[np.ndarray] = []
    noise = np.random.default_rng(0)
    made = 0

    def embed(texts: list[str]) -> np.ndarray:
        nonlocal made
        if base is None:
            v = retriever.embedder.encode(texts, retriever.settings.retrieval.embed_batch_size)
        else:
            idx = np.arange(made, made + len(texts)) % len(base)
            v = base[idx] + noise.normal(0, 0.02, (len(texts), base.shape[1])).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        made += len(texts)
        vectors.append(v)
        return v

    start = time.perf_counter()
    summary = ingest(
        files, name, retriever.store, embed, retriever.model, retriever.settings.retrieval
    )
    ingest_s = time.perf_counter() - start
    chunks = summary.added
    matrix = np.concatenate(vectors)
    # documents are short (one chunk each), so vectors come in the files' line order
    ids = [json.loads(line)["_id"] for f in files for line in f.read_text().splitlines()]
    assert len(ids) == len(matrix) == chunks, (len(ids), len(matrix), chunks)
    queries = random.Random(0).sample(questions, min(n_queries, len(questions)))
    qvec = retriever.embedder.encode(queries)
    out: dict = {
        "vectors": "MiniLM" if base is None else f"MiniLM of {len(base)} chunks + noise (sd 0.02)",
        "chunks": chunks,
        "ingest_s": ingest_s,
        "ingest_chunks_per_s": chunks / ingest_s,
    }
    for mode in MODES:
        lat = []
        for q, v in zip(queries, qvec, strict=True):
            t = time.perf_counter()
            retriever.store.search(name, q, v.tolist(), mode=mode, k=10)
            lat.append((time.perf_counter() - t) * 1000)
        out[f"{mode}_p50_ms"] = percentile(lat, 50)
        out[f"{mode}_p95_ms"] = percentile(lat, 95)
    # the whole retrieval stage of a route (what the Retriever deployment runs per request):
    # the query embedded (not cached: each query is new to it), then searched
    for mode in MODES:
        lat = []
        for q in queries:
            retriever._queries.clear()
            t = time.perf_counter()
            retriever.search(SearchRequest(query=q, collection=name, mode=mode, top_k=3))
            lat.append((time.perf_counter() - t) * 1000)
        out[f"stage_{mode}_p50_ms"] = percentile(lat, 50)
        out[f"stage_{mode}_p95_ms"] = percentile(lat, 95)
    # HNSW (Milvus Lite) against exact search on the same vectors
    hnsw_lat, exact_lat, overlap = [], [], []
    for q, v in zip(queries, qvec, strict=True):
        t = time.perf_counter()
        hits = retriever.store.search(name, q, v.tolist(), mode="dense", k=10)
        hnsw_lat.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        scores = matrix @ v
        top = np.argpartition(-scores, 10)[:10]
        top = top[np.argsort(-scores[top])]
        exact_lat.append((time.perf_counter() - t) * 1000)
        exact = {ids[i] for i in top}
        overlap.append(len(exact & {h.doc_id for h in hits}) / 10)
    out |= {
        "hnsw_p50_ms": percentile(hnsw_lat, 50),
        "exact_numpy_p50_ms": percentile(exact_lat, 50),
        "hnsw_over_exact_latency": statistics.median(hnsw_lat) / statistics.median(exact_lat),
        "hnsw_recall_at_10_vs_exact": sum(overlap) / len(overlap),
    }
    out["_matrix"] = matrix
    return out


def print_quality(q: dict) -> None:
    for name, res in q.items():
        print(f"\n{name}: nDCG@10 / recall@5")
        for mode in MODES:
            m = res["defaults"][mode]
            print(f"| {mode} | {m['ndcg_at_10']:.3f} | {m['recall_at_5']:.3f} |")
        b = res["bm25_without_analysis"]
        print(f"| bm25, no analysis | {b['ndcg_at_10']:.3f} | {b['recall_at_5']:.3f} |")
        for key, m in res["fusion_grid"].items():
            print(f"| hybrid {key} | {m['ndcg_at_10']:.3f} | {m['recall_at_5']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument(
        "--embed-max",
        type=int,
        default=10_000,
        help="Larger scales reuse the real vectors of the largest scale up to this, plus noise.",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    settings = load_settings(overrides=[f"home={tmp / 'home'}", "retrieval.max_file_mb=100"])
    results: dict = {"date": time.strftime("%Y-%m-%d"), "scales": {}}
    with Retriever(settings) as retriever:
        if not args.skip_quality:
            results["quality"] = quality(retriever, tmp)
            print_quality(results["quality"])
        base = None
        for n in args.scales:
            res = scale(retriever, n, args.queries, tmp, base if n > args.embed_max else None)
            matrix = res.pop("_matrix")
            if res["vectors"] == "MiniLM" and (base is None or len(matrix) > len(base)):
                base = matrix
            results["scales"][str(n)] = res
            print(n, json.dumps(res, indent=2), flush=True)
    Path(__file__).with_name("retrieval.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
