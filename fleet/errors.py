"""The fleet side's exceptions (part of the edgebundle family: the CLI maps them to exit codes)."""
from __future__ import annotations

from edgebundle.errors import EdgepackError


class FleetError(EdgepackError):
    """The broker is unreachable or did not acknowledge, or a fleet operation cannot proceed."""


class RolloutError(FleetError):
    """A rollout cannot start or continue (unknown id, another controller holds it, bad waves)."""


class RolloutStopped(FleetError):
    """A rollout gate failed: the wave was rolled back and the rollout stopped."""

    def __init__(self, message: str, *, record=None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.record = record
