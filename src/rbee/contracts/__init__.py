"""Wire types shared by every rbee component. Pure pydantic, no I/O, imports nothing else of ours."""

from rbee.contracts.errors import ErrorBody, ErrorDetail
from rbee.contracts.hives import Device, HiveHeartbeat, HiveInfo, HiveView
from rbee.contracts.workers import (
    HeartbeatAck,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStatus,
    WorkerView,
)

__all__ = [
    "Device",
    "ErrorBody",
    "ErrorDetail",
    "HeartbeatAck",
    "HiveHeartbeat",
    "HiveInfo",
    "HiveView",
    "WorkerHeartbeat",
    "WorkerInfo",
    "WorkerStatus",
    "WorkerView",
]
