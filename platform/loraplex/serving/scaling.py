"""Replicas and queues of one Ray Serve deployment: the one scaling model of loraplex.

Owns: :class:`Scaling` (fixed replicas, or Ray Serve autoscaling when min/max are set;
how many requests a replica runs at once and how many may wait for one; which nodes it
may go to, by custom Ray resources) and turning it
into Serve deployment options. Every deployment has a bounded queue: when
``max_queued_requests`` callers already wait, Serve refuses the next one at once
(``BackPressureError``; the HTTP proxy answers 503) instead of piling requests up.
Does not own: what runs in the replicas.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from loraplex.config import StrictModel

# Ray's own resources, set through num_cpus (and the engine's bundles), never by name
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class Scaling(StrictModel):
    """Replicas of one deployment: fixed, or Ray Serve autoscaling when min/max are set."""

    num_replicas: int = Field(default=1, ge=1)
    min_replicas: int | None = Field(
        default=None, ge=0, description="Autoscaling floor; 0 lets Serve scale to zero."
    )
    max_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    max_ongoing_requests: int = Field(default=64, ge=1, description="Run at once per replica.")
    max_queued_requests: int = Field(
        default=256,
        ge=1,
        description="Callers allowed to wait for a replica; beyond, 503 at once (shed).",
    )
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description=(
            'Custom Ray resources each replica needs, e.g. {"cpu-pool": 0.01} to keep it on '
            "nodes started with --resources '{\"cpu-pool\": 1}' (a KubeRay group's "
            "rayStartParams): where replicas may go."
        ),
    )

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in _BUILTIN_RESOURCES:
                raise ValueError(
                    f"{name!r} is not a custom resource: use num_cpus (CPU and GPU are "
                    "set by loraplex)"
                )
            if not name or amount <= 0:
                raise ValueError(f"resource {name!r} needs a name and an amount above 0")
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> Scaling:
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def most(self) -> int:
        """The largest number of replicas this deployment may run."""
        if not self.autoscaling:
            return self.num_replicas
        return self.max_replicas or max(1, self.min_replicas or 1)

    def deployment_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling:
            cfg["autoscaling_config"] = {
                "min_replicas": self.min_replicas if self.min_replicas is not None else 1,
                "max_replicas": self.most,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            cfg["num_replicas"] = self.num_replicas
        actor: dict[str, Any] = {}
        if self.num_cpus is not None:
            actor["num_cpus"] = self.num_cpus
        if self.resources:
            actor["resources"] = dict(self.resources)
        if actor:
            cfg["ray_actor_options"] = actor
        return cfg


class RetrieverScaling(Scaling):
    """The same model with the retriever's defaults: one embedder per replica (one CPU),
    a few searches at a time."""

    target_ongoing_requests: float = Field(default=4, gt=0)
    max_ongoing_requests: int = Field(default=16, ge=1)
    num_cpus: float | None = Field(default=1.0, gt=0)
