"""The agent process: model + local v2 API + MQTT status/telemetry with an offline buffer."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from device_agent import __version__
from device_agent.buffer import DiskQueue, QueueUnwritable
from device_agent.config import AgentConfig
from device_agent.lifecycle import AgentState, Lifecycle
from device_agent.model import Model, bundle_members_to_extract, load_bundle
from device_agent.profile import ProfilePolicy, Profiler, parse_delays
from device_agent.ota.gate import RecordGate, SourcePolicy
from device_agent.ota.keyring import Keyring
from device_agent.ota.transfer import MqttChunkFetcher, TransferPolicy
from device_agent.ota.record import LIVE, RESUMABLE
from device_agent.ota.updater import Updater, UpdaterSettings, parse_fault_delays
from edgeruntime.registry import slow_load
from device_agent.stats import HostMetrics, InferenceStats, platform_info
from device_agent.store import Store
from edgebundle.errors import EdgepackError
from edgebundle.signing import load_public_key
from edgeproto.desired import Desired, Limits, RecordError, resolve
from edgeproto.documents import (AgentStatus, AgentTelemetry, StatusDocument, TelemetryDocument, Totals, last_will,
                                 now_iso)
from edgeproto.mqtt import MqttClient, MqttError, Will, dumps
from edgeproto.topics import ROOT, DeviceTopics

log = logging.getLogger("edgepack.agent")


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.store = Store(cfg.data_dir)
        self.stats = InferenceStats()
        self.metrics = HostMetrics(str(cfg.data_dir))
        self.model: Model | None = None
        self.model_error: str | None = None
        self.started = now_iso()
        self.topics = DeviceTopics(cfg.broker.topic_prefix if cfg.broker else ROOT, cfg.device_id)
        self.queue = DiskQueue(cfg.data_dir / "telemetry.sqlite", max_messages=cfg.buffer_max_messages,
                               max_bytes=cfg.buffer_max_bytes)
        self.mqtt: MqttClient | None = None
        self.keyring = Keyring(direct=[load_public_key(p) for p in cfg.trusted_keys],
                               roots=[load_public_key(p) for p in cfg.root_keys],
                               state_path=cfg.data_dir / "trust.json")
        self.transfer_policy = TransferPolicy(allowed_urls=cfg.allowed_urls, min_rate=cfg.min_transfer_rate,
                                              grace_s=cfg.transfer_grace_s)
        self.gate = RecordGate(keyring=self.keyring, limits=Limits(max_record_bytes=cfg.max_record_bytes,
                                                                   max_bundle_bytes=cfg.max_bundle_bytes,
                                                                   max_chunks=cfg.max_chunks),
                               topic_prefix=self.topics.prefix, sources=SourcePolicy(allowed_urls=cfg.allowed_urls),
                               state_path=cfg.data_dir / "records.json")
        self.updater: Updater | None = None
        self.profiler: Profiler | None = None
        self._buffer_reported = None
        self._desired: dict[str, Desired | None] = {}
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._drainer: threading.Thread | None = None
        self._group_topics = {self.topics.group_desired(g) for g in cfg.groups}
        self.api = None
        self.life = Lifecycle(on_change=self.status_changed, healthy=self.healthy)

    # ---- model ----
    def load_initial(self) -> None:
        """Active bundle from the data directory, else the configured initial bundle."""
        path = self.store.active()
        try:
            if path is None and self.cfg.bundle is not None:
                path, digest = self.store.add(self.cfg.bundle)
                self.store.activate(path, digest)
            if path is None:
                self.model_error = "no bundle: pass --bundle or push one"
                log.warning(self.model_error)
                return
            t0 = time.perf_counter()
            self.life.set(AgentState.LOADING, path.name)
            self.model = self.load(path, initial=True)
            trim_memory()  # verification and extraction buffers
            log.info("model ready", extra={"fields": {**self.model.describe(),
                                                      "load_ms": round((time.perf_counter() - t0) * 1000, 1)}})
        except (EdgepackError, OSError) as e:  # serving nothing, and saying why (status: model_error)
            self.model_error = str(e).split("\n")[0]
            log.error("cannot load bundle %s: %s", path, e)

    # ---- the updater's host interface (device_agent.ota.updater.Host) ----
    def verify(self, path: Path, *, sha256: str):
        """An update's one verification pass: the signature (keys of the current generation), then
        every member's hash, extracting the model files on the way. Returns the verified Bundle."""
        from edgebundle.archive import open_bundle

        b = open_bundle(path)
        if self.keyring.enabled:
            self.keyring.verify_bundle(b.manifest_bytes, b.signature)
        b.verify(extract_to=self.store.model_dir(sha256), extract=bundle_members_to_extract(b.manifest))
        return b

    def load(self, path: Path, *, verified=None, initial: bool = False) -> Model:
        """Load, warm up and golden-check a bundle. `verified` (from verify()) skips the hashing
        pass; otherwise the signature (any key this device ever accepted: the active or previous
        bundle) and every hash are checked here."""
        path = Path(path)
        bundle = verified
        if bundle is None:
            from edgebundle.archive import open_bundle

            bundle = open_bundle(path)
            if self.keyring.enabled:
                self.keyring.verify_bundle(bundle.manifest_bytes, bundle.signature, history=True)
        sha = self.store.sha256(path)  # known when the update just stored it: not hashed again
        # one engine cache folder per bundle: "no engine in it yet" then means a build is coming
        cache = str(self.store.cache_dir(sha))
        load = lambda: load_bundle(path, model_dir=self.store.model_dir(sha), cache_dir=cache,  # noqa: E731
                                   threads=self.cfg.threads, bundle=bundle, verified=verified is not None,
                                   sha256=sha)
        why = slow_load(bundle.manifest, cache_dir=cache)
        if why is None:
            return load()
        log.info("building %s: this can take minutes; the agent is working, not hung", why)
        if not initial:  # an update's staging: the old model keeps serving, the updater reports progress
            return load()
        with self.life.slow_phase(AgentState.BUILDING, why):
            return load()

    def active_model(self) -> Model | None:
        return self.model

    def swap(self, model: Model | None) -> Model | None:
        """One reference assignment: requests already holding the old model finish on it."""
        with self._swap_lock:
            old, self.model = self.model, model
            self.model_error = None if model else "no verified model to serve"
        if model is not None:
            log.info("serving %s %s", model.name, model.version, extra={"fields": model.describe()})
        if self.life.state in (AgentState.SERVING, AgentState.NO_MODEL):
            self.life.set(AgentState.SERVING if model else AgentState.NO_MODEL, None if model else self.model_error)
        self.status_changed()
        return old

    def event(self, doc: dict) -> None:
        """Update events share the telemetry queue: durable, ordered, delivered after outages. When
        the disk cannot take it, the event goes straight to the broker if connected (not durable)."""
        payload = dumps({"device_id": self.cfg.device_id, "ts": now_iso(), **doc})
        try:
            self.queue.push(self.topics.events, payload)
        except QueueUnwritable:
            self._report_buffer()
            if self.mqtt and self.mqtt.connected.is_set():
                try:
                    self.mqtt.publish(self.topics.events, payload, qos=1)
                except MqttError:
                    pass
        self._wake.set()

    # ---- the profiler's host interface (device_agent.profile.Host) ----
    @property
    def device_id(self) -> str:
        return self.cfg.device_id

    def updating(self) -> bool:
        return self.updater is not None and self.updater.record.state in RESUMABLE + LIVE

    now = staticmethod(now_iso)

    def status_changed(self) -> None:
        if self.mqtt and self.mqtt.connected.is_set():
            self.mqtt.publish(self.topics.status, dumps(self.status()), qos=1, retain=True)

    # ---- MQTT ----
    def status(self, online: bool = True, reason: str | None = None) -> dict:
        agent = AgentStatus(state=self.life.describe(), started=self.started, buffer=self.queue.health(),
                            profile=self.profiler.summary() if self.profiler else None, platform=platform_info(),
                            api={"host": self.cfg.api_host, "port": self.cfg.api_port})
        return StatusDocument(
            device_id=self.cfg.device_id, online=online, reason=reason, ts=now_iso(), groups=tuple(self.cfg.groups),
            agent_version=__version__, model=self.model.describe() if self.model else None,
            model_error=self.model_error, update=self.updater.summary() if self.updater else None,
            ota={**self.keyring.describe(), "allowed_urls": list(self.cfg.allowed_urls)}, agent=agent).to_dict()

    def _on_connect(self) -> None:
        self.mqtt.publish(self.topics.status, dumps(self.status()), qos=1, retain=True)
        for topic in [self.topics.desired, self.topics.profile_job] + [self.topics.group_desired(g)
                                                                       for g in self.cfg.groups]:
            self.mqtt.subscribe(topic, qos=1)
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.desired or topic in self._group_topics:
            try:
                d = self.gate.accept(payload, topic)
            except RecordError as e:  # refused: say why, keep acting on what was accepted before
                log.error("%s", e)
                self.event({"update_id": e.update_id, "state": "failed", "error": str(e).split("\n")[0]})
                return
            self._desired[topic] = d
            chosen = resolve(self._desired.get(self.topics.desired),
                             [self._desired.get(self.topics.group_desired(g)) for g in self.cfg.groups])
            if self.updater:
                self.updater.set_desired(chosen)
        elif topic == self.topics.profile_job:
            if self.profiler:
                self.profiler.on_job(payload, topic)
        else:  # chunks: a profile job and an update may fetch the same bundle; each takes what it asked for
            if self.profiler:
                self.profiler.on_message(topic, payload)
            if self.updater:
                self.updater.on_message(topic, payload)

    def _mqtt_client(self) -> MqttClient | None:
        """The broker session, built but not connected (its chunk fetcher goes to the updater first)."""
        if not self.cfg.broker:
            return None
        will = Will(self.topics.status, dumps(last_will(self.cfg.device_id)))
        return MqttClient(self.cfg.broker, client_id=f"edgepack-agent-{self.cfg.device_id}", will=will,
                          on_connect=self._on_connect, on_message=self._on_message)

    def start_mqtt(self) -> None:
        if self.mqtt is None:
            return
        self.mqtt.start()
        self._drainer = threading.Thread(target=self._drain, name="telemetry-drain", daemon=True)
        self._drainer.start()

    def telemetry(self, seq: int) -> dict:
        st, model = self.stats, self.model
        return TelemetryDocument(
            device_id=self.cfg.device_id, ts=now_iso(), seq=seq, inference=st.window(),
            totals=Totals(count=st.total, errors=st.total_errors, nonfinite=st.total_nonfinite),
            system=self.metrics.snapshot(), model_name=model.name if model else None,
            model_version=model.version if model else None,
            agent=AgentTelemetry(buffer=self.queue.health(),
                                 profile=self.profiler.summary() if self.profiler else None)).to_dict()

    def emit_telemetry(self) -> None:
        """Every record goes through the disk queue, so order holds across outages and restarts.
        A full disk drops the sample and counts it (the status says so); the agent keeps going."""
        try:
            dropped = self.queue.push(self.topics.telemetry, dumps(self.telemetry(self.queue.next_seq())))
            if dropped:
                log.warning("telemetry buffer full: dropped %d oldest message(s)", dropped)
        except QueueUnwritable:
            pass
        self._report_buffer()
        self._wake.set()

    def _report_buffer(self) -> None:
        """Publish the status when the buffer turns unwritable or writable again."""
        state = self.queue.healthy
        if state != self._buffer_reported:
            self._buffer_reported = state
            if not state or self.queue.write_errors:
                self.status_changed()

    def _drain(self) -> None:
        """Send queued telemetry oldest first; delete each only after the broker's PUBACK."""
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while self.mqtt and self.mqtt.connected.is_set() and not self._stop.is_set():
                batch = self.queue.peek(50)
                if not batch:
                    break
                for msg_id, topic, payload in batch:
                    if not self.queue.sending(msg_id):
                        continue  # dropped to stay within the bound after it was peeked (counted)
                    try:
                        sent = self.mqtt.publish_wait(topic, payload, qos=1, timeout=10)
                    finally:
                        self.queue.sending(None)
                    if not sent or not self.queue.delete(msg_id):
                        break
                else:
                    continue
                time.sleep(0.5)  # the link dropped mid-batch (or the disk is full): let it recover
                break

    # ---- run ----
    def start(self) -> None:
        """Connect to the broker in the background and serve the API, then load the model: while
        it loads (minutes when TensorRT builds engines) the retained status and /v2/health/ready
        say so instead of looking hung."""
        from device_agent.metrics import render_metrics
        from device_agent.server import ApiServer, ConnectionLimits, Views

        cfg = self.cfg
        self.mqtt = self._mqtt_client()
        fetcher = MqttChunkFetcher(self.mqtt, policy=self.transfer_policy) if self.mqtt else None
        self.updater = Updater(self, cfg.data_dir, fetcher=fetcher, settings=UpdaterSettings(
            max_attempts=cfg.max_attempts, transfer=self.transfer_policy,
            fault_delays=parse_fault_delays(cfg.fault_delay)))
        self.updater.recover()  # an update cut off mid-switch rolls back before anything loads
        if cfg.broker and not self.keyring.enabled:
            log.warning("no trusted keys (--trusted-key / --root-key): anyone who can publish to the broker "
                        "can install any bundle on this device; configure keys in production")
        self.start_mqtt()
        self.profiler = Profiler(self, workdir=cfg.data_dir / "profile", result_topic=self.topics.profile_result,
                                 topic_prefix=self.topics.prefix, limits=self.gate.limits,
                                 transfer=self.transfer_policy,
                                 policy=ProfilePolicy(diagnostic_delay_ms=parse_delays(cfg.profile_diagnostic_delay)))
        self.api = ApiServer(lambda: self.model, stats=self.stats, host=cfg.api_host, port=cfg.api_port,
                             token=cfg.api_token, max_body_bytes=cfg.max_body_bytes,
                             limits=ConnectionLimits(max_connections=cfg.api_max_connections,
                                                     idle_timeout_s=cfg.api_idle_timeout,
                                                     request_timeout_s=cfg.api_request_timeout),
                             views=Views(metrics=lambda: render_metrics(self), status=self.status,
                                         state=lambda: self.life.state.value))
        self.api.start()
        log.info("serving KServe v2 API", extra={"fields": {"host": self.cfg.api_host, "port": self.api.port}})
        self.load_initial()
        self.updater.start()
        # READY=1 for systemd: the model serves (or the agent knowingly serves none, waiting for an update)
        self.life.set(AgentState.SERVING if self.model else AgentState.NO_MODEL,
                      None if self.model else self.model_error)
        self.life.start_watchdog()

    def healthy(self) -> bool:
        """For the systemd watchdog: the API and update threads are alive."""
        threads = [self.api._thread if self.api else None, self.updater._thread if self.updater else None]
        return all(t is None or t.is_alive() for t in threads)

    def run(self, *, ready: threading.Event | None = None) -> None:
        """start(), then emit telemetry every interval until SIGTERM/SIGINT or request_stop()."""
        self.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        if ready:
            ready.set()
        try:
            while not self._stop.wait(self.cfg.telemetry_interval):
                self.emit_telemetry()
                trim_memory()
        finally:
            self.life.set(AgentState.STOPPING)
            self.api.stop()
            self.shutdown()
            self.life.close()

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        if self.updater:
            self.updater.stop()
        if self.profiler:
            self.profiler.stop()
        self._stop.set()
        self._wake.set()
        if self.mqtt:
            if self.mqtt.connected.is_set():
                self.mqtt.publish_wait(self.topics.status, dumps(self.status(online=False, reason="stopped")),
                                       qos=1, retain=True, timeout=3)
            self.mqtt.stop()
        if self._drainer:
            self._drainer.join(timeout=5)
        if self.model:
            self.model.close()
        self.queue.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
             "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        d.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger: msg key=value ...`: the same fields as the JSON lines, for people."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None) or {}
        if not fields:
            return line
        head, nl, tail = line.partition("\n")  # a traceback stays below the fields
        kv = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{head} {kv}{nl}{tail}"


def _text_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, separators=(",", ":"))
    return json.dumps(s) if (not s or any(c in s for c in " \"=\n")) and not s.startswith(("{", "[")) else s


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and keeps freed memory in
    it; on a 1-4 GB board that is RSS for nothing. Call before threads start. No-op elsewhere."""
    libc = _libc()
    if libc and hasattr(libc, "mallopt"):
        libc.mallopt(-8, n)  # M_ARENA_MAX


def trim_memory() -> None:
    """Hand freed heap back to the OS (after loading a model, and periodically)."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("edgepack")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False
