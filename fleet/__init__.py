"""The fleet side: push bundles to devices, watch the fleet, roll out in gated waves, simulate a
fleet, configure brokers. Speaks the protocol in edgeproto; never imports the agent or TensorFlow."""
from fleet.errors import FleetError, RolloutError, RolloutStopped
from fleet.push import Follow, PushOptions, PushResult, clear, push, remove
from fleet.records import Terms
from fleet.status import FleetTable, FleetWatcher, status
from fleet.transfer import TransferSpec

__all__ = ["push", "remove", "clear", "status", "PushOptions", "PushResult", "Follow", "Terms", "TransferSpec",
           "FleetTable", "FleetWatcher", "FleetError", "RolloutError", "RolloutStopped"]
