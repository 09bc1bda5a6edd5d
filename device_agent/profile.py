"""Profile jobs: measure a bundle on this device without ever serving it (`edgepack profile`).

    job on devices/{id}/profile/job
      -> checks (strict parse, meant for this device, signed when keys are configured, not a
         replay, no other job running, no update in progress)   else: refused
      -> downloading (the update's transfer: per-chunk and whole-file sha256; a content-defined
         one copies the chunks the device's bundles hold, as an update does)
      -> verifying (bundle signature when keys are configured; every member's hash)
      -> loading (a second runtime beside the serving model; load time, RSS delta)
      -> golden check (reported, not fatal) -> benchmarking -> done; the bundle is deleted
    Progress and the result go to devices/{id}/profile/result; the status record carries
    `profile` while a job runs.

Sharing the CPU with production traffic (the policy docs/mqtt-protocol.md states):
- before every warm-up and timed run the profiler waits while any production request is running
  or waiting on the serving model; pauses are not timed and are reported (`paused_s`), so a
  production request waits at most for one profile inference already under way;
- the timed part stops after the job's `max_seconds` (capped at `ProfilePolicy.max_seconds`), and
  the whole job (transfer, load, pauses included) is cut at `ProfilePolicy.deadline_s`: with at
  least 5 timed runs it reports what it has (`cut_short`), else it fails;
- one job at a time; a job is refused while an update is in progress and cancelled when one starts
  (the update has the device first).
The job's bundle is never written to the store, never activated, and removed when the job ends
(leftovers of a crash are removed at start-up)."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from device_agent.model import bundle_members_to_extract, load_bundle
from edgeruntime.timing import rss_bytes
from device_agent.ota.delta import ChunkSource, fetch_delta
from device_agent.ota.transfer import Cancelled, MqttChunkFetcher, TransferPolicy, fetch_url
from edgebundle.errors import EdgepackError, VerificationError
from edgeproto.desired import CdcTransfer, Limits, RecordError, UrlTransfer, url_allowed
from edgeproto.jobs import ProfileJob
from edgeproto.mqtt import MqttError, dumps
from edgeproto.records import JobState

log = logging.getLogger("edgepack.agent.profile")
MIN_RUNS = 5
MAX_SEEN = 256


@dataclass(frozen=True)
class ProfilePolicy:
    max_seconds: float = 60.0  # most timed seconds a job may ask for
    deadline_s: float = 600.0  # a whole job, transfer and pauses included
    poll_s: float = 0.002  # how often a paused profile looks at production traffic again
    # Diagnostics only: milliseconds added to each timed inference of bundles of a precision
    # ({"int8": 20.0}); emulates a device on which that precision is slow (tests, rehearsals).
    diagnostic_delay_ms: dict = field(default_factory=dict)


class Host(Protocol):
    device_id: str
    mqtt: object
    keyring: object
    store: ChunkSource | None  # the bundles held here, which a content-defined transfer copies from

    def busiest_model(self): ...  # the serving model with the most requests in flight (None: none)
    def updating(self) -> bool: ...
    def now(self) -> str: ...
    def status_changed(self) -> None: ...


class JobFailed(EdgepackError):
    pass


class Profiler:
    def __init__(self, host: Host, *, workdir: Path, result_topic: str, topic_prefix: str, limits: Limits,
                 transfer: TransferPolicy, policy: ProfilePolicy = ProfilePolicy()):
        self.host, self.workdir, self.result_topic = host, Path(workdir), result_topic
        self.prefix, self.limits, self.transfer, self.policy = topic_prefix, limits, transfer, policy
        self.fetcher = MqttChunkFetcher(host.mqtt, policy=transfer) if host.mqtt is not None else None
        self._lock = threading.Lock()
        self._running: dict | None = None  # the status view of the job in hand
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        shutil.rmtree(self.workdir, ignore_errors=True)  # a job cut off by a crash or restart

    # ---- called by the agent ----
    def summary(self) -> dict | None:
        with self._lock:
            return dict(self._running) if self._running else None

    def on_message(self, topic: str, payload: bytes) -> bool:
        return self.fetcher.on_message(topic, payload) if self.fetcher and self._running else False

    def on_job(self, payload: bytes, topic: str) -> None:
        """From the MQTT thread: check the job and start it, or publish why it is refused."""
        try:
            job = self._accept(payload, topic)
        except RecordError as e:
            log.error("%s", e)
            self._publish({"job_id": e.update_id, "state": JobState.REFUSED, "error": str(e).split("\n")[0]})
            return
        self._publish({"job_id": job.job_id, "state": JobState.ACCEPTED, "bundle": _bundle_view(job)})
        self._thread = threading.Thread(target=self._run, args=(job,), name="profile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    # ---- checks ----
    def _accept(self, payload: bytes, topic: str) -> ProfileJob:
        job = ProfileJob.parse(payload, source=topic, limits=self.limits, topic_prefix=self.prefix)

        def refuse(msg: str, hint: str | None = None) -> RecordError:
            return RecordError(f"refused profile job {job.job_id}: {msg}", update_id=job.job_id, hint=hint)

        if job.target != f"devices/{self.host.device_id}":
            raise refuse(f"it is meant for {job.target!r}, not this device")
        try:
            self.host.keyring.verify_job(payload, job.signature, job.issued, what="profile job (as trusted as an update)")
        except EdgepackError as e:
            raise refuse(str(e).split("\n")[0], hint=getattr(e, "hint", None)) from None
        if isinstance(job.transfer, UrlTransfer) and not url_allowed(job.transfer.url, self.transfer.allowed_urls):
            raise refuse(f"downloads from {job.transfer.url[:200]!r} are not allowed by this device "
                         "([ota] allowed_urls)")
        with self._lock:
            if job.job_id in self._seen:
                raise refuse("this job_id was already run (a replayed job?)")
            if self._running is not None:
                raise refuse(f"busy: profile job {self._running['job_id']} is running; send it again later")
            if self.host.updating():
                raise refuse("an update is in progress on this device; send the job again once it ends")
            self._seen[job.job_id] = None
            while len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
            self._running = {"state": JobState.RUNNING, "job_id": job.job_id, "name": job.name, "version": job.version,
                             "sha256": job.sha256, "phase": "downloading", "since": self.host.now()}
        self.host.status_changed()
        return job

    # ---- the job ----
    def _run(self, job: ProfileJob) -> None:
        work = self.workdir / job.job_id
        t_job = time.monotonic()
        deadline = t_job + self.policy.deadline_s
        doc = {"job_id": job.job_id, "bundle": _bundle_view(job)}
        try:
            work.mkdir(parents=True, exist_ok=True)
            stopping = lambda: self._stop.is_set() or self.host.updating()  # noqa: E731
            cancelled = lambda: stopping() or time.monotonic() > deadline  # noqa: E731
            self._phase(job, "downloading")
            path = self._fetch(job, work, cancelled)
            self._phase(job, "verifying")
            bundle = self._verify(job, path, work / "model")
            doc["bundle"] = dict(doc["bundle"], precision=bundle.manifest.precision, format=bundle.manifest.format,
                                 target=bundle.manifest.target.get("name"))
            self._phase(job, "loading")
            doc["figures"] = self._measure(job, path, bundle, work / "model", stopping, deadline)
            doc["state"] = JobState.DONE
        except Cancelled:
            why = ("the agent is stopping" if self._stop.is_set() else "an update started" if self.host.updating()
                   else f"the job ran past the device's limit of {self.policy.deadline_s:.0f} s")
            doc.update(state=JobState.CANCELLED, error=f"cancelled: {why}")
        except VerificationError as e:  # unsigned, untrusted signer, tampered member: as an update would be
            doc.update(state=JobState.REFUSED, error=f"verification failed: {str(e).splitlines()[0]}")
        except EdgepackError as e:
            doc.update(state=JobState.FAILED, error=str(e).split("\n")[0])
        except Exception as e:  # a model that crashes its runtime's Python side: report, keep serving
            log.exception("profile job %s failed", job.job_id)
            doc.update(state=JobState.FAILED, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            shutil.rmtree(work, ignore_errors=True)  # discarded: never kept, never activated
            with self._lock:
                self._running = None
            self.host.status_changed()
        doc["seconds"] = round(time.monotonic() - t_job, 3)
        (log.info if doc["state"] is JobState.DONE else log.warning)(
            "profile job %s %s%s", job.job_id, doc["state"], f": {doc['error']}" if doc.get("error") else "")
        self._publish(doc, wait=True)

    def _fetch(self, job: ProfileJob, work: Path, cancelled: Callable[[], bool]) -> Path:
        """The job's bundle in `work`, by whichever of the three transfers the job names."""
        ref, quiet = job.as_transfer(), lambda *_: None
        if isinstance(job.transfer, UrlTransfer):
            return fetch_url(ref, work, progress=quiet, cancelled=cancelled, policy=self.transfer)
        if self.fetcher is None:
            raise JobFailed("an MQTT transfer needs a broker connection")
        if isinstance(job.transfer, CdcTransfer):
            return fetch_delta(self.fetcher, ref, work, local=self.host.store, progress=quiet, cancelled=cancelled,
                               policy=self.transfer)
        return self.fetcher.fetch(ref, work, progress=quiet, cancelled=cancelled)

    def _verify(self, job: ProfileJob, path: Path, model_dir: Path):
        from edgebundle.archive import open_bundle

        b = open_bundle(path)
        if self.host.keyring.enabled:
            self.host.keyring.verify_bundle(b.manifest_bytes, b.signature)
        b.verify(extract_to=model_dir, extract=bundle_members_to_extract(b.manifest))
        why = job.mismatch(b.manifest, named_by="the job")
        if why:
            raise JobFailed(why)
        return b

    def _measure(self, job: ProfileJob, path: Path, bundle, model_dir: Path, stopping, deadline: float) -> dict:
        rss0, t0 = rss_bytes(), time.perf_counter()
        model = load_bundle(path, model_dir=model_dir, threads=job.bench.threads, bundle=bundle, verified=True,
                            check_golden=False, warmup=1, sha256=job.sha256)
        try:
            load_ms = (time.perf_counter() - t0) * 1000
            rss1 = rss_bytes()
            golden = model.check_golden()
            self._phase(job, "benchmarking")
            golden_in = model.golden_inputs()
            feeds = model.validate(golden_in[0]) if golden_in else model.runtime.sample_inputs()
            delay = float(self.policy.diagnostic_delay_ms.get(model.manifest.precision, 0.0)) / 1000
            stats = self._bench(lambda: model.runtime.run(feeds), job, delay, stopping, deadline)
            d = model.runtime.details
            return {**stats, "load_ms": round(load_ms, 3),
                    "rss_delta_bytes": rss1 - rss0 if rss0 is not None and rss1 is not None else None,
                    "rss_bytes": rss1, "golden": {k: golden.get(k) for k in ("ok", "checked", "max_excess_error",
                                                                              "atol", "note") if k in golden},
                    "golden_ok": bool(golden["ok"]), "runtime": d.get("runtime"), "runtime_version": d.get("version"),
                    "provider": d.get("provider") or d.get("delegate") or _first(d.get("providers")) or "cpu",
                    "threads": d.get("threads"), "notes": d.get("notes") or [],
                    **({"diagnostic_delay_ms": delay * 1000} if delay else {})}
        finally:
            model.close()

    def _bench(self, call: Callable[[], object], job: ProfileJob, delay: float, stopping, deadline: float) -> dict:
        b = job.bench
        budget = min(b.max_seconds, self.policy.max_seconds)
        paused = 0.0
        for _ in range(b.warmup):
            paused += self._yield(stopping, deadline)
            call()
        times: list[float] = []
        timed = 0.0
        cut = False
        while len(times) < b.runs:
            paused += self._yield(stopping, deadline)
            if time.monotonic() > deadline:
                if len(times) < MIN_RUNS:
                    raise JobFailed(f"production traffic left no room: {len(times)} timed run(s) within the "
                                    f"device's limit of {self.policy.deadline_s:.0f} s")
                cut = True
                break
            t0 = time.perf_counter()
            call()
            if delay:
                time.sleep(delay)
            dt = time.perf_counter() - t0
            times.append(dt)
            timed += dt
            if len(times) >= MIN_RUNS and timed > budget:
                break
        ms = np.asarray(times) * 1000
        pct = {f"p{q}": round(float(np.percentile(ms, q)), 4) for q in (25, 50, 75, 90, 95, 99)}
        return {"latency_ms": {**pct, "mean": round(float(ms.mean()), 4), "min": round(float(ms.min()), 4)},
                "throughput_ips": round(len(ms) / float(ms.sum()) * 1000, 3) if ms.sum() > 0 else None,
                "runs": len(times), "warmup": b.warmup, "timed_s": round(timed, 3), "paused_s": round(paused, 3),
                "cut_short": cut}

    def _yield(self, stopping, deadline: float) -> float:
        """Wait while production requests run or wait on the serving model (never past the job's
        deadline); returns seconds paused."""
        t0 = time.perf_counter()
        while time.monotonic() <= deadline:
            if stopping():
                raise Cancelled("profile job cancelled")
            model = self.host.busiest_model()
            if model is None or not model.in_flight:
                break
            time.sleep(self.policy.poll_s)
        return time.perf_counter() - t0

    # ---- reporting ----
    def _phase(self, job: ProfileJob, phase: str) -> None:
        with self._lock:
            if self._running is not None:
                self._running["phase"] = phase
        self._publish({"job_id": job.job_id, "state": JobState.RUNNING, "phase": phase})

    def _publish(self, doc: dict, *, wait: bool = False) -> None:
        mqtt = self.host.mqtt
        if mqtt is None:
            return
        payload = dumps({"device_id": self.host.device_id, "ts": self.host.now(), **doc})
        try:
            if wait:
                if not mqtt.publish_wait(self.result_topic, payload, qos=1, timeout=10):
                    log.warning("profile result %s not acknowledged by the broker", doc.get("job_id"))
            else:
                mqtt.publish(self.result_topic, payload, qos=1)
        except MqttError as e:  # offline: the fleet side times out and says so
            log.warning("cannot publish profile result: %s", e)


def _bundle_view(job: ProfileJob) -> dict:
    return {"name": job.name, "version": job.version, "sha256": job.sha256, "size": job.size}


def _first(items) -> str | None:
    return items[0] if isinstance(items, (list, tuple)) and items else None


def parse_delays(text: str) -> dict[str, float]:
    """'int8=20,fp16=5' -> {'int8': 20.0, 'fp16': 5.0} (milliseconds); ValueError naming the item."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        try:
            ms = float(v)
        except ValueError:
            ms = -1.0
        if not sep or not k.strip() or not 0 <= ms <= 10_000:
            raise ValueError(f"{item.strip()!r} is not PRECISION=MILLISECONDS (0-10000)")
        out[k.strip()] = ms
    return out


__all__ = ["Profiler", "ProfilePolicy", "parse_delays", "rss_bytes"]
