"""Fine-tune a LoRA adapter: the Ray job entry point.

    ray job submit --working-dir . -- python jobs/finetune.py jobs/configs/json_answer.yaml
    python jobs/finetune.py jobs/configs/json_answer.yaml --set train.max_steps=20 [--resume]

The same as `loraplex train CONFIG`: the config is validated before Ray starts, the job
joins the cluster it was submitted to (RAY_ADDRESS), logs to MLflow and registers the
adapter. Platform settings come from LORAPLEX_* variables (LORAPLEX_HOME,
LORAPLEX_MLFLOW__TRACKING_URI, ...) or LORAPLEX_CONFIG.
"""

from __future__ import annotations

import sys

from loraplex.cli.main import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
