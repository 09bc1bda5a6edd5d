"""A model slot driven through its host interface (device_agent.slot.SlotHost) with a fake host: no
agent, no broker. Real tiny bundles (tests/tinybundles.py: an ONNX `log` model) and a real data
directory; the fake records what the slot asked of it."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from tinybundles import log_bundle

from device_agent.capture import CapturePolicy
from device_agent.ota.keyring import Keyring
from device_agent.ota.record import State
from device_agent.ota.transfer import TransferPolicy
from device_agent.ota.updater import Clock, Updater, UpdaterSettings
from device_agent.slot import OTHERS, MemoryRefused, ModelSlot, SlotHost
from edgebundle.archive import sha256_file
from edgebundle.errors import BundleError
from edgeproto.desired import Desired, Probation, UrlTransfer

MB = 1 << 20


class FakeHost:
    """The agent as a slot sees it, and nothing more: `room` is the memory a model may need
    (None: anything fits); `rss` the process's resident memory, in the order it is asked."""

    def __init__(self, data_dir: Path, *, trusted: list | None = None):
        self.data_dir = data_dir
        self.keyring = Keyring(direct=trusted or [], roots=[])
        self.capture_policy = CapturePolicy()  # capture off: no ring
        self.mqtt = None
        self.room: int | None = None
        self.rss = [100 * MB, 130 * MB]
        self.admitted: list[tuple[str | None, int]] = []
        self.yields, self.pauses, self.builds = 0, 0, []
        self.events: list[dict] = []
        self.changes = self.statuses = 0

    def admit(self, name, need) -> None:
        self.admitted.append((name, need.need_bytes))
        if self.room is not None and need.need_bytes > self.room:
            raise MemoryRefused(f"model {name} needs about {need.need_bytes / MB:.0f} MB")

    def yield_to_traffic(self):
        self.yields += 1

        def pause() -> None:
            self.pauses += 1
        return pause

    def rss_bytes(self) -> int | None:
        return self.rss.pop(0) if self.rss else None

    def building(self, why: str):
        self.builds.append(why)
        return contextlib.nullcontext()

    def models_changed(self) -> None:
        self.changes += 1

    def event(self, doc: dict) -> None:
        self.events.append(doc)

    def status_changed(self) -> None:
        self.statuses += 1


def _members(protocol) -> set[str]:
    return {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)


def test_the_fake_and_the_agent_offer_what_a_slot_may_ask(tmp_path):
    """The interface is the whole of what a slot asks; the agent and this test's fake both offer it."""
    from device_agent.config import load_config
    from device_agent.service import Agent

    asked = _members(SlotHost)
    assert asked == {"data_dir", "keyring", "capture_policy", "mqtt", "admit", "yield_to_traffic", "rss_bytes",
                     "building", "models_changed", "event", "status_changed"}
    agent = Agent(load_config(env={}, data_dir=tmp_path / "agent", api_port=0))
    try:
        assert all(hasattr(agent, n) for n in asked), asked - {n for n in asked if hasattr(agent, n)}
    finally:
        agent.queue.close()
    fake = FakeHost(tmp_path)
    assert all(hasattr(fake, n) for n in asked)


@pytest.fixture
def made(tmp_path):
    """(host, slot named `cam` at the data directory's top level with logm 1.0.0 configured, source folder)."""
    src = tmp_path / "src"
    host = FakeHost(tmp_path / "data")
    host.data_dir.mkdir()
    slot = ModelSlot(host, "cam", host.data_dir, threads=1, initial=log_bundle(src / "v1"))
    return host, slot, src


def test_a_configured_bundle_loads_and_serves(made):
    host, slot, _ = made
    slot.check_initial()
    slot.load_initial()
    assert slot.ready and slot.model_error is None and slot.primary
    assert slot.active_model() is slot.model and slot.model.name == "logm" and slot.name == "cam"
    assert slot.memory.loaded_bytes == 30 * MB  # what the host's RSS grew by while it loaded
    assert host.admitted == [] and host.yields == 0  # a first load is neither admitted nor yields
    assert slot.entry()["model"]["version"] == "1.0.0"
    other = ModelSlot(host, "other", host.data_dir / OTHERS / "other", threads=1)
    assert not other.primary


def test_a_bundle_the_hosts_keys_did_not_sign_is_refused(tmp_path, keys):
    from edgebundle.signing import load_public_key

    host = FakeHost(tmp_path / "data", trusted=[load_public_key(keys / "a.pub")])
    slot = ModelSlot(host, "cam", host.data_dir, threads=1, initial=log_bundle(tmp_path / "src"))
    with pytest.raises(BundleError):
        slot.check_initial()
    slot.load_initial()  # unchecked: the load checks it, and the slot says why it serves nothing
    assert not slot.ready and slot.model_error


def test_a_staged_model_that_would_not_fit_is_refused_by_the_host(made):
    """An update's staging asks the host to admit the model's memory need before it loads; the
    serving model is untouched by a refusal."""
    host, slot, src = made
    slot.load_initial()
    serving = slot.model
    path, sha = slot.store.add(log_bundle(src / "v2", version="1.1.0"))
    verified = slot.verify(path, sha256=sha)
    host.room = 1
    with pytest.raises(MemoryRefused, match="model cam needs about"):
        slot.load(path, verified=verified)
    assert host.admitted[-1][0] == "cam" and host.admitted[-1][1] > 1 and slot.model is serving
    host.room, host.rss = None, []
    staged = slot.load(path, verified=verified)
    try:
        assert staged.version == "1.1.0" and host.yields == 1 and slot.model is serving
    finally:
        staged.close()


def test_an_update_reaches_the_host_with_the_slots_name(made):
    """The slot is the updater's host: an update through it swaps the model (the host hears that
    models changed) and every event reaches the host with the slot's name."""
    host, slot, src = made
    slot.load_initial()
    new = log_bundle(src / "v2", version="1.1.0")
    mono = iter(range(1000, 10 ** 6))  # each look at the clock: a second later (probation ends at once)
    u = Updater(slot, host.data_dir, clock=Clock(mono=lambda: float(next(mono))),
                settings=UpdaterSettings(transfer=TransferPolicy(allowed_urls=((src / "v2").as_uri(),))))
    slot.updater = u
    d = Desired(update_id="u1", name="logm", version="1.1.0", sha256=sha256_file(new), size=new.stat().st_size,
                transfer=UrlTransfer(url=new.as_uri()), probation=Probation(seconds=2, requests=10 ** 6))
    u.set_desired(d)
    for _ in range(5):
        u.tick()
        if u.record.state is State.COMMITTED:
            break
    assert u.record.state is State.COMMITTED, u.record.error
    assert slot.model.version == "1.1.0" and slot.ready
    assert host.changes == 1 and host.statuses >= 1 and host.admitted and host.admitted[0][0] == "cam"
    states = [e["state"] for e in host.events]
    assert states[0] == "downloading" and states[-1] == "committed", states
    assert {e["model"] for e in host.events} == {"cam"}


def test_swap_and_remove(made):
    host, slot, _ = made
    slot.load_initial()
    slot.start_updater(UpdaterSettings(), fetcher=None)
    first = slot.model
    assert slot.swap(first) is first and host.changes == 1  # one reference assignment, and the host hears of it
    slot.remove()
    assert slot.model is None and not slot.ready and host.changes == 2
    assert slot.store.active() is None and not (host.data_dir / "update.json").exists()
    assert host.data_dir.is_dir()  # the first model's slot keeps the data directory itself

    other = ModelSlot(host, "other", host.data_dir / OTHERS / "other", threads=1,
                      initial=log_bundle(host.data_dir.parent / "src" / "other", name="other"))
    other.load_initial()
    assert other.ready
    other.remove()
    assert not other.root.exists() and host.changes == 3
