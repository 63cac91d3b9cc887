"""Connecting to Ray the way the settings say: a local Ray in-process, or a cluster.

Owns: :func:`init_ray`, the one place loraplex calls ``ray.init``, so every command and
test starts Ray the same way (logical CPUs oversubscribed for Ray Serve LLM's CPU
bundles, no dashboard, usage stats off), and :func:`quiet_ray_worker`, the set-up hook
of a local Ray's worker processes. Does not own: Ray Train or Serve set-up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError, first_line

log = logging.getLogger(__name__)

# Ray Train's placement-group cleaner asks the State API (the dashboard) every second
# whether the training controller is alive; a local Ray runs without a dashboard, so
# each check fails and logs a warning: one line a second in every training log.
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_worker() -> None:
    """Set-up hook of a local Ray's worker processes (``worker_process_setup_hook``):
    silence the warnings that only say the dashboard is not there."""
    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)


def init_ray(cfg: LoraplexConfig, **kwargs: Any) -> dict[str, float]:
    """Start (or join) Ray; returns the cluster's resources. Idempotent within a process."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2 patches print() in workers to log *and* (with redirected stdout)
    # print, so each progress line reached the driver twice; plain stdout is enough.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # On 2 busy cores Serve's HTTP proxy can take longer than the 5 s readiness check to
    # start, and is then killed and restarted in a loop; give it time (local Ray only:
    # the processes of a local Ray inherit this environment).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.ray.address
    if address in (None, "local") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # inside `ray job submit`: join that cluster
    try:
        if address in (None, "local"):
            log.info("starting a local Ray with %s logical CPUs", cfg.ray.num_cpus)
            _start_local(cfg.ray.num_cpus, **kwargs)
        else:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        raise LoraplexError(
            f"cannot start or reach Ray ({address or 'local'}): {first_line(e)}"
        ) from None
    return ray.cluster_resources()


def _start_local(num_cpus: int, attempts: int = 3, **kwargs: Any) -> None:
    """A local Ray. Ray gives its raylet a fixed 30 s to register; on a machine whose
    cores are busy (processes of a Ray just stopped still exiting) that can pass, so a
    start that timed out is tried again from scratch."""
    import time

    import ray

    for attempt in range(1, attempts + 1):
        began = time.time()
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=True,
                runtime_env={"worker_process_setup_hook": "loraplex.ray_runtime.quiet_ray_worker"},
                **kwargs,
            )
            return
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            _stop_children_since(began - 1)  # the half-started Ray's processes
            if attempt == attempts:
                raise TimeoutError(str(e)) from None
            log.warning("Ray did not come up in time (attempt %d); starting it again", attempt)
            ray.shutdown()
            time.sleep(5)


def _stop_children_since(began: float) -> None:
    """Stop this process's children started since ``began`` (a failed ``ray.init``
    leaves its GCS, raylet and helpers running, unreachable through ``ray.shutdown``)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= began:
                child.kill()
        except psutil.Error:
            pass
