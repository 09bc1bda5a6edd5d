"""What the update flow (device_agent.ota.updater) is given: its settings, clock and host, and the
back-off between attempts."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from device_agent.ota.transfer import TransferPolicy
from device_agent.store import Store


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential back-off, capped, with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))].
    After an outage the devices of a fleet spread their retries instead of hitting the model
    server in lockstep."""
    return rand() * min(base_s * 2 ** max(attempt - 1, 0), cap_s)


@dataclass(frozen=True)
class Clock:
    """Wall time (records, events) and monotonic time (deadlines, probation, back-off)."""

    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class UpdaterSettings:
    max_attempts: int = 5
    backoff_s: float = 2.0  # doubles per attempt
    max_backoff_s: float = 300.0
    transfer: TransferPolicy = field(default_factory=TransferPolicy)
    fault_delays: dict = field(default_factory=dict)  # state -> seconds to pause before it (rehearsing crashes)


class Host(Protocol):
    """What the updater needs from its host, the model's slot (device_agent.slot.ModelSlot; injected,
    so tests can drive it with fakes)."""

    store: Store
    mqtt: object  # the MQTT session, when no fetcher is injected

    def active_model(self): ...  # the model this update replaces (the one serving now)
    def swap(self, model): ...
    def verify(self, path: Path, *, sha256: str): ...  # -> verified Bundle, model files extracted
    def load(self, path: Path, *, verified=None): ...
    def event(self, doc: dict) -> None: ...
    def status_changed(self) -> None: ...



def parse_fault_delays(text: str) -> dict[str, float]:
    """EDGEPACK_AGENT_FAULT_DELAY="staging=5,probation=2": pause before entering a state, so
    crash-recovery tests (and operators rehearsing one) can kill the agent at a known point."""
    out = {}
    for item in (text or "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                pass
    return out


__all__ = ["Clock", "Host", "UpdaterSettings", "backoff_delay", "parse_fault_delays"]
