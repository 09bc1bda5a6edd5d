"""The update record persisted in DATA/update.json: the state machine's memory across crashes.

Read strictly: a record that is not exactly what this agent writes (truncated, edited, from a
future schema) is set aside as update.json.corrupt and the agent starts from idle, serving the
active bundle (verified on load). It never stops the agent from starting."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeproto.records import UpdateState

log = logging.getLogger("edgepack.agent.ota")
RECORD_SCHEMA = 1
MAX_ENDED = 512  # update_ids remembered as finished (the gate refuses older records anyway)
MAX_RECORD_BYTES = 4 << 20


# The states are the protocol's: update events report them as they are.
State = UpdateState

ENDED = (State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED)
RESUMABLE = (State.DOWNLOADING, State.VERIFYING, State.STAGING, State.SHADOW)
LIVE = (State.SWITCHING, State.PROBATION)  # the new model serves: any failure rolls back


@dataclass
class Record:
    """What is persisted in DATA/update.json (replaced atomically at every transition)."""

    state: State = State.IDLE
    update_id: str | None = None
    desired: dict | None = None
    previous: dict | None = None  # {"bundle": rel path, "sha256", "version"} of the model before the switch
    candidate: dict | None = None
    error: str | None = None
    since: float = 0.0
    attempts: int = 0  # failed tries of this update (transient errors, restarts while verifying/staging)
    ended: dict = field(default_factory=dict)  # update_id -> final state (never retried)
    schema: int = RECORD_SCHEMA

    def to_json(self) -> bytes:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, indent=2).encode()

    def end(self, update_id: str, state: State) -> None:
        self.ended[update_id] = state.value
        while len(self.ended) > MAX_ENDED:
            self.ended.pop(next(iter(self.ended)))

    @classmethod
    def load(cls, path: Path) -> "Record":
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as e:
            log.error("cannot read %s (%s); starting from idle", path, e)
            return cls()
        try:
            return cls.from_bytes(data)
        except ValueError as e:
            log.error("%s is damaged (%s); set aside as %s.corrupt, starting from idle", path, e, path.name)
            try:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            except OSError:
                pass
            return cls()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Record":
        """ValueError for anything but a record this agent could have written."""
        from edgebundle.jsonsafe import JsonError, loads

        if len(data) > MAX_RECORD_BYTES:
            raise ValueError("too large")
        try:
            d = loads(data, max_depth=16)
        except JsonError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("not an object")
        if d.get("schema") != RECORD_SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r} is unknown")
        try:
            state = State(d.get("state"))
        except ValueError:
            raise ValueError(f"unknown state {d.get('state')!r:.40}") from None
        for key in ("update_id", "error"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"{key} must be a string")
        for key in ("desired", "previous", "candidate"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"{key} must be an object")
        for key in ("previous", "candidate"):
            slot = d.get(key)
            for s in (slot, (slot or {}).get("base")):  # base: the bundle an adapter runs on
                if s is not None and not (isinstance(s, dict) and isinstance(s.get("bundle"), str)
                                          and isinstance(s.get("sha256"), str) and ".." not in Path(s["bundle"]).parts
                                          and not Path(s["bundle"]).is_absolute()):
                    raise ValueError(f"{key} must name a bundle inside the data directory")
        since, attempts, ended = d.get("since", 0.0), d.get("attempts", 0), d.get("ended", {})
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since):
            raise ValueError("since must be a number")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= 10 ** 6:
            raise ValueError("attempts must be a small integer")
        if not isinstance(ended, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ended.items()):
            raise ValueError("ended must map update ids to states")
        if state is not State.IDLE and state not in ENDED and d.get("desired") is None:
            raise ValueError(f"state {state.value} without a desired record")
        return cls(state=state, update_id=d.get("update_id"), desired=d.get("desired"), previous=d.get("previous"),
                   candidate=d.get("candidate"), error=d.get("error"), since=float(since), attempts=attempts,
                   ended=dict(ended))
