"""What both the router and the worker plane say about a worker group: its role and where it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "both"]


@dataclass(frozen=True)
class GroupAddress:
    group_id: str
    role: Role
    address: str  # host:port of the group leader's WorkerGroup service
