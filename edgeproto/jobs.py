"""The profile job record (`edgepack.profile-job/1`): `edgepack profile` asks one device to fetch a
bundle, load it beside the serving model, benchmark it and report, never activating it.

Published (not retained) on `{root}/devices/{id}/profile/job`. The bundle travels as for an update
(the same `transfer` section, chunks retained on `{root}/bundles/{sha256}/chunks/{i}`), and a job is
as trusted as an update: a device with trusted keys refuses an unsigned job record or an unsigned
bundle. The signature (`record_signature`, as on desired records) covers every field, `bench`
included. Strict parsing: a RecordError names the field, with the job_id when it could be read."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgeproto.bundleref import (TARGET, BundleRef, Limits, checked, integer, issued, load_record, parse_bundle_ref,
                                 record_id, section, signature)

SCHEMA = "edgepack.profile-job/1"
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
class ProfileJob(BundleRef):
    """Benchmark the bundle (BundleRef) on one device, beside the serving model."""

    job_id: str
    target: str  # "devices/{id}"
    issued: str | None = None
    bench: BenchSettings = field(default_factory=BenchSettings)
    signature: dict | None = None

    def as_transfer(self) -> BundleRef:
        """What the fetchers read (sha256, size and transfer): the job's bundle."""
        return self.bundle

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "job_id": self.job_id, "target": self.target, "issued": self.issued,
                "name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size,
                "transfer": self.transfer.to_dict(), "bench": self.bench.to_dict()}

    @classmethod
    def parse(cls, payload: bytes, *, source: str, limits: Limits = Limits(),
              topic_prefix: str | None = None) -> "ProfileJob":
        doc = load_record(payload, what="profile job", source=source, limits=limits)
        return checked(lambda d: cls._from_dict(d, limits=limits, topic_prefix=topic_prefix), doc, what="profile job",
                       source=source, id_key="job_id", hint="send profile jobs with `edgepack profile`")

    @classmethod
    def _from_dict(cls, d, *, limits: Limits, topic_prefix: str | None) -> "ProfileJob":
        jid = record_id(d, schema=SCHEMA, what="profile job", id_key="job_id")
        ref = parse_bundle_ref(d, limits=limits, topic_prefix=topic_prefix)
        target = d.get("target")
        if not isinstance(target, str) or not TARGET.match(target) or not target.startswith("devices/") \
                or "/models/" in target:
            raise ValueError("target must be 'devices/ID'")
        when = issued(d)
        bench = _bench(section(d, "bench", ("threads", "runs", "warmup", "max_seconds")))
        return cls(**vars(ref), job_id=jid, target=target, issued=when, bench=bench, signature=signature(d))


def _bench(b: dict) -> BenchSettings:
    threads = b.get("threads")
    if threads is not None:
        threads = integer(b, "threads", 1, 256, what="bench.threads")
    secs = b.get("max_seconds", BenchSettings.max_seconds)
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not math.isfinite(secs) \
            or not 0 < secs <= MAX_BENCH_SECONDS:
        raise ValueError(f"bench.max_seconds must be a number in (0, {MAX_BENCH_SECONDS:g}], not {secs!r:.40}")
    return BenchSettings(threads=threads, runs=integer(b, "runs", 5, 100_000, default=BenchSettings.runs,
                                                       what="bench.runs"),
                         warmup=integer(b, "warmup", 0, 1000, default=BenchSettings.warmup, what="bench.warmup"),
                         max_seconds=float(secs))


__all__ = ["SCHEMA", "BenchSettings", "ProfileJob", "MAX_BENCH_SECONDS"]
