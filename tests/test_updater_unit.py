"""The update state machine driven edge by edge with an injected host and clock (Mender-style):
real bundle files and a real data directory, a fake runtime (no model is run here)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import pytest

from edgeproto.desired import Desired, MqttTransfer, Probation, UrlTransfer
from device_agent.ota.record import Record, State
from device_agent.ota.transfer import TransferPolicy
from device_agent.ota.updater import Clock, Updater, UpdaterSettings
from device_agent.store import Store
from edgebundle.archive import open_bundle, sha256_file, write_bundle
from edgebundle.manifest import Manifest, TensorSpec


class FakeClock:
    """Wall time that can jump (NTP, a dead RTC), monotonic time that only moves forward."""

    def __init__(self):
        self.wall_t, self.mono_t = 1.8e9, 1000.0

    def wall(self) -> float:
        return self.wall_t

    def mono(self) -> float:
        self.mono_t += 0.5  # time passes whenever someone looks
        return self.mono_t

    def clock(self) -> Clock:
        return Clock(wall=self.wall, mono=self.mono)


class FakeModel:
    base_slot = None  # an adapter bundle's base (device_agent.model.Model)

    def __init__(self, path: Path, *, health=None):
        m = open_bundle(path).manifest
        self.manifest = m
        self.name, self.version, self.bundle_sha256 = m.name, m.version, sha256_file(path)
        self.closed, self.watched, self._health = False, False, health

    def version_of(self, name):
        return self.version

    def watch(self, on, *, reference=None):
        self.watched = on

    def health_snapshot(self):
        if self._health is not None:
            return self._health()
        return {"requests": 0, "errors": 0, "nonfinite": 0, "client_nonfinite": 0, "p95_ms": None}

    def check_golden(self):
        return {"ok": True, "checked": 0}

    def close(self):
        self.closed = True


class FakeHost:
    """The agent as the updater sees it; `verify_error`/`health` make a step fail on purpose."""

    def __init__(self, data: Path):
        self.store = Store(data)
        self.mqtt = None
        self.model: FakeModel | None = None
        self.events: list[dict] = []
        self.verify_error: list[BaseException] = []  # raised (and consumed) one per verify()
        self.health = None

    def active_model(self):
        return self.model

    def swap(self, model):
        old, self.model = self.model, model
        return old

    def verify(self, path, *, sha256):
        if self.verify_error:
            raise self.verify_error.pop(0)
        b = open_bundle(path)
        b.verify()
        return b

    def load(self, path, *, verified=None):
        return FakeModel(Path(path), health=self.health)

    def event(self, doc):
        self.events.append(doc)

    def status_changed(self):
        pass


def _bundle(d: Path, version: str, *, inputs=(TensorSpec("x", (1, 4), "float32"),)) -> Path:
    model = d / f"model-{version}.bin"
    model.write_bytes(f"not a real model {version}".encode() * 10)
    m = Manifest(name="m", version=version, target={"name": "arm-cpu"}, format="tflite", precision="fp32",
                 model_file="model.tflite", inputs=tuple(inputs),
                 outputs=(TensorSpec("y", (1, 2), "float32"),), runtime={"name": "litert"})
    dest = d / f"m-{version}.edgepack"
    write_bundle(dest, m, {"model.tflite": model})
    return dest


def _desired(path: Path, **kw) -> Desired:
    return Desired(update_id=uuid.uuid4().hex, name="m", version=open_bundle(path).manifest.version,
                   sha256=sha256_file(path), size=path.stat().st_size, transfer=UrlTransfer(url=path.as_uri()),
                   probation=kw.pop("probation", Probation(seconds=2, requests=10 ** 6)), **kw)


@pytest.fixture
def setup(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    host = FakeHost(tmp_path / "data")
    v1 = _bundle(src, "1.0.0")
    path, sha = host.store.add(v1)
    host.store.activate(path, sha)
    host.model = FakeModel(path)
    clock = FakeClock()
    settings = UpdaterSettings(max_attempts=3, backoff_s=0.0, transfer=TransferPolicy(allowed_urls=(src.as_uri(),)))

    def make():
        return Updater(host, tmp_path / "data", settings=settings, clock=clock.clock())

    return {"host": host, "src": src, "make": make, "clock": clock, "data": tmp_path / "data"}


def _drive(u: Updater, n: int = 10) -> None:
    for _ in range(n):
        u._step()
        if u.record.state in (State.COMMITTED, State.FAILED, State.ROLLED_BACK):
            return


def _states(host) -> list[str]:
    return [e["state"] for e in host.events if not e.get("progress")]


def test_happy_path_every_state(setup):
    host, u = setup["host"], setup["make"]()
    d = _desired(_bundle(setup["src"], "1.1.0"))
    u.set_desired(d)
    _drive(u)
    assert u.record.state is State.COMMITTED and host.model.version == "1.1.0"
    assert _states(host) == ["downloading", "verifying", "staging", "switching", "probation", "committed"]
    assert json.loads(u.path.read_text())["ended"][d.update_id] == "committed"


def test_a_downgrade_is_refused_on_the_record_before_the_first_byte(setup, monkeypatch):
    """Issue 24, finding 6: the record names the version, so a lower one fails before any transfer."""
    from device_agent.ota import updater

    host, u = setup["host"], setup["make"]()
    monkeypatch.setattr(updater, "fetch_url", lambda *a, **k: pytest.fail("a byte was fetched"))
    u.set_desired(_desired(_bundle(setup["src"], "0.9.0")))
    _drive(u)
    assert u.record.state is State.FAILED and u.record.error.startswith("downgrade refused: 0.9.0 is lower than")
    assert _states(host) == ["downloading", "failed"] and host.model.version == "1.0.0"
    assert not any((setup["data"] / "downloads").glob("*/*"))


def test_exception_in_probation_rolls_back_never_commits(setup):
    """Finding 10, at the state machine: a handler that raises never skips a state."""
    host, u = setup["host"], setup["make"]()
    host.health = lambda: {"requests": "x"}  # a bug in a health check: TypeError/KeyError inside probation
    u.set_desired(_desired(_bundle(setup["src"], "1.1.0")))
    _drive(u)
    assert u.record.state is State.ROLLED_BACK and "probation failed" in u.record.error
    assert host.model.version == "1.0.0" and "committed" not in _states(host)


def test_unexpected_errors_are_retried_a_bounded_number_of_times(setup):
    host, u = setup["host"], setup["make"]()
    host.verify_error[:] = [RuntimeError("runtime exploded")] * 10
    u.set_desired(_desired(_bundle(setup["src"], "1.1.0")))
    _drive(u, 20)
    assert u.record.state is State.FAILED and "gave up after 3 attempts" in u.record.error
    retries = [e for e in host.events if (e.get("error") or "").startswith("retrying")]
    assert len(retries) == 2 and host.model.version == "1.0.0"


def test_transient_error_then_success(setup):
    host, u = setup["host"], setup["make"]()
    host.verify_error[:] = [OSError(28, "No space left on device")]
    u.set_desired(_desired(_bundle(setup["src"], "1.1.0")))
    _drive(u)
    assert u.record.state is State.COMMITTED and u.record.attempts == 1


def test_restart_during_probation_of_first_model_serves_none(setup):
    """Finding 11, at the state machine: no previous model -> rolled back to none, consistently."""
    host = setup["host"]
    host.model = None
    d = _desired(_bundle(setup["src"], "1.1.0"))
    path, sha = host.store.add(_bundle(setup["src"], "1.1.0"))
    host.store.activate(path, sha)  # the candidate was switched in, then the agent died on probation
    u = setup["make"]()
    u._write(Record(state=State.PROBATION, update_id=d.update_id, desired=d.to_dict(), previous=None,
                    candidate={"bundle": host.store.ref(path), "sha256": sha}))
    u = setup["make"]()
    u.recover()
    assert u.record.state is State.ROLLED_BACK and "no model" in u.record.error
    assert host.store.read_state() == {} and host.store.active() is None


def test_restarts_while_staging_end_the_update(setup):
    """Finding 13 (crash loop), at the state machine: each restart in staging is an attempt."""
    host = setup["host"]
    d = _desired(_bundle(setup["src"], "1.1.0"))
    for n in range(1, 4):
        u = setup["make"]()
        if n == 1:
            u.record = Record(state=State.STAGING, update_id=d.update_id, desired=d.to_dict())
            u._write(u.record)
        u.recover()
        if u.record.state is State.FAILED:
            break
        assert u.record.state is State.VERIFYING and u.record.attempts == n
        u.record.state = State.STAGING
        u._write(u.record)
    assert u.record.state is State.FAILED and "restarted during" in u.record.error and n == 3
    assert host.model.version == "1.0.0"


def test_wall_clock_jumps_do_not_disturb_an_update(setup):
    """Probation and back-off run on monotonic time: a wall clock thrown a year back or forward
    (a Pi without RTC, an NTP step) neither stretches nor skips them."""
    host, clock, u = setup["host"], setup["clock"], setup["make"]()
    u.set_desired(_desired(_bundle(setup["src"], "1.1.0"), probation=Probation(seconds=5, requests=10 ** 6)))
    clock.wall_t -= 365 * 86400
    _drive(u)
    assert u.record.state is State.COMMITTED
    clock.wall_t += 2 * 365 * 86400
    u.set_desired(_desired(_bundle(setup["src"], "1.2.0"), probation=Probation(seconds=5, requests=10 ** 6)))
    _drive(u)
    assert u.record.state is State.COMMITTED and host.model.version == "1.2.0"


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"schema": 1, "state": "nope"}',
                                     b'{"schema": 1, "state": "probation", "desired": null}',
                                     b'{"schema": 1, "state": "idle", "ended": [1]}',
                                     b'{"schema": 1, "state": "switching", "desired": {}, "previous": '
                                     b'{"bundle": "../../etc/passwd", "sha256": "x"}}',
                                     b'{"schema": 99, "state": "idle"}', b"[" * 100000])
def test_damaged_update_record_starts_idle(setup, content):
    path = setup["data"] / "update.json"
    path.write_bytes(content)
    u = setup["make"]()
    u.recover()
    assert u.record.state is State.IDLE
    assert (path.with_name("update.json.corrupt").read_bytes() == content) or not content



def test_restart_before_the_switch_touched_active_json(setup):
    """Found by the fault matrix: killed just after entering SWITCHING (record persisted, active.json
    not yet changed): recovery must leave the old model active, not clear active.json."""
    host = setup["host"]
    before = host.store.read_state()
    d = _desired(_bundle(setup["src"], "1.1.0"))
    path, sha = host.store.add(_bundle(setup["src"], "1.1.0"))
    u = setup["make"]()
    u._write(Record(state=State.SWITCHING, update_id=d.update_id, desired=d.to_dict(), previous=None,
                    candidate={"bundle": host.store.ref(path), "sha256": sha}))
    u = setup["make"]()
    u.recover()
    assert u.record.state is State.ROLLED_BACK and "had not happened" in u.record.error
    assert host.store.read_state() == before


def test_a_failed_write_after_staging_does_not_leak_the_staged_model(setup, monkeypatch):
    """Disk full just as staging ends: the write of the next state fails, staging is retried, and
    the model staged the first time is closed (not kept in memory twice)."""
    import device_agent.ota.updater as updater_mod

    host, u = setup["host"], setup["make"]()
    loaded = []
    real_load, real_write = host.load, updater_mod.atomic_write

    def load(path, *, verified=None):
        loaded.append(real_load(path, verified=verified))
        return loaded[-1]

    def write(path, data):
        if b'"state": "switching"' in data and len(loaded) == 1:
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    host.load = load
    monkeypatch.setattr(updater_mod, "atomic_write", write)
    u.set_desired(_desired(_bundle(setup["src"], "1.1.0")))
    _drive(u)
    assert u.record.state is State.COMMITTED and u.record.attempts == 1
    assert len(loaded) == 2 and loaded[0].closed and host.model is loaded[1]


def test_interface_change_is_refused_in_staging_with_the_differences(setup):
    host, u = setup["host"], setup["make"]()
    new = _bundle(setup["src"], "1.1.0", inputs=(TensorSpec("input_layer", (1, 4), "float32"),))
    u.set_desired(_desired(new))
    _drive(u)
    assert u.record.state is State.FAILED and host.model.version == "1.0.0"
    err = u.record.error
    assert "interface change refused" in err and "input 'x' removed" in err and "input 'input_layer' added" in err
    assert "--allow-interface-change" in err and "switching" not in _states(host)


def test_interface_change_applies_when_the_record_allows_it(setup):
    host, u = setup["host"], setup["make"]()
    new = _bundle(setup["src"], "1.1.0", inputs=(TensorSpec("x", (-1, 4), "float32", shape_signature=(-1, 4)),))
    u.set_desired(_desired(new, allow_interface_change=True))
    _drive(u)
    assert u.record.state is State.COMMITTED and host.model.version == "1.1.0"


def test_a_loop_that_keeps_raising_backs_off_reports_and_gives_up(setup):
    """Not a handler: the step itself raises (here a host call) every time. Bounded, with events."""
    host, u = setup["host"], setup["make"]()
    d = _desired(_bundle(setup["src"], "1.1.0"))
    u.set_desired(d)

    def broken():
        raise RuntimeError("host is broken")

    host.active_model = broken
    u.settings = dataclasses.replace(u.settings, backoff_s=1.0)
    assert [u.tick() for _ in range(3)] == [1.0, 2.0, 4.0]  # doubling back-off, not every 2 s forever
    mine = [e for e in host.events if e["update_id"] == d.update_id]
    assert [e["state"] for e in mine] == ["idle", "idle", "failed"]
    assert "attempt 1 of 3" in mine[0]["error"] and "gave up after 3 attempts" in mine[-1]["error"]
    assert u.record.ended[d.update_id] == "failed"
    host.active_model = lambda: host.model
    assert u.tick() == 0.0 and len(host.events) == 3  # ended: not retried, no more events


@pytest.mark.parametrize("state", [State.DOWNLOADING, State.VERIFYING, State.STAGING])
def test_resume_edges_after_a_restart(setup, state):
    """DOWNLOADING/VERIFYING/STAGING cut off by a restart resume (VERIFYING re-checks from scratch)."""
    host, u = setup["host"], setup["make"]()
    d = _desired(_bundle(setup["src"], "1.1.0"))
    u.record = Record(state=state, update_id=d.update_id, desired=d.to_dict(), since=1.0)
    u._write(u.record)
    again = setup["make"]()
    again.recover()
    assert again.record.state is (State.DOWNLOADING if state is State.DOWNLOADING else State.VERIFYING)
    again.set_desired(d)
    _drive(again)
    assert again.record.state is State.COMMITTED and host.model.version == "1.1.0"


class FakeFetcher:
    """An MQTT transfer stood in: the bundle lands where the real fetcher puts it (that one hashes
    while it writes; tests/test_fuzz_ota.py drives it), and every call is recorded."""

    def __init__(self, src: Path):
        self.src, self.fetched, self.messages = src, [], []

    def on_message(self, topic, payload):
        self.messages.append(topic)
        return True

    def fetch(self, d, workdir, *, progress, cancelled):
        self.fetched.append(d.update_id)
        final = workdir / "bundle.edgepack"
        shutil.copyfile(self.src, final)
        progress(d.size, d.size)
        return final


class NoSession:
    """An MQTT session nothing may touch: a fetcher built on it instead of the injected one fails."""

    def __getattr__(self, name):
        raise AssertionError(f"the updater used its host's MQTT session ({name})")


def test_the_injected_fetcher_is_the_one_used(setup, tmp_path):
    """The agent hands the updater the fetcher its MQTT session feeds; the updater builds none of
    its own over it (it used to, and the agent overwrote it afterwards)."""
    host = setup["host"]
    host.mqtt = NoSession()
    new = _bundle(setup["src"], "1.1.0")
    fake = FakeFetcher(new)
    u = Updater(host, setup["data"], settings=UpdaterSettings(max_attempts=3, backoff_s=0.0),
                clock=setup["clock"].clock(), fetcher=fake)
    sha = sha256_file(new)
    d = dataclasses.replace(_desired(new), transfer=MqttTransfer(topic=f"t/bundles/{sha}", chunk_size=1 << 20,
                                                                 chunks=1, chunk_sha256=(sha,)))
    assert u.on_message(f"t/bundles/{sha}/chunks/0", b"x") and fake.messages == [f"t/bundles/{sha}/chunks/0"]
    u.set_desired(d)
    _drive(u)
    assert u.record.state is State.COMMITTED and host.model.version == "1.1.0"
    assert fake.fetched == [d.update_id]


def test_only_the_store_knows_its_layout(setup):
    """Records name stored bundles by a ref the Store gives and takes back; pruning keeps the refs
    it is handed, with their extracted models, and drops the rest."""
    store = setup["host"].store
    kept, kept_sha = store.add(_bundle(setup["src"], "1.1.0"))
    gone, gone_sha = store.add(_bundle(setup["src"], "1.2.0"))
    for sha in (kept_sha, gone_sha):
        store.model_dir(sha).mkdir()
    assert store.path(store.ref(kept)) == kept and not Path(store.ref(kept)).is_absolute()
    assert store.sha256(kept) == kept_sha
    store.activate(kept, kept_sha)
    assert store.active_slot() == {"bundle": store.ref(kept), "sha256": kept_sha} == store.read_state()
    store.prune({store.ref(kept)})
    assert kept.is_file() and store.model_dir(kept_sha).is_dir()
    assert not gone.exists() and not store.model_dir(gone_sha).exists()
    store.deactivate()
    assert store.active_slot() is None and store.active() is None and store.active_sha256() is None


@pytest.mark.parametrize("content", [None, b"", b"[]", b"7", b'{"floors": {}}', b"\xff\xfe"])
def test_a_missing_or_damaged_gatekeeper_file_reads_as_nothing(tmp_path, content, caplog):
    """records.json and trust.json never stop the agent: a damaged one is said in the log."""
    from device_agent.ota.statefile import read_state

    path = tmp_path / "records.json"
    if content is not None:
        path.write_bytes(content)
    assert read_state(path, ("floors", "seen"), otherwise="starting over") is None
    assert ("starting over" in caplog.text) is (content is not None)


def test_gatekeeper_files_round_trip_and_survive_a_full_disk(tmp_path, caplog):
    from device_agent.ota.statefile import read_state, write_state

    path = tmp_path / "trust.json"
    write_state(path, {"schema": 1, "min_serial": 2, "certs": {}}, what="the key generation", indent=2)
    assert read_state(path, ("min_serial", "certs"), otherwise="-") == {"min_serial": 2, "certs": {}}
    path.unlink()
    path.mkdir()  # the write cannot replace it: logged, nothing raised
    write_state(path, {"min_serial": 3}, what="the key generation")
    assert "cannot persist the key generation" in caplog.text
