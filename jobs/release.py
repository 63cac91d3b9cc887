"""Train, gate and promote an adapter as one Ray job.

    ray job submit --working-dir . -- python jobs/release.py \\
        jobs/configs/smollm2/json_answer.yaml --gate jobs/configs/smollm2/gate.yaml \\
        --promote-to production --url http://HOST:8000/v1

The same as `loraplex train CONFIG --gate GATE`: the training config and the gate file are
validated before Ray starts; the job trains and registers a new version, then measures it
against the version --promote-to points at, through the running endpoint, and moves the
alias only when the gate holds (otherwise it exits 1 with the failing metrics). The API
key comes from LORAPLEX_API_KEY (a runtime-env variable).
"""

from __future__ import annotations

import sys

from loraplex.cli.main import main

if __name__ == "__main__":
    if "--gate" not in sys.argv[1:]:
        sys.exit("usage: jobs/release.py CONFIG --gate GATE.yaml [--promote-to ALIAS] [--url URL]")
    main(["train", *sys.argv[1:]])
