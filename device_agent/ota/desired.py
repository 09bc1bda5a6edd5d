"""The desired-model record (`edgepack.desired/1`) published retained by `edgepack push`."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from edgebundle.errors import InputError
from edgebundle.manifest import parse_version

SCHEMA = "edgepack.desired/1"
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Probation:
    seconds: float = 30.0  # probation ends after this long...
    requests: int = 200  # ...or after this many requests on the new model, whichever comes first
    max_error_rate: float = 0.02
    max_p95_ms: float | None = None


@dataclass(frozen=True)
class Desired:
    update_id: str
    name: str
    version: str
    sha256: str
    size: int
    transfer: dict  # {"method": "mqtt", "topic", "chunk_size", "chunks", "chunk_sha256": [...]} | {"method": "url", "url"}
    allow_downgrade: bool = False
    probation: Probation = field(default_factory=Probation)
    staging_max_p95_ms: float | None = None
    issued: str | None = None
    source: str = ""  # the topic it came from (device or group)

    @classmethod
    def parse(cls, payload: bytes, *, source: str) -> "Desired | None":
        """None for an empty (cleared) record; InputError for a malformed one."""
        if not payload:
            return None
        try:
            d = json.loads(payload)
            if d.get("schema") != SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA!r}")
            parse_version(d["version"])
            if not _SHA.match(d["sha256"]):
                raise ValueError("sha256 is not 64 hex digits")
            t = d["transfer"]
            if t.get("method") == "mqtt":
                if not (isinstance(t["chunk_sha256"], list) and len(t["chunk_sha256"]) == int(t["chunks"])
                        and int(t["chunk_size"]) > 0 and isinstance(t["topic"], str)):
                    raise ValueError("mqtt transfer needs topic, chunk_size, chunks and one chunk_sha256 per chunk")
            elif t.get("method") == "url":
                if not str(t.get("url", "")).startswith(("http://", "https://", "file://")):
                    raise ValueError("url transfer needs an http(s):// or file:// url")
            else:
                raise ValueError(f"unknown transfer method {t.get('method')!r}")
            p = d.get("probation") or {}
            return cls(update_id=str(d["update_id"]), name=str(d["name"]), version=str(d["version"]),
                       sha256=d["sha256"], size=int(d["size"]), transfer=dict(t),
                       allow_downgrade=bool(d.get("allow_downgrade", False)),
                       probation=Probation(**{k: p[k] for k in ("seconds", "requests", "max_error_rate",
                                                                "max_p95_ms") if k in p}),
                       staging_max_p95_ms=(d.get("staging") or {}).get("max_p95_ms"),
                       issued=d.get("issued"), source=source)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"malformed desired record on {source}: {e}") from None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "update_id": self.update_id, "name": self.name, "version": self.version,
                "sha256": self.sha256, "size": self.size, "transfer": self.transfer,
                "allow_downgrade": self.allow_downgrade,
                "probation": {"seconds": self.probation.seconds, "requests": self.probation.requests,
                              "max_error_rate": self.probation.max_error_rate,
                              "max_p95_ms": self.probation.max_p95_ms},
                "staging": {"max_p95_ms": self.staging_max_p95_ms}, "issued": self.issued}


def resolve(device: "Desired | None", groups: list["Desired | None"]) -> "Desired | None":
    """Device beats group; among groups, the first in the agent's configured order wins."""
    if device is not None:
        return device
    return next((g for g in groups if g is not None), None)
