"""Which handler takes a message (`Route`: the agent's table of topics), and which record each model
of the device follows: the records accepted per topic, kept by the model they address (so they
outlive a removed model's slot), and the precedence between them.

For a model N: devices/{id}/models/N/desired, then groups/{g}/models/N/desired (groups in the
configured order); for the model at the data directory's top level (the first model, what a
one-model agent serves) then the device's own devices/{id}/desired and the groups' own
groups/{g}/desired (old-style records)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from edgeproto.topics import DeviceTopics

OLD_STYLE = ""  # the key of the device's and groups' own topics


@dataclass(frozen=True)
class Route:
    """One row of the agent's topic table: the first row whose `matches` holds takes the message."""

    matches: Callable[[str], bool]  # topic -> whether this row takes it
    handle: Callable[[str, bytes], None]  # (topic, payload)


class Desires:
    def __init__(self, topics: DeviceTopics, groups: tuple[str, ...]):
        self.topics, self.groups = topics, tuple(groups)
        self._by: dict[str, dict[str, object]] = {}  # model name (OLD_STYLE) -> topic -> record or None
        self._lock = threading.Lock()

    def put(self, topic: str, model: str | None, record) -> None:
        with self._lock:
            self._by.setdefault(model or OLD_STYLE, {})[topic] = record

    def winner(self, name: str | None, *, first: bool):
        """The record model `name` acts on (Desired, Removal or None); `first`: the model at the
        top level, which old-style records address too."""
        return self.source(name, first=first)[0]

    def source(self, name: str | None, *, first: bool) -> tuple[object, str | None]:
        """The record model `name` acts on and the topic it came from ((None, None): none)."""
        t = self.topics
        with self._lock:
            own = self._by.get(name or OLD_STYLE, {}) if name else {}
            old = self._by.get(OLD_STYLE, {}) if first else {}
            order = [(own, t.model_desired(name)), *((own, t.group_model_desired(g, name)) for g in self.groups)] \
                if name else []
            order += [(old, t.desired), *((old, t.group_desired(g)) for g in self.groups)] if first else []
            return next(((src[k], k) for src, k in order if src.get(k) is not None), (None, None))


__all__ = ["Desires", "OLD_STYLE", "Route"]
