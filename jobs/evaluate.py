"""Evaluate a served endpoint: the Ray job entry point.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --questions worlds/seed-7/queries.jsonl --split test --url http://loraplex-serve:8000/v1

The same as `loraplex eval --questions FILE ...`: base, base+rag, adapter and
adapter+rag (or the routes named in --configs) on the same questions; the report goes
to LORAPLEX_HOME/reports (or --out) and to one MLflow run. Platform settings come from
LORAPLEX_* variables or LORAPLEX_CONFIG; the API key from LORAPLEX_API_KEY.
"""

from __future__ import annotations

import sys

from loraplex.cli.main import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
