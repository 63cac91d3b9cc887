"""Connecting to Ray the way the settings say: a local Ray in-process, or a cluster.

Owns: :func:`init_ray`, the one place loraplex calls ``ray.init``, so every command and
test starts Ray the same way (logical CPUs oversubscribed for Ray Serve LLM's CPU
bundles, no dashboard, usage stats off). Does not own: Ray Train or Serve set-up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from loraplex.config import LoraplexConfig
from loraplex.errors import LoraplexError

log = logging.getLogger(__name__)


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
            ray.init(
                num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True, **kwargs
            )
        else:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraplexError(f"cannot start or reach Ray ({address or 'local'}): {first}") from None
    return ray.cluster_resources()
