"""One named model of the agent: its bundles, its update lifecycle and the model it serves.

Every model on a device lives in a slot with its own store (bundles, extracted files, engine caches,
active.json), its own updater (update.json, downloads, retry budget, probation, rollback) and its
own thread count. The first model keeps the data directory's top level, as a one-model agent laid it
out (nothing moves when an agent is upgraded); every other model lives in `models.d/NAME/`.

A slot is the updater's Host for its model (device_agent.ota.updater.Host). It asks the agent around
it, which holds what models share (keys, the MQTT session, the telemetry queue, the API, the memory
left), through `SlotHost` only: what a slot may ask, nothing more."""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from device_agent.capture import CapturePolicy, Ring
from device_agent.model import ADAPTER, Model, bundle_members_to_extract, load_bundle
from device_agent.ota.keyring import Keyring
from device_agent.ota.updater import Updater, UpdaterSettings
from device_agent.store import Store
from edgebundle.archive import open_bundle, sha256_file
from edgebundle.errors import BundleError, EdgepackError
from edgebundle.manifest import Manifest
from edgeproto.bundleref import MODEL_NAME
from edgeproto.documents import model_entry
from edgeruntime.registry import slow_load

log = logging.getLogger("edgepack.agent")
OTHERS = "models.d"  # every model but the first: DATA/models.d/NAME/
MB = 1 << 20


class MemoryRefused(EdgepackError):
    """A model would not fit in what the device has left: refused before it loads."""


@dataclass(frozen=True)
class Memory:
    """What a model needs: recorded in its manifest (measured at build time or by a profile job),
    else estimated from its files; and what it took when it loaded here (RSS growth)."""

    need_bytes: int
    source: str  # "manifest" or "estimate"
    loaded_bytes: int | None = None

    def to_dict(self) -> dict:
        return {"need_bytes": self.need_bytes, "source": self.source, "loaded_bytes": self.loaded_bytes}


def memory_need(manifest: Manifest, model_bytes: int) -> Memory:
    """The build's measurement (manifest runtime.memory_bytes: RSS growth when the clean timing
    process loaded and ran the model) with a quarter for the device's allocator and the agent's own
    buffers; else an estimate: a runtime holds the weights once, plus its arena and the interpreter
    (digits CNN and MiniLM on ORT and TFLite: RSS growth 1.3-2.1x the model files, +8-20 MB)."""
    recorded = manifest.runtime.extra.get("memory_bytes")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return Memory(need_bytes=int(recorded * 1.25) + 4 * MB, source="manifest")
    return Memory(need_bytes=int(model_bytes * 2.2) + 24 * MB, source="estimate")


def _damaged(path: Path) -> bool:
    """The stored bundle file itself no longer reads or verifies (a damaged disk)."""
    try:
        open_bundle(path).verify()
        return False
    except (BundleError, OSError):
        return True


def slot_name(name: str) -> str:
    """A bundle's name as the name of a model on the device (topics, URLs and folders use it)."""
    if not MODEL_NAME.match(name):
        raise EdgepackError(f"model name {name!r} cannot name a model on a device: 1-64 letters, digits, '.', "
                            "'_' or '-', starting with a letter or digit", hint="build the bundle with --name NAME")
    return name


class SlotHost(Protocol):
    """What a slot may ask of the agent around it (device_agent.service.Agent; tests pass a fake)."""

    data_dir: Path  # the first model's slot keeps its top level
    keyring: Keyring  # bundle signatures
    capture_policy: CapturePolicy  # each slot's ring of captured requests
    mqtt: object  # the broker session the updater's chunk fetcher rides (None: no broker)

    def admit(self, name: str | None, need: Memory) -> None: ...  # MemoryRefused: it would not fit
    def yield_to_traffic(self) -> Callable[[], None]: ...  # a staging's pause before each run
    def rss_bytes(self) -> int | None: ...  # the process's resident memory now
    def building(self, why: str) -> ContextManager: ...  # the agent's state while a first load builds
    def models_changed(self) -> None: ...  # a model began or stopped serving
    def event(self, doc: dict) -> None: ...  # an update event (durable, ordered)
    def status_changed(self) -> None: ...


class ModelSlot:
    def __init__(self, host: SlotHost, name: str | None, root: Path, *, threads: int | None,
                 initial: Path | None = None):
        self.host, self.name, self.root = host, name, Path(root)
        self.store = Store(root)
        self.threads = threads
        self.initial = initial  # the configured bundle, used while the slot holds no active one
        self._checked = False  # check_initial() passed
        self._active = self.store.active_slot() is not None  # active.json names a bundle (read on swaps only)
        self.model: Model | None = None
        self.model_error: str | None = None
        self.updater: Updater | None = None
        self.desired: dict = {}  # topic -> the record accepted there (Desired, Removal or None)
        self.unloaded = False  # the repository API unloaded it: not ready, files kept
        self.removed = False  # a removal took it off the agent (its files are being deleted)
        self.drift: dict | None = None  # the last telemetry window's drift scores (for /metrics)
        policy = host.capture_policy
        self.ring = Ring(self.root / "capture", policy) if policy.on else None  # captured requests (off by default)
        self._swap_lock = threading.Lock()

    @property
    def primary(self) -> bool:
        return self.root == self.host.data_dir

    # ---- start ----
    def start_updater(self, settings: UpdaterSettings, fetcher) -> None:
        self.updater = Updater(self, self.root, settings=settings, fetcher=fetcher)
        self.updater.recover()  # an update cut off mid-switch rolls back before anything loads

    def check_initial(self) -> None:
        """The configured bundle, checked whole (signature, every member's hash) before it may
        become active: BundleError, and nothing is copied in, when it is damaged or unsigned."""
        b = open_bundle(self.initial)
        if self.host.keyring.enabled:
            self.host.keyring.verify_bundle(b.manifest_bytes, b.signature, history=True)
        b.verify()
        self._checked = True

    def _activate_initial(self) -> Path:
        if not self._checked:
            self.check_initial()
        path, digest = self.store.add(self.initial)
        self.store.activate(path, digest)
        return path

    def load_initial(self) -> None:
        """The active bundle of this slot, else its configured initial bundle (verified first: the
        agent checks it in start() and exits 5 when it is damaged). An active bundle that no longer
        loads (a damaged disk) gives way to a configured bundle that verifies."""
        path = self.store.active()
        try:
            if path is None and self.initial is not None:
                path = self._activate_initial()
            if path is None:
                self.model_error = "no bundle: pass --bundle or push one"
                log.warning("%s: %s", self.name or "model", self.model_error)
                return
            t0 = time.perf_counter()
            try:
                model = self.load(path, initial=True)
            except BundleError as e:
                if self.initial is None or not _damaged(path) or self.store.sha256(path) == sha256_file(self.initial):
                    raise  # a model that fails its golden check on this device is no reason to go back
                log.warning("%s: the active bundle %s cannot be loaded (%s); the configured bundle %s replaces it",
                            self.name or "model", path.name, str(e).splitlines()[0], self.initial)
                path = self._activate_initial()
                model = self.load(path, initial=True)
            if self.removed:  # removed while it loaded: never served
                model.close()
                return
            model.capture = self.ring.offer if self.ring else None
            self.model = model
            self.name = self.name or self.model.name
            state = self.store.read_state()
            if self.primary and state.get("model") != self.name:  # the slot keeps its name across renames
                self.store.write_state({**state, "model": self.name})
            log.info("model ready", extra={"fields": {**self.model.describe(), "slot": self.name,
                                                      "load_ms": round((time.perf_counter() - t0) * 1000, 1)}})
            for note in self.model.runtime.details.get("notes") or []:
                log.warning("%s: %s", self.name, note)
        except (EdgepackError, OSError) as e:  # serving nothing, and saying why (status: model_error)
            self.model_error = str(e).split("\n")[0]
            log.error("cannot load bundle %s: %s", path, e)

    # ---- the updater's host interface ----
    @property
    def mqtt(self):
        return self.host.mqtt

    def verify(self, path: Path, *, sha256: str):
        """An update's one verification pass: the signature (keys of the current generation), then
        every member's hash, extracting the model files on the way. Returns the verified Bundle."""
        b = open_bundle(path)
        keyring = self.host.keyring
        if keyring.enabled:
            keyring.verify_bundle(b.manifest_bytes, b.signature)
        b.verify(extract_to=self.store.model_dir(sha256), extract=bundle_members_to_extract(b.manifest))
        return b

    def load(self, path: Path, *, verified=None, initial: bool = False) -> Model:
        """Load, warm up and golden-check a bundle. `verified` (from verify()) skips the hashing
        pass; otherwise the signature (any key this device ever accepted) and every hash are checked
        here. An update's staging (`verified`) is first checked against the memory left, and yields
        to the other models' requests while it warms up."""
        path = Path(path)
        bundle = verified
        if bundle is None:
            bundle = open_bundle(path)
            if self.host.keyring.enabled:
                self.host.keyring.verify_bundle(bundle.manifest_bytes, bundle.signature, history=True)
        sha = self.store.sha256(path)
        need = memory_need(bundle.manifest, _model_bytes(self.store.model_dir(sha)) or path.stat().st_size)
        if verified is not None:
            self.host.admit(self.name, need)
        cache = str(self.store.cache_dir(sha))  # one engine cache per bundle: empty means a build is coming
        pause = self.host.yield_to_traffic() if not initial else None
        base, owns = self._base_for(bundle.manifest) if bundle.manifest.format == ADAPTER else (None, False)
        rss0 = self.host.rss_bytes()

        def load() -> Model:
            try:
                m = load_bundle(path, model_dir=self.store.model_dir(sha), cache_dir=cache, threads=self.threads,
                                bundle=bundle, verified=verified is not None, sha256=sha, pause=pause, base=base)
            except BaseException:
                if owns:
                    base.close()
                raise
            if base is not None:  # an adapter: active.json names its base beside it
                m.base_slot = {"bundle": self.store.ref(m.base.bundle_path), "sha256": m.base.bundle_sha256}
                m.owns_base = owns
            rss1 = self.host.rss_bytes()
            grew = rss1 - rss0 if rss0 and rss1 and rss1 > rss0 else None
            m.memory = Memory(need.need_bytes, need.source, grew)  # the model's own: admission counts both sides
            m.drift = drift_monitor(bundle.manifest)
            return m

        why = slow_load(bundle.manifest, cache_dir=cache)
        if why is None:
            return load()
        log.info("building %s: this can take minutes; the agent is working, not hung", why)
        if not initial:  # an update's staging: the old model keeps serving, the updater reports progress
            return load()
        with self.host.building(why):
            return load()

    def _base_for(self, manifest: Manifest) -> tuple[Model | None, bool]:
        """The model an adapter bundle loads beside: the one serving here (or the base under the adapter
        serving here), else (an agent restart with an adapter active) the base bundle active.json names
        beside it, loaded for the adapter alone (True: the adapter owns it)."""
        current = self.model.base if self.model is not None and self.model.base is not None else self.model
        if current is not None or manifest.adapter is None:
            return current, False
        ref = (self.store.read_state().get("base") or {}).get("bundle")
        if not ref or not self.store.path(ref).is_file():
            return None, False
        log.info("%s: loading base %s for adapter %s", self.name or "model", Path(ref).name, manifest.name)
        return self.load(self.store.path(ref), initial=True), True

    def active_model(self) -> Model | None:
        """This slot's model (the updater's host interface): what its update replaces."""
        return self.model

    def swap(self, model: Model | None) -> Model | None:
        """One reference assignment: requests already holding the old model finish on it."""
        if model is not None:
            model.capture = self.ring.offer if self.ring else None
        with self._swap_lock:
            old, self.model = self.model, model
            self.model_error = None if model else "no verified model to serve"
            if model is not None:
                self.unloaded = False  # an update (or a load) serves again
            self._active = self.store.active_slot() is not None
        if model is not None:
            self.name = self.name or model.name
            log.info("serving %s %s", model.name, model.version, extra={"fields": {**model.describe(),
                                                                                  "slot": self.name}})
        self.host.models_changed()
        return old

    def event(self, doc: dict) -> None:
        self.host.event({**doc, "model": self.name or doc.get("name")})

    def status_changed(self) -> None:
        self.host.status_changed()

    # ---- views ----
    @property
    def ready(self) -> bool:
        return self.model is not None and not self.unloaded

    @property
    def meant(self) -> bool:
        """The device is meant to serve this model: configured, or with an active bundle (readiness
        probes ask often: no file is read here)."""
        return not self.unloaded and (self.initial is not None or self._active)

    @property
    def memory(self) -> Memory | None:
        return getattr(self.model, "memory", None)

    def holds_anything(self) -> bool:
        """A model, an active bundle, an unloaded one or an update in progress: what a removal removes."""
        from device_agent.ota.record import LIVE, RESUMABLE

        busy = self.updater is not None and self.updater.record.state in RESUMABLE + LIVE
        return self.model is not None or self.unloaded or busy or self.store.active_slot() is not None

    def entry(self) -> dict:
        """This model in the status's `models`."""
        return model_entry(model=self.model.describe() if self.model else None,
                           error="unloaded through the repository API" if self.unloaded and not self.model_error
                           else self.model_error,
                           update=self.updater.summary() if self.updater else None, threads=self.threads,
                           memory=self.memory.to_dict() if self.memory else None,
                           capture=self.ring.summary() if self.ring else None)

    def telemetry(self, stats) -> dict:
        model = self.model
        out = {"version": model.version if model else None, "inference": stats.window(slot=self.name),
               "totals": stats.totals(self.name)}
        run = self.updater.shadow_run if self.updater else None
        if run is not None:
            out["shadow"] = run.summary()
        if model is not None and model.drift is not None:
            self.drift = out["drift"] = model.drift.window()
        if self.ring is not None:
            out["capture"] = self.ring.summary()
        return out

    # ---- removal ----
    def remove(self) -> None:
        """Stop the updater (waiting for its thread, so nothing writes here afterwards), close every
        model it held and the one serving, and delete the slot's files (the first model's slot keeps
        the data directory itself, emptied of this model's files)."""
        if self.updater:
            self.updater.discard()
        old = self.swap(None)
        if old is not None:
            old.close()
        if self.ring is not None:  # a removed model's captured requests go with it
            self.ring.close()
            shutil.rmtree(self.ring.folder, ignore_errors=True)
        if self.primary:
            self.store.deactivate()
            self.store.prune(set())
            for p in (self.root / "update.json", self.root / "downloads"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            shutil.rmtree(self.store.cache, ignore_errors=True)
            self.store.cache.mkdir(exist_ok=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def primary_name(data_dir: Path) -> tuple[str | None, bool]:
    """The name of the model at the data directory's top level and whether active.json recorded it
    (else: its active bundle's, as a one-model agent left it, else its first update's); None: empty."""
    store = Store(data_dir)
    name = store.read_state().get("model")
    if isinstance(name, str) and MODEL_NAME.match(name):
        return name, True
    path = store.active()
    try:
        name = open_bundle(path).manifest.name if path else None
    except (EdgepackError, OSError):
        name = None
    if name is None:
        from device_agent.ota.record import Record

        name = ((Record.load(Path(data_dir) / "update.json").desired or {}).get("name"))
    return (name if isinstance(name, str) and MODEL_NAME.match(name) else None), False


def drift_monitor(manifest: Manifest):
    """Live drift statistics on the bundle's references (none in older bundles, or malformed)."""
    d = manifest.drift
    if not d:
        return None
    from edgeruntime.drift import Monitor, TensorRef

    try:
        return Monitor([TensorRef.from_dict(r) for r in [*d.get("inputs", []), *d.get("outputs", [])]])
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s: drift references unreadable (%s): no drift scores", manifest.name, e)
        return None


def _model_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.name.endswith(".npz"))
    except OSError:
        return 0


def discover(data_dir: Path) -> list[Path]:
    """Slot folders of the models after the first (DATA/models.d/NAME/), in name order."""
    d = Path(data_dir) / OTHERS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and MODEL_NAME.match(p.name))


def cpu_share(n_models: int, cores: int | None = None) -> int:
    """Threads per model when several share the device: the cores split between them."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, n_models))


__all__ = ["Memory", "MemoryRefused", "ModelSlot", "OTHERS", "SlotHost", "cpu_share", "discover", "memory_need",
           "primary_name", "slot_name"]
