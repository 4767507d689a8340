"""What the pool controller reports about autoscaling (JSON on its metrics port, `SCALING_PATH`) and the operator
reads to size the RayCluster's worker groups, fill the K2Deployment's status and post an Event per decision. One
schema for both sides: pydantic, since it crosses a process (and a pod) boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SCALING_PATH = "/autoscaling"


class ScaleDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: str = Field(max_length=16)
    at: str = Field(max_length=32, description="When it was made, RFC 3339 UTC.")
    seq: int = Field(ge=0, description="The controller's count of decisions for this pool (1 = the first).")
    from_groups: int = Field(ge=0)
    to_groups: int = Field(ge=0)
    signal: str = Field(max_length=32, description="The signal that asked for it (autoscale.SIGNALS).")
    reason: str = Field(max_length=1024)


class PoolScaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: int = Field(ge=0, description="Groups the pool is to have: serving and starting ones.")
    ready: int = Field(ge=0, description="Groups serving.")
    draining: int = Field(0, ge=0, description="Groups finishing their turns before they are removed.")
    surplus_pods: list[str] = Field(default_factory=list, max_length=1024, description="The pool's worker pods "
                                    "(Ray nodes' hostnames) beyond what its groups need and hosting no group or "
                                    "leader: the ones to remove when the pool shrinks.")
    last: ScaleDecision | None = None


class ScalingReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: dict[str, PoolScaling] = Field(default_factory=dict, max_length=2)
