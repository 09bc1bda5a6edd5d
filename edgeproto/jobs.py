"""The profile job record (`edgepack.profile-job/1`): `edgepack profile` asks one device to fetch a
bundle, load it beside the serving model, benchmark it and report, never activating it.

Published (not retained) on `{root}/devices/{id}/profile/job`. The bundle travels as for an update
(the same `transfer` section, chunks retained on `{root}/bundles/{sha256}/chunks/{i}`), and a job is
as trusted as an update: a device with trusted keys refuses an unsigned job record or an unsigned
bundle. The signature (`record_signature`, as on desired records) covers every field, `bench`
included. Strict parsing: a RecordError names the field, with the job_id when it could be read."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from edgebundle.jsonsafe import JsonError, loads
from edgebundle.trust import parse_time
from edgeproto.desired import (_TARGET, MAX_JSON_DEPTH, SIG_FIELD, Desired, Limits, MqttTransfer, RecordError,
                               UrlTransfer, _int, _section, _text, bundle_fields)

SCHEMA = "edgepack.profile-job/1"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BENCH_SECONDS = 120.0  # the timed part of one job; the agent caps it again ([profile] settings)


@dataclass(frozen=True)
class BenchSettings:
    """How the device times the bundle. `threads` None: the bundle's own runtime setting."""

    threads: int | None = None
    runs: int = 200
    warmup: int = 10
    max_seconds: float = 20.0  # timed runs stop after this long (at least 5 runs)

    def to_dict(self) -> dict:
        return {"threads": self.threads, "runs": self.runs, "warmup": self.warmup, "max_seconds": self.max_seconds}


@dataclass(frozen=True)
class ProfileJob:
    job_id: str
    name: str
    version: str
    sha256: str
    size: int
    transfer: MqttTransfer | UrlTransfer
    target: str  # "devices/{id}"
    issued: str | None = None
    bench: BenchSettings = field(default_factory=BenchSettings)
    signature: dict | None = None

    def as_transfer(self) -> Desired:
        """The fetchers take a Desired (they read sha256, size and transfer from it)."""
        return Desired(update_id=self.job_id, name=self.name, version=self.version, sha256=self.sha256,
                       size=self.size, transfer=self.transfer, issued=self.issued, target=self.target)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "job_id": self.job_id, "target": self.target, "issued": self.issued,
                "name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size,
                "transfer": self.transfer.to_dict(), "bench": self.bench.to_dict()}

    @classmethod
    def parse(cls, payload: bytes, *, source: str, limits: Limits = Limits(),
              topic_prefix: str | None = None) -> "ProfileJob":
        if len(payload) > limits.max_record_bytes:
            raise RecordError(f"profile job on {source} is {len(payload)} bytes; at most {limits.max_record_bytes} "
                              "are accepted")
        try:
            doc = loads(payload, max_depth=MAX_JSON_DEPTH)
        except JsonError as e:
            raise RecordError(f"profile job on {source} is not valid JSON: {e}") from None
        jid = doc.get("job_id") if isinstance(doc, dict) else None
        jid = jid if isinstance(jid, str) and _JOB_ID.match(jid) else None
        try:
            return cls._from_dict(doc, source=source, limits=limits, topic_prefix=topic_prefix)
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise RecordError(f"malformed profile job on {source}: {msg}", update_id=jid,
                              hint="send profile jobs with `edgepack profile`") from None

    @classmethod
    def _from_dict(cls, d, *, source: str, limits: Limits, topic_prefix: str | None) -> "ProfileJob":
        if not isinstance(d, dict):
            raise ValueError("a profile job is a JSON object")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA!r}")
        jid = _text(d, "job_id", _JOB_ID, "1-64 letters, digits, '.', '_' or '-'")
        name, version, sha, size, transfer = bundle_fields(d, limits=limits, topic_prefix=topic_prefix)
        target = d.get("target")
        if not isinstance(target, str) or not _TARGET.match(target) or not target.startswith("devices/"):
            raise ValueError("target must be 'devices/ID'")
        issued = d.get("issued")
        if issued is not None:
            parse_time(issued, what="issued")
        b = _section(d, "bench", ("threads", "runs", "warmup", "max_seconds"))
        threads = b.get("threads")
        if threads is not None:
            threads = _int(b, "threads", 1, 256, what="bench.threads")
        secs = b.get("max_seconds", BenchSettings.max_seconds)
        if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not math.isfinite(secs) \
                or not 0 < secs <= MAX_BENCH_SECONDS:
            raise ValueError(f"bench.max_seconds must be a number in (0, {MAX_BENCH_SECONDS:g}], not {secs!r:.40}")
        bench = BenchSettings(threads=threads, runs=_int(b, "runs", 5, 100_000, default=BenchSettings.runs,
                                                         what="bench.runs"),
                              warmup=_int(b, "warmup", 0, 1000, default=BenchSettings.warmup, what="bench.warmup"),
                              max_seconds=float(secs))
        sig = d.get(SIG_FIELD)
        if sig is not None and not isinstance(sig, dict):
            raise ValueError(f"{SIG_FIELD} must be an object")
        return cls(job_id=jid, name=name, version=version, sha256=sha, size=size, transfer=transfer, target=target,
                   issued=issued, bench=bench, signature=sig)


__all__ = ["SCHEMA", "BenchSettings", "ProfileJob", "MAX_BENCH_SECONDS"]
