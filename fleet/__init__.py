"""The fleet side: push bundles to devices, watch the fleet, roll out in gated waves, simulate a
fleet, configure brokers. Speaks the protocol in edgeproto; never imports the agent or TensorFlow.

The names below load on first use (PEP 562): `edgepack --help` and every argument error import
this package, and must not pay for numpy and the transfer code first."""
from __future__ import annotations

import importlib

_WHERE = {"FleetError": "fleet.errors", "RolloutError": "fleet.errors", "RolloutStopped": "fleet.errors",
          "PushResult": "fleet.push", "clear": "fleet.push", "push": "fleet.push", "remove": "fleet.push",
          "FleetTable": "fleet.status", "FleetWatcher": "fleet.status", "status": "fleet.status"}
__all__ = ["push", "remove", "clear", "status", "PushResult", "FleetTable", "FleetWatcher", "FleetError",
           "RolloutError", "RolloutStopped"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fleet' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
