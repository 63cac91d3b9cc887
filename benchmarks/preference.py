"""Benchmark: preference tuning on the adapter's own mistakes, measured on unseen worlds
(issue: past the fine-tuning anchors), against 127.0.0.1.

1. **SFT**: the demo's JSON-answer adapter for ``--model`` (reused when a version trained
   on the current base model and datasets is registered, trained otherwise).
2. **Pairs**: that version served with retrieval on the training world's documents;
   ``build_pairs`` (what ``loraplex pairs build`` runs) samples ``--samples`` answers to
   ``--pair-questions`` training-world questions and keeps one pair per wrong answer.
3. **DPO** (``--method orpo``: ORPO): from that version on those pairs (Ray Train +
   DeepSpeed + PEFT, TRL's trainer, for DPO the SFT version the reference), registered
   as the next version of the same adapter under the alias ``preference`` (the demo's
   ``candidate`` is left alone).
4. **Evaluation** on each ``--seeds`` world (never trained on): ``adapter/SFT+rag`` beside
   ``adapter/DPO+rag`` on the same questions (the report's paired intervals); pooled over
   the seeds: exact match, citation precision, compliance, faithfulness, and the paired
   differences DPO - SFT on exact match and faithfulness.

The ticket adapter is not retrained, so the ticket task cannot move; a general
instruction sample is not measured here.

Usage: .venv/bin/python benchmarks/preference.py --home HOME
       [--model tiny | smollm2-135m-instruct] [--seeds 7 8 9 --questions 80
        --pair-questions 96 --samples 4 --lr 5e-5 --beta 0.1 --epochs 1
        --out preference.json]
(HOME: any; the first run bootstraps or imports the base model and trains the adapter.)
Prints a markdown summary for benchmarks/RESULTS.md and writes --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PAIRED = ("accuracy", "faithfulness")
SHOWN = ("accuracy", "citation_precision", "compliance", "faithfulness", "latency_p50_s")


def serving_config(model: str, port: int):
    """The demo's serving config for ``model`` with only the JSON-answer adapter (the
    ticket adapter is not trained here)."""
    from loraplex.demo import DEMO_MODELS
    from loraplex.serving.config import ServingConfig, load_serving_config

    cfg = load_serving_config(DEMO_MODELS[model].serving_config, [f"http.port={port}"])
    data = cfg.model_dump(exclude_unset=True)
    data["adapters"] = [a for a in data["adapters"] if a["name"] == "json-answer"]
    data["routes"] = [r for r in data["routes"] if r.get("adapter") in (None, "json-answer")]
    return ServingConfig.model_validate(data)


def dpo_config(args, model: str, registered: str, sft: str, pairs: Path, folder: Path) -> Path:
    """A ``method: dpo`` (or ``orpo``) training config starting from ``registered/sft``, written to
    ``folder`` (the same workers and DeepSpeed stage as the supervised config)."""
    import yaml

    from loraplex.demo import DEMO_MODELS

    demo = DEMO_MODELS[model]
    sft_cfg = yaml.safe_load(demo.adapter_configs["json-answer"].read_text())
    cfg = {
        "name": f"{registered}-{args.method}",
        "base_model": demo.base_model,
        "method": args.method,
        "preference": {"start_from": f"{registered}/{sft}", "beta": args.beta},
        "data": {
            "train": str(pairs),
            "format": "preference",
            "max_length": sft_cfg["data"]["max_length"],
        },
        "deepspeed": sft_cfg["deepspeed"],
        "ray": sft_cfg["ray"],
        "train": {
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "per_device_batch_size": args.batch,
            "warmup_ratio": 0.1,
            "logging_steps": 1,
            "eval_steps": 10_000,
            "save_steps": 50,
        },
        "mlflow": {"registered_model": registered, "alias": "preference"},
    }
    path = folder / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pooled(per_seed: list[dict[str, Any]], config: str, metric: str) -> float | None:
    """``metric`` over every seed's questions: per question where the summary keeps it,
    else each seed's mean weighted by its answered questions."""
    if metric in ("accuracy", "faithfulness", "compliance"):
        values = [v for s in per_seed for v in s["summary"][config]["by_question"][metric].values()]
        return sum(values) / len(values) if values else None
    weighted = [
        (c[metric], c["questions"] - c["errors"])
        for c in (s["summary"][config] for s in per_seed)
        if c.get(metric) is not None
    ]
    n = sum(w for _, w in weighted)
    return sum(v * w for v, w in weighted) / n if n else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m-instruct"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--pair-questions", type=int, default=96)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--method", choices=["dpo", "orpo"], default="dpo")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--out", type=Path, default=Path("preference.json"))
    args = ap.parse_args()
    if 0 in args.seeds:
        ap.error("--seeds: 0 is the training world")

    import ray
    from ray import serve

    from loraplex.basemodel.bootstrap import world_dir
    from loraplex.config import load_model, load_settings
    from loraplex.demo import DEMO_MODELS, ensure_adapter, prepare_base
    from loraplex.evaluation.intervals import paired_difference
    from loraplex.evaluation.pairs import PairOptions, build_pairs
    from loraplex.evaluation.run import EvalOptions, evaluate_endpoint
    from loraplex.retrieval.retriever import Retriever
    from loraplex.serving.builder import check, start
    from loraplex.training.config import TrainConfig, load_train_config
    from loraplex.training.job import run_training
    from loraplex.world.generate import generate_world, is_current

    settings = load_settings(overrides=[f"home={args.home}"])
    demo = DEMO_MODELS[args.model]
    top_k = demo.top_k
    work = args.home / "bench-preference" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    prepare_base(settings, args.model)
    sft_config = demo.adapter_configs["json-answer"]
    registered = load_train_config(sft_config, (), settings.home).mlflow.registered_model
    sft = ensure_adapter(settings, sft_config, [])
    seconds["base_and_sft"] = time.perf_counter() - t

    worlds = {}
    with Retriever(settings) as r:  # closed before serving: Milvus Lite is one process's
        r.ingest([world_dir(settings) / "docs"], settings.retrieval.collection)
        for seed in args.seeds:
            worlds[seed] = world_dir(settings, seed)
            if not is_current(worlds[seed]):
                generate_world(seed, worlds[seed], force=worlds[seed].exists())
            r.ingest([worlds[seed] / "docs"], f"eval_seed_{seed}")

    cfg = serving_config(args.model, args.port)
    cfg.adapters[0].registry = f"{registered}/{sft}"
    ray.init(ignore_reinit_error=True)
    try:
        t = time.perf_counter()
        url = start(cfg, settings, check(cfg, settings), port=args.port)
        pairs_file = work / "pairs.jsonl"
        built = build_pairs(
            settings,
            PairOptions(
                questions=world_dir(settings) / "queries.jsonl",
                out=pairs_file,
                adapter="json-answer",
                version=sft,
                registry_name=registered,
                url=url,
                collection=settings.retrieval.collection,
                top_k=top_k,
                split="train",
                limit=args.pair_questions,
                samples=args.samples,
                temperature=args.temperature,
                seed=0,
            ),
        )
        serve.shutdown()  # the two cores go to training
        seconds["pairs"] = time.perf_counter() - t
        kept = ("questions", "answers", "correct", "pairs", "by_kind", "sha256")
        results["pairs"] = {k: built[k] for k in kept}
        if not built["pairs"]:
            raise SystemExit("the SFT adapter made no mistakes on the pair questions: no pairs")

        t = time.perf_counter()
        path = dpo_config(args, args.model, registered, sft, pairs_file, work)
        trained = run_training(
            load_model(TrainConfig, path).resolve_paths(work, settings.home), settings
        )
        seconds["dpo"] = time.perf_counter() - t
        dpo = trained.version
        results["dpo"] = {"version": dpo, "metrics": trained.metrics, "run": trained.mlflow_run_id}

        t = time.perf_counter()
        url = start(cfg, settings, check(cfg, settings), port=args.port)
        configs = f"adapter/{sft}+rag,adapter/{dpo}+rag"
        per_seed = []
        for seed in args.seeds:
            ev = evaluate_endpoint(
                settings,
                EvalOptions(
                    questions=worlds[seed] / "queries.jsonl",
                    split="test",
                    limit=args.questions,
                    configs=configs,
                    url=url,
                    collection=f"eval_seed_{seed}",
                    top_k=top_k,
                    out=work / f"eval-seed-{seed}",
                ),
            )
            per_seed.append({"seed": seed, "summary": ev["summary"], "report": ev["report"]})
        seconds["evaluation"] = time.perf_counter() - t
    finally:
        serve.shutdown()
        ray.shutdown()

    names = {"sft": f"adapter/{sft}+rag", "dpo": f"adapter/{dpo}+rag"}
    results["seeds"] = [
        {
            "seed": s["seed"],
            "report": s["report"],
            **{
                f"{which}.{m}": s["summary"][name].get(m)
                for which, name in names.items()
                for m in SHOWN
            },
        }
        for s in per_seed
    ]
    results["pooled"] = {
        f"{which}.{m}": pooled(per_seed, name, m)
        for which, name in names.items()
        for m in SHOWN
        if m != "latency_p50_s"
    }
    for metric in PAIRED:
        a, b = {}, {}
        for s in per_seed:
            q = s["summary"]
            a |= {f"{s['seed']}:{k}": v for k, v in q[names["sft"]]["by_question"][metric].items()}
            b |= {f"{s['seed']}:{k}": v for k, v in q[names["dpo"]]["by_question"][metric].items()}
        d = paired_difference(a, b)
        results["pooled"][f"dpo-sft.{metric}"] = None if d is None else [d[0], list(d[1])]
    results["seconds"] = seconds
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results, args, sft, dpo))


def markdown(results: dict[str, Any], args, sft: str, dpo: str) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.2f}"

    M = args.method.upper()
    p = results["pairs"]
    kinds = ", ".join(f"{k} {v}" for k, v in p["by_kind"].items())
    m = results["dpo"]["metrics"]
    lines = [
        f"Model {args.model}; SFT version {sft}, {args.method.upper()} version {dpo} "
        f"(β {args.beta}, lr {args.lr}, {args.epochs} epoch(s)). Pairs: {p['pairs']} from "
        f"{p['answers']} answers "
        f"to {p['questions']} training-world questions ({p['correct']} right; {kinds}). "
        f"{args.method.upper()} final: "
        + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("rewards", "loss"))),
        "",
        f"| seed | EM SFT | EM {M} | cit. precision SFT | {M} | compliance SFT | {M} | "
        f"faithfulness SFT | {M} | p50 s SFT | {M} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["seeds"]:
        lines.append(
            f"| {s['seed']} | "
            + " | ".join(f(s[f"{w}.{k}"]) for k in SHOWN for w in ("sft", "dpo"))
            + " |"
        )
    pooled_row = [results["pooled"][f"{w}.{k}"] for k in SHOWN[:-1] for w in ("sft", "dpo")]
    lines.append("| pooled | " + " | ".join(f(v) for v in pooled_row) + " | | |")
    for metric in PAIRED:
        d = results["pooled"][f"dpo-sft.{metric}"]
        if d is not None:
            lines.append(
                f"\n{M} - SFT {metric}: {d[0] * 100:+.1f} points "
                f"[{d[1][0] * 100:+.1f}, {d[1][1] * 100:+.1f}] (paired, pooled over seeds)"
            )
    s = results["seconds"]
    lines.append("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
