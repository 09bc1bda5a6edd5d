"""The agent process: model + local v2 API + MQTT status/telemetry with an offline buffer."""
from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path

from device_agent import __version__
from device_agent.buffer import DiskQueue, QueueUnwritable
from device_agent.config import AgentConfig
from device_agent.lifecycle import READY_STATES, AgentState, Lifecycle
from device_agent.model import Model
from device_agent.proc import trim_memory
from device_agent.repository import AgentRepository
from device_agent.routing import Desires, Route
from device_agent.slot import (MB, OTHERS, Memory, MemoryRefused, ModelSlot, cpu_share, discover, primary_name,
                               slot_name)
from device_agent.capture import CapturePolicy, Capturer
from device_agent.profile import ProfilePolicy, Profiler, parse_delays
from device_agent.ota.gate import RecordGate, SourcePolicy
from device_agent.ota.keyring import Keyring
from device_agent.ota.transfer import MqttChunkFetcher, TransferPolicy
from device_agent.ota.record import LIVE, RESUMABLE
from device_agent.ota.updater import Updater, UpdaterSettings, parse_fault_delays
from device_agent.stats import HostMetrics, InferenceStats, platform_info
from edgebundle.archive import open_bundle
from edgebundle.errors import BundleError, EdgepackError, InputError
from edgebundle.signing import load_public_key
from edgeproto.desired import Limits, RecordError, Removal
from edgeproto.documents import (AgentStatus, AgentTelemetry, StatusDocument, TelemetryDocument, Totals, last_will,
                                 now_iso)
from edgeproto.mqtt import MqttClient, MqttError, Will, dumps
from edgeproto.topics import ROOT, DeviceTopics, model_of

log = logging.getLogger("edgepack.agent")


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.stats = InferenceStats()
        self.metrics = HostMetrics(str(cfg.data_dir))
        self.slots: list[ModelSlot] = []  # the first one keeps the data directory's top level
        self.started = now_iso()
        self.topics = DeviceTopics(cfg.broker.topic_prefix if cfg.broker else ROOT, cfg.device_id)
        # a data directory that never held anything: a damaged configured bundle stops the agent (exit 5)
        # and what this start wrote there goes again; one with history keeps serving what it can
        self._fresh = not cfg.data_dir.exists() or not any(cfg.data_dir.iterdir())
        self._made_data_dir = not cfg.data_dir.exists()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
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
        self.profiler: Profiler | None = None
        self.capture_policy = CapturePolicy(rate=cfg.capture_rate, per_minute=cfg.capture_per_minute,
                                            max_bytes=cfg.capture_max_mb << 20)
        self.capturer: Capturer | None = None
        self._buffer_reported = None
        self._slots_lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._drainer: threading.Thread | None = None
        self._group_topics = {self.topics.group_desired(g) for g in cfg.groups}
        self.desires = Desires(self.topics, cfg.groups)
        self._routes = self._topic_routes()
        self.api = None
        self.life = Lifecycle(on_change=self.status_changed, healthy=self.healthy)

    # ---- the models ----
    @property
    def model(self) -> Model | None:
        """The first model (what a one-model agent serves)."""
        return self.slots[0].model if self.slots else None

    @property
    def model_error(self) -> str | None:
        return self.slots[0].model_error if self.slots else "no bundle: pass --bundle or push one"

    @property
    def updater(self) -> Updater | None:
        return self.slots[0].updater if self.slots else None

    @property
    def store(self):
        return self.slots[0].store if self.slots else None

    def slot(self, name: str, *, exact: bool = False) -> ModelSlot | None:
        """The slot named `name`, else (not `exact`: the API) the one whose model carries that name
        (a one-model device whose update renamed its model keeps answering to both)."""
        with self._slots_lock:
            return next((s for s in self.slots if s.name == name), None) or (None if exact else next(
                (s for s in self.slots if s.model is not None and s.model.name == name), None))

    def _first(self) -> ModelSlot | None:
        """The model at the data directory's top level (old-style records address it)."""
        return next((s for s in self.slots if s.primary), None)

    def _plan_slots(self) -> None:
        """The slots: the first model at the data directory's top level (named by active.json, its
        active bundle, its update in progress, or the first configured bundle), then every model
        under models.d/, then configured bundles no slot holds yet."""
        cfg = self.cfg
        configured = []  # (name, bundle, threads)
        for m in cfg.models:
            name = slot_name(open_bundle(m.bundle).manifest.name)
            if any(name == c[0] for c in configured):
                raise InputError(f"two configured bundles are both named {name!r} ({m.bundle})",
                                 hint="each model on a device needs its own name: build with --name")
            configured.append((name, m.bundle, m.threads))
        name, recorded = primary_name(cfg.data_dir)
        primary = ModelSlot(self, name, cfg.data_dir, threads=None)
        slots = [primary] + [ModelSlot(self, p.name, p, threads=None) for p in discover(cfg.data_dir)]
        if name and not recorded and len(slots) == 1 and len(configured) == 1:
            # a one-model agent's directory (no name recorded yet): its one bundle is this model,
            # even when an update renamed the model since
            configured[0] = (name, *configured[0][1:])
        for name, bundle, threads in configured:
            s = next((x for x in slots if x.name == name), None)
            if s is None and primary.name is None:
                s, primary.name = primary, name
            if s is None:
                s = ModelSlot(self, name, cfg.data_dir / OTHERS / name, threads=None)
                slots.append(s)
            s.initial, s.threads = bundle, threads
        if primary.name is None and len(slots) > 1:  # an emptied first slot: nothing to serve there
            slots.remove(primary)
        for s in slots:
            s.threads = s.threads or cfg.threads or (cpu_share(len(slots)) if len(slots) > 1 else None)
        self.slots = slots

    def _new_slot(self, name: str, *, top: bool) -> ModelSlot:
        """A model a record adds at run time: at the top level (`top`: old-style records, or a device
        with no model at all), else in its own folder."""
        with self._slots_lock:
            root = self.cfg.data_dir if top else self.cfg.data_dir / OTHERS / name
            s = ModelSlot(self, name, root, threads=self.cfg.threads or (
                cpu_share(len(self.slots) + 1) if self.slots else None))
            s.start_updater(self._updater_settings(), self._fetcher())
            self.slots.append(s)
        s.updater.start()
        log.info("added model %s (threads %s)", name, s.threads)
        return s

    def remove(self, s: ModelSlot, update_id: str) -> None:
        """A signed removal: the model leaves the API now; stopping its update, closing it and
        deleting its files happen on a thread of their own (never on the MQTT thread), then the
        `removed` event."""
        with self._slots_lock:
            if s not in self.slots:
                return
            self.slots.remove(s)
            s.removed = True
        threading.Thread(target=self._dispose, args=(s, update_id), name=f"remove-{s.name}", daemon=True).start()

    def _dispose(self, s: ModelSlot, update_id: str) -> None:
        version = s.model.version if s.model else None
        try:
            s.remove()
        except Exception:  # the files may stay; the model is gone from the API and the status
            log.exception("removing model %s", s.name)
        self.stats.forget(s.name)
        self.event({"update_id": update_id, "state": "removed", "model": s.name, "version": version})
        self.models_changed()

    def models_changed(self) -> None:
        if self.life.state in (AgentState.SERVING, AgentState.NO_MODEL):
            ok = any(s.model for s in self.slots)
            self.life.set(AgentState.SERVING if ok else AgentState.NO_MODEL, None if ok else self.model_error)
        self.status_changed()

    def ready(self) -> bool:
        """Every model the device is meant to serve serves: each configured one and each with an
        active bundle (one unloaded on purpose, or whose first install failed, does not count), and
        the start is over (the models load before the updaters start: not ready in between)."""
        if self.life.state not in READY_STATES:
            return False
        with self._slots_lock:
            meant = [s for s in self.slots if s.meant]
            return all(s.model is not None for s in meant) if meant else any(s.model for s in self.slots)

    # ---- the slots' host interface (device_agent.slot.SlotHost) ----
    @property
    def data_dir(self) -> Path:
        return self.cfg.data_dir

    def admit(self, name: str | None, need: Memory) -> None:
        """Refuse a model that would not fit before it loads (MemoryRefused names the figures):
        MemAvailable less a reserve, and the configured budget less what the loaded models need
        (the slot's own old model included: it keeps serving until the new one commits)."""
        avail = self.metrics.memory()["available_bytes"]
        reserve, budget = self.cfg.memory_reserve_mb * MB, self.cfg.memory_budget_mb * MB
        with self._slots_lock:
            held = [m for s in self.slots for m in (s.model, *(s.updater.held() if s.updater else ())) if m is not None]
        taken = sum(m.memory.need_bytes for m in held if getattr(m, "memory", None))
        why = []
        if avail is not None and need.need_bytes > avail - reserve:
            why.append(f"the {max(avail - reserve, 0) / MB:.0f} MB available (MemAvailable {avail / MB:.0f} MB "
                       f"less a {reserve / MB:.0f} MB reserve)")
        if budget and taken + need.need_bytes > budget:
            why.append(f"the {(budget - taken) / MB:.0f} MB left of the {budget / MB:.0f} MB memory budget "
                       f"({taken / MB:.0f} MB taken by the models loaded)")
        if why:
            raise MemoryRefused(f"model {name} needs about {need.need_bytes / MB:.0f} MB ({need.source}), "
                                f"more than {' and '.join(why)}",
                                hint="free memory, remove or unload a model, or raise memory_budget_mb")

    def yield_to_traffic(self):
        """While a model stages, each warm-up or golden run first waits (up to 0.25 s) for the
        requests running on the device's models: an update never starves live traffic."""
        def pause() -> None:
            deadline = time.monotonic() + 0.25
            while time.monotonic() < deadline and any(s.model is not None and s.model.in_flight
                                                      for s in list(self.slots)):
                time.sleep(0.002)
        return pause

    def rss_bytes(self) -> int | None:
        return self.metrics.rss_bytes()

    def building(self, why: str):
        """The agent's state while a model's first load builds (minutes: systemd is told it lives)."""
        return self.life.slow_phase(AgentState.BUILDING, why)

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

    def busiest_model(self) -> Model | None:
        """The model a profile job yields to: the one with the most requests in flight now."""
        models = [s.model for s in self.slots if s.model is not None]
        return max(models, key=lambda m: m.in_flight, default=None)

    def updating(self) -> bool:
        return any(s.updater is not None and s.updater.record.state in RESUMABLE + LIVE for s in self.slots)

    now = staticmethod(now_iso)

    # ---- the capturer's host interface (device_agent.capture.Host) ----
    @property
    def root(self) -> str:
        return self.topics.prefix

    def ring(self, model: str | None):
        """(name, capture ring) of `model`, or of the first model; (None, None): no such model."""
        s = self.slot(model) if model else self._first()
        return (s.name, s.ring) if s is not None and s.name else (None, None)

    def status_changed(self) -> None:
        if self.mqtt and self.mqtt.connected.is_set():
            self.mqtt.publish(self.topics.status, dumps(self.status()), qos=1, retain=True)

    # ---- MQTT ----
    def status(self, online: bool = True, reason: str | None = None) -> dict:
        agent = AgentStatus(state=self.life.describe(), started=self.started, buffer=self.queue.health(),
                            profile=self.profiler.summary() if self.profiler else None, platform=platform_info(),
                            api={"host": self.cfg.api_host, "port": self.cfg.api_port})
        slots = list(self.slots)
        first = slots[0] if slots else None
        return StatusDocument(
            device_id=self.cfg.device_id, online=online, reason=reason, ts=now_iso(), groups=tuple(self.cfg.groups),
            agent_version=__version__, model=first.model.describe() if first and first.model else None,
            model_error=self.model_error, update=first.updater.summary() if first and first.updater else None,
            ota={**self.keyring.describe(), "allowed_urls": list(self.cfg.allowed_urls)}, agent=agent,
            models={s.name: s.entry() for s in slots if s.name}).to_dict()

    def _subscriptions(self) -> list[str]:
        t = self.topics
        groups = [x for g in self.cfg.groups for x in (t.group_desired(g), t.group_model_desired(g))]
        return [t.desired, t.model_desired(), t.profile_job, t.capture_request, *groups]

    def _on_connect(self) -> None:
        self.mqtt.publish(self.topics.status, dumps(self.status()), qos=1, retain=True)
        for topic in self._subscriptions():
            self.mqtt.subscribe(topic, qos=1)
        self._wake.set()

    def _topic_routes(self) -> tuple[Route, ...]:
        """Who takes a message, in order (the first route whose topic matches): records, profile
        jobs, capture requests; every other topic may carry chunks a transfer asked for."""
        t = self.topics
        return (Route(self._record_topic, self._on_record),
                Route(lambda topic: topic == t.profile_job, self._on_profile_job),
                Route(lambda topic: topic == t.capture_request, self._on_capture_request),
                Route(lambda topic: True, self._on_chunks))

    def _on_message(self, topic: str, payload: bytes) -> None:
        next(r for r in self._routes if r.matches(topic)).handle(topic, payload)

    def _record_topic(self, topic: str) -> bool:
        """A desired record's topic: the device's own, its groups', or a model's on either."""
        t = self.topics
        if topic == t.desired or topic in self._group_topics:
            return True
        return model_of(topic) is not None and (topic.startswith(f"{t.prefix}/devices/{self.cfg.device_id}/models/")
                                                or any(topic.startswith(f"{t.prefix}/groups/{g}/models/")
                                                       for g in self.cfg.groups))

    def _on_record(self, topic: str, payload: bytes) -> None:
        model = model_of(topic)
        try:
            d = self.gate.accept(payload, topic)
        except RecordError as e:  # refused: say why, keep acting on what was accepted before
            log.error("%s", e)
            self.event({"update_id": e.update_id, "state": "failed", "model": model,
                        "error": str(e).split("\n")[0]})
            return
        self._give_record(topic, model, d)

    def _on_profile_job(self, topic: str, payload: bytes) -> None:
        if self.profiler:
            self.profiler.on_job(payload, topic)

    def _on_capture_request(self, topic: str, payload: bytes) -> None:
        if self.capturer:
            self.capturer.on_request(payload, topic)

    def _on_chunks(self, topic: str, payload: bytes) -> None:
        """A profile job and updates may fetch the same bundle; each takes what it asked for."""
        if self.profiler:
            self.profiler.on_message(topic, payload)
        for s in list(self.slots):
            if s.updater:
                s.updater.on_message(topic, payload)

    def _give_record(self, topic: str, model: str | None, d) -> None:
        """Give an accepted record to the model it addresses (routing.Desires says which record each
        model follows). A record for a model the device lacks installs it; a removal never does."""
        if model is None and isinstance(d, Removal):
            self.event({"update_id": d.update_id, "state": "failed", "error": "refused: a removal names a model: "
                        f"publish it on {self.topics.model_desired('NAME')}"})
            return
        with self._slots_lock:
            self.desires.put(topic, model, d)
            if model is None:
                s = self._first()
                chosen, came = self.desires.source(s.name if s else None, first=True)
                name = s.name if s else getattr(chosen, "name", None)
                if chosen is not d and d is not None and model_of(came or "") is not None:
                    self.event({"update_id": d.update_id, "state": "failed", "model": name,
                                "error": f"not applied: model {name} follows its own record on {came} "
                                         f"(update {getattr(chosen, 'update_id', None)}); publish on that topic "
                                         "(edgepack push without --device-topic)"})
                    return
            else:
                s, name = self.slot(model, exact=True), model
                first = self._first()
                if s is None and first is not None and first.name is None and not first.holds_anything():
                    s, first.name = first, model  # a device with no model yet: its first model, top level
                chosen = self.desires.winner(model, first=bool(s and s.primary))
            if s is None:
                if chosen is None or isinstance(chosen, Removal):
                    return
                try:
                    name = slot_name(name)
                    if model is None and self.slot(name, exact=True) is not None:
                        raise EdgepackError(f"model {name} is served from {OTHERS}/{name}: address it on its "
                                            f"model topic ({self.topics.model_desired(name)})")
                    s = self._new_slot(name, top=model is None or not self.slots)
                except EdgepackError as e:
                    self.event({"update_id": chosen.update_id, "state": "failed", "model": model,
                                "error": str(e).split("\n")[0]})
                    return
        if isinstance(chosen, Removal):
            if s.holds_anything():
                self.remove(s, chosen.update_id)
        elif s.updater:
            s.updater.set_desired(chosen)

    def _mqtt_client(self) -> MqttClient | None:
        """The broker session, built but not connected (its chunk fetchers go to the updaters first)."""
        if not self.cfg.broker:
            return None
        will = Will(self.topics.status, dumps(last_will(self.cfg.device_id)))
        return MqttClient(self.cfg.broker, client_id=f"edgepack-agent-{self.cfg.device_id}", will=will,
                          on_connect=self._on_connect, on_message=self._on_message)

    def _fetcher(self):
        return MqttChunkFetcher(self.mqtt, policy=self.transfer_policy) if self.mqtt else None

    def _updater_settings(self) -> UpdaterSettings:
        return UpdaterSettings(max_attempts=self.cfg.max_attempts, transfer=self.transfer_policy,
                               fault_delays=parse_fault_delays(self.cfg.fault_delay))

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
            totals=Totals(count=st.total, errors=st.total_errors, nonfinite=st.total_nonfinite,
                          rejected=st.totals()["rejected"]),
            system=self.metrics.snapshot(), model_name=model.name if model else None,
            model_version=model.version if model else None,
            agent=AgentTelemetry(buffer=self.queue.health(),
                                 profile=self.profiler.summary() if self.profiler else None),
            models={s.name: s.telemetry(st) for s in list(self.slots) if s.name}).to_dict()

    def emit_telemetry(self) -> None:
        """Every record goes through the disk queue, so order holds across outages and restarts.
        A full disk drops the sample and counts it (the status says so); the agent keeps going."""
        try:
            dropped = self.queue.push(self.topics.telemetry, lambda seq: dumps(self.telemetry(seq)))
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
        self._plan_slots()
        for slot in self.slots:  # a configured bundle about to become active is checked whole first
            if self._fresh and slot.initial is not None and slot.store.active() is None:
                slot.check_initial()  # else load_initial checks it and, damaged, serves nothing (model_error)
        self.mqtt = self._mqtt_client()
        for slot in self.slots:
            slot.start_updater(self._updater_settings(), self._fetcher())
        if cfg.broker and not self.keyring.enabled:
            log.warning("no trusted keys (--trusted-key / --root-key): anyone who can publish to the broker "
                        "can install any bundle on this device; configure keys in production")
        self.start_mqtt()
        self.profiler = Profiler(self, workdir=cfg.data_dir / "profile", result_topic=self.topics.profile_result,
                                 topic_prefix=self.topics.prefix, limits=self.gate.limits,
                                 transfer=self.transfer_policy,
                                 policy=ProfilePolicy(diagnostic_delay_ms=parse_delays(cfg.profile_diagnostic_delay)))
        self.capturer = Capturer(self, workdir=cfg.data_dir / "capture-out", result_topic=self.topics.capture_result,
                                 policy=self.capture_policy, limits=self.gate.limits)
        self.api = ApiServer(AgentRepository(self), stats=self.stats, host=cfg.api_host, port=cfg.api_port,
                             token=cfg.api_token, max_body_bytes=cfg.max_body_bytes,
                             limits=ConnectionLimits(max_connections=cfg.api_max_connections,
                                                     idle_timeout_s=cfg.api_idle_timeout,
                                                     request_timeout_s=cfg.api_request_timeout),
                             views=Views(metrics=lambda: render_metrics(self), status=self.status,
                                         state=lambda: self.life.state.value))
        self.api.start()
        log.info("serving KServe v2 API", extra={"fields": {"host": self.cfg.api_host, "port": self.api.port}})
        self.life.set(AgentState.LOADING, ", ".join(s.name or "model" for s in self.slots) or None)
        for slot in list(self.slots):
            if not slot.removed:  # a retained removal may have come first
                slot.load_initial()
        trim_memory()  # verification and extraction buffers
        for slot in list(self.slots):
            slot.updater.start()
        # READY=1 for systemd: the models serve (or the agent knowingly serves none, waiting for an update)
        ok = any(s.model for s in self.slots)
        self.life.set(AgentState.SERVING if ok else AgentState.NO_MODEL, None if ok else self.model_error)
        self.life.start_watchdog()

    def healthy(self) -> bool:
        """For the systemd watchdog: the API and update threads are alive."""
        return (self.api is None or self.api.alive()) and all(s.updater.alive() for s in self.slots if s.updater)

    def run(self, *, ready: threading.Event | None = None) -> None:
        """start(), then emit telemetry every interval until SIGTERM/SIGINT or request_stop()."""
        try:
            self.start()
        except BundleError:  # a damaged or unsigned configured bundle: nothing started, nothing kept
            self.queue.close()
            if self._made_data_dir:
                shutil.rmtree(self.cfg.data_dir, ignore_errors=True)
            elif self._fresh:  # it was empty before this start: empty it again
                for p in self.cfg.data_dir.iterdir():
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            raise
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
        for slot in list(self.slots):
            if slot.updater:
                slot.updater.stop()
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
        for slot in list(self.slots):
            if slot.model:
                slot.model.close()
            if slot.ring:
                slot.ring.close()
        self.queue.close()
