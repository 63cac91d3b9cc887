"""How well a JSON-answer adapter (or the base model) reads, without serving it.

Greedy answers (transformers, CPU) to a held-out world's test questions, with the gold
document in the prompt (``--mode json``: the adapter's JSON task; ``--mode text``: the
base model's plain answer) or with no source at all (``--mode closed``: the format alone).
With ``--retrieved`` the sources are instead the top ``--top-k`` chunks that hybrid search
returns from the world's evaluation collection, in rank order, as the `docs-json` and
`docs-qa` routes serve them (needs the collection `eval_seed_N` that `loraplex demo`
ingests, and no server holding Milvus Lite). Prints exact match, answer accuracy,
JSON-schema compliance and, with sources, citation precision, where the gold passage
stood and which numbers were cited. A quick check between adapter trainings (a few
minutes, against a server's start and `loraplex eval`); the four-way evaluation is the
figure of record.

Usage: .venv/bin/python benchmarks/adapter_reading.py --home DIR [--adapter models:/json-answer/3]
       [--base-model smollm2-135m-instruct] [--mode json|text|closed] [--retrieved]
       [--top-k 3] [--eval-seed 7] [--questions 80] [--question-last]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.config import load_settings
from loraplex.evaluation.endpoint import Record, load_questions, score
from loraplex.models.resolve import resolve_base_model
from loraplex.prompts import Source, question_prompt
from loraplex.retrieval.retriever import Retriever, SearchRequest, hits_to_sources
from loraplex.serving.citations import citations
from loraplex.tracking import setup


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--adapter", default=None, help="models:/NAME/VERSION; none: the base model")
    ap.add_argument("--base-model", default="tiny-llama", help="an imported base model's name")
    ap.add_argument("--mode", choices=("json", "text", "closed"), default="json")
    ap.add_argument("--retrieved", action="store_true", help="hybrid top-k chunks as sources")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument(
        "--question-last",
        action="store_true",
        help="the layout before prompts.PROMPT_LAYOUT 2: the question once, after the sources",
    )
    args = ap.parse_args()
    if args.retrieved and args.mode == "closed":
        raise SystemExit("--retrieved gives sources; --mode closed has none")

    world = args.home / "worlds" / f"seed-{args.eval_seed}"
    if not (world / "manifest.json").exists():
        raise SystemExit(f"no world in {world}: run `loraplex world generate` or the demo first")
    docs = {d["_id"]: d for d in _jsonl(world / "corpus.jsonl")}
    questions = load_questions(world / "queries.jsonl", split="test", limit=args.questions)

    settings = load_settings(overrides=[f"home={args.home}"])
    base, _ = resolve_base_model(args.base_model, settings)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        setup(settings)
        folder = Path(mlflow.artifacts.download_artifacts(args.adapter))
        adapter_dir = next(p.parent for p in folder.rglob("adapter_config.json"))
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    retriever = Retriever(settings) if args.retrieved else None
    collection = f"eval_seed_{args.eval_seed}"

    started, exact, accurate, compliant, misses = time.perf_counter(), 0.0, 0.0, 0, []
    precisions: list[float] = []
    gold_at: Counter[int] = Counter()  # 0: the gold passage was not retrieved
    cited_at: Counter[str] = Counter()
    for q in tqdm(questions, desc="answering", unit="question"):
        gold = q.gold_docs[0]
        sources = [] if args.mode == "closed" else [Source(gold, docs[gold]["text"])]
        if retriever is not None:
            request = SearchRequest(query=q.text, collection=collection, top_k=args.top_k)
            sources = hits_to_sources(retriever.search(request))
            ranked = [s.doc_id for s in sources]
            gold_at[1 + ranked.index(gold) if gold in ranked else 0] += 1
        prompt = question_prompt(
            q.text, sources, json_answer=args.mode != "text", question_first=not args.question_last
        )
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False)
        reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        # cited and scored as the server and `loraplex eval` do
        cites = citations(reply, [{"id": i, "doc_id": s.doc_id} for i, s in enumerate(sources, 1)])
        cited = [c["doc_id"] for c in cites if c["valid"]]
        rec = score(
            Record("reading", q.text, text=reply, cited=cited), q, args.mode != "text", None
        )
        exact += rec.exact
        accurate += rec.answer_accuracy
        compliant += bool(rec.compliant)
        if sources:
            cited_at[",".join(str(c["source"]) for c in cites) or "none"] += 1
            if rec.citation_precision is not None:
                precisions.append(rec.citation_precision)
        if not rec.exact and len(misses) < 5:
            misses.append((q.answer, reply))
    if retriever is not None:
        retriever.close()
    n = len(questions)
    print(
        f"{args.adapter or args.base_model} ({args.mode}"
        + (f", retrieved top {args.top_k}" if args.retrieved else "")
        + (", question last" if args.question_last else "")
        + f", seed {args.eval_seed}): exact match {exact / n:.3f}, answer accuracy "
        f"{accurate / n:.3f}"
        + (f", JSON compliance {compliant / n:.3f}" if args.mode != "text" else "")
        + f" on {n} questions ({time.perf_counter() - started:.0f} s)"
    )
    if args.mode != "closed":
        precision = sum(precisions) / len(precisions) if precisions else float("nan")
        print(f"citation precision {precision:.3f} over {len(precisions)} answers citing")
        print(f"cited: {dict(cited_at.most_common())}")
    if retriever is not None:
        print(f"gold passage at (0 = not retrieved): {dict(sorted(gold_at.items()))}")
    for gold_answer, reply in misses:
        print(f"  expected {gold_answer!r}, got {reply!r}")


if __name__ == "__main__":
    main()
