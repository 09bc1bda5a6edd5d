"""The pieces `edgepack push` and the rollout controller share, without a broker: the transfer
modes (fleet.transfer; each reads and hashes the bundle once), what each mode puts on the broker
(fleet.push, against the in-memory broker of fakebroker.py), records made with Terms and a real
signing key (fleet.records), the device's record gate (one parse per record) and rollout records
with enum statuses that read and write the same JSON. Bundles and keys are real files."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from edgebundle.archive import open_bundle, sha256_file
from edgebundle.cdc import chunk_file
from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.desired import CdcTransfer, MqttTransfer, Probation, Shadow, UrlTransfer, parse_record
from edgeproto.mqtt import dumps
from edgepack.sim.simulator import synthetic_bundle
from fakebroker import T, FakeBroker
from fleet import delta as cdc
from fleet import transfer
from fleet.records import Signer, Terms, make_record, removal_record
from fleet.rollout_state import RolloutRecord, RolloutStatus, WaveState
from fleet.status import FleetTable

_OPENED: list[str] = []  # files opened while a test watches (the audit hook below)
_WATCH: list[str] = []


def _audit(event: str, args) -> None:
    if _WATCH and event == "open" and str(args[0]) in _WATCH:
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def _opens(path: Path, f):
    """f(), and how often `path` was opened meanwhile (Python's `open` audit event: real reads)."""
    _OPENED.clear()
    _WATCH[:] = [str(path)]
    try:
        out = f()
    finally:
        _WATCH.clear()
    return out, len(_OPENED)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("push-unit")
    return {v: synthetic_bundle(d / f"m-{v}.edgepack", version=v, size=300_000, name="m") for v in ("1.0.0", "1.1.0")}


def test_each_transfer_mode_reads_and_hashes_the_bundle_once(bundles):
    path = bundles["1.1.0"]
    b, sha, size = open_bundle(path), sha256_file(path), path.stat().st_size
    plain, n = _opens(path, lambda: transfer.plain(b, T, chunk_size=64 * 1024))
    assert n == 1 and plain.sha256 == sha and plain.size == size and isinstance(plain.transfer, MqttTransfer)
    data = path.read_bytes()
    assert list(plain.transfer.chunk_sha256) == [hashlib.sha256(data[i:i + 65536]).hexdigest()
                                                 for i in range(0, size, 65536)]
    assert plain.transfer.topic == T.bundle(sha) and plain.transfer.chunks == len(plain.transfer.chunk_sha256)

    url, n = _opens(path, lambda: transfer.by_url(b, url="https://example.org/m.edgepack"))
    assert n == 1 and url.sha256 == sha and url.transfer == UrlTransfer(url="https://example.org/m.edgepack")

    delta, n = _opens(path, lambda: transfer.delta(b, T, previous=None))
    t = delta.transfer
    assert n == 1 and delta.sha256 == sha and delta.size == size and isinstance(t, CdcTransfer)
    cut = chunk_file(path, t.params)
    assert list(t.chunk_sha256) == [c.sha256 for c in cut] and sum(t.chunk_sizes) == size and t.url is None
    assert (delta.name, delta.version, delta.interface) == (plain.name, plain.version, plain.interface)

    # cut alike with the model's previous version when its parameters still suit; with a URL: byte ranges there
    old = transfer.prepare(bundles["1.0.0"], T, indexes={})
    ix = cdc.ModelIndex()
    ix.take_over(old.sha256, old.transfer, T.group_model_desired("g", "m"))
    again = transfer.delta(b, T, previous=ix, url="https://example.org/m.edgepack")
    assert again.transfer.params == old.transfer.params and again.transfer.url == "https://example.org/m.edgepack"
    assert again.sha256 == sha


def test_prepare_picks_the_mode_and_checks_the_chunk_size_first(bundles, tmp_path):
    path = bundles["1.0.0"]
    assert isinstance(transfer.prepare(path, T, chunk_size=4096).transfer, MqttTransfer)
    assert isinstance(transfer.prepare(path, T, url="file:///m.edgepack").transfer, UrlTransfer)
    by_index = transfer.prepare(path, T, indexes={}, url="file:///m.edgepack").transfer
    assert isinstance(by_index, CdcTransfer) and by_index.url == "file:///m.edgepack"
    for size in (1023, (64 << 20) + 1):
        with pytest.raises(InputError, match="--chunk-size must be between"):
            transfer.prepare(tmp_path / "missing.edgepack", T, chunk_size=size)


def _client(broker: FakeBroker):
    return broker.connect([], lambda _t, _p: None)


def _survey(indexes=None):
    from fleet.push import Survey

    return Survey(table=FleetTable(T), indexes=indexes)


def test_each_mode_says_what_goes_on_the_broker_after_the_record(bundles):
    """plain: every fixed-size chunk, retained; URL: nothing; delta: each content-defined chunk
    once, then the model's index naming the bundle by the record's topic, its cost said first."""
    from fleet.push import _by_url, _delta, _plain
    from fleet.records import Address
    from fleet.transfer import TransferSpec

    path, topic = bundles["1.1.0"], T.model_desired("d1", "m")
    b, data = open_bundle(path), path.read_bytes()
    broker = FakeBroker()
    plain = _plain(b, T, TransferSpec(chunk_size=8192))
    plain.publish(_client(broker), topic)
    t = plain.prepared.transfer
    assert [broker.retained[T.chunk(t.topic, i)] for i in range(t.chunks)] == \
           [data[i:i + 8192] for i in range(0, len(data), 8192)]
    assert plain.cost is None and plain.notes == ()

    url = _by_url(b, TransferSpec(url="https://example.org/m.edgepack"))
    assert url.publish is None and url.prepared.transfer.url == "https://example.org/m.edgepack"

    addr = Address.of(device="d1", group=None, model="m")
    said: list[str] = []
    broker = FakeBroker()
    delta = _delta(b, T, TransferSpec(delta=True), broker=BrokerConfig(url="mqtt://127.0.0.1:1"),
                   survey=_survey({}), addr=addr, inform=said.append)
    t = delta.prepared.transfer
    assert delta.notes == tuple(delta.cost.lines()) and delta.cost.devices == {"d1": None}
    assert delta.cost.publish_chunks == len(set(t.chunk_sha256)) and delta.cost.bundle_bytes == len(data)
    delta.publish(_client(broker), topic)
    offsets = dict(zip(t.chunk_sha256, t.offsets()))
    for sha, n in zip(t.chunk_sha256, t.chunk_sizes):
        assert broker.retained[t.chunk_topic(sha)] == data[offsets[sha]:offsets[sha] + n]
    index = broker.doc(cdc.index_topic(T.root, "m"))
    assert index["bundles"][delta.prepared.sha256]["topics"] == [topic] and said == []

    from_url = _delta(b, T, TransferSpec(delta=True, url="https://example.org/m.edgepack"),
                      broker=BrokerConfig(url="mqtt://127.0.0.1:1"), survey=_survey({}), addr=addr,
                      inform=said.append)
    assert from_url.publish is None and from_url.prepared.transfer.url == "https://example.org/m.edgepack"
    assert from_url.notes[0].startswith("delta from https://example.org/m.edgepack: devices fetch byte ranges")
    assert from_url.notes[1:] == tuple(from_url.cost.lines()[1:])


def test_records_carry_their_terms_and_a_real_signature(bundles, keys):
    from device_agent.ota.gate import RecordGate, SourcePolicy
    from device_agent.ota.keyring import Keyring
    from edgebundle.signing import load_public_key
    from edgeproto.desired import Limits

    p = transfer.prepare(bundles["1.1.0"], T, chunk_size=4096)
    plain = make_record(p, target="devices/d1/models/m", update_id="u0", issued="2026-12-01T00:00:00.000+00:00")
    assert "allow_interface_change" not in plain and "shadow" not in plain and "record_signature" not in plain
    terms = Terms(allow_downgrade=True, allow_interface_change=True, probation=Probation(seconds=5, requests=50),
                  staging_max_p95_ms=12.5, shadow=Shadow(seconds=10, rate=0.5))
    doc = make_record(p, target="devices/d1/models/m", update_id="u1", issued="2026-12-01T00:00:01.000+00:00",
                      signer=Signer.load(keys / "a.key"), terms=terms)
    got = parse_record(dumps(doc), source=T.model_desired("d1", "m"))
    assert (got.allow_downgrade, got.allow_interface_change, got.probation, got.staging_max_p95_ms, got.shadow) == (
        True, True, terms.probation, 12.5, terms.shadow)
    gate = RecordGate(keyring=Keyring(direct=[load_public_key(keys / "a.pub")], roots=[]), limits=Limits(),
                      topic_prefix=T.root, sources=SourcePolicy(), state_path=None)
    assert gate.accept(dumps(doc), T.model_desired("d1", "m")).sha256 == p.sha256
    removal = removal_record(target="devices/d1/models/m", update_id="u2", issued="2026-12-01T00:00:02.000+00:00",
                             signer=Signer.load(keys / "a.key"))
    assert gate.accept(dumps(removal), T.model_desired("d1", "m")).update_id == "u2"


def test_the_gate_parses_a_record_once(bundles, keys):
    """One JSON parse and one canonicalization per record: the signature check and the replay
    digest read what the first parse made."""
    from device_agent.ota.gate import RecordGate, SourcePolicy
    from device_agent.ota.keyring import Keyring
    from edgebundle import jsonsafe, signing
    from edgebundle.signing import load_public_key
    from edgeproto.desired import Desired, Limits, RecordError

    p = transfer.prepare(bundles["1.1.0"], T, chunk_size=4096)
    doc = make_record(p, target="devices/d1", update_id="once", issued="2026-12-01T00:00:00.000+00:00",
                      signer=Signer.load(keys / "a.key"))
    gate = RecordGate(keyring=Keyring(direct=[load_public_key(keys / "a.pub")], roots=[]), limits=Limits(),
                      topic_prefix=T.root, sources=SourcePolicy(), state_path=None)
    watched = {jsonsafe.loads.__code__: "loads", signing.canonical_json.__code__: "canonical_json"}
    calls: list[str] = []

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code in watched:
            calls.append(watched[frame.f_code])

    sys.setprofile(profile)
    try:
        got = gate.accept(dumps(doc), T.desired("d1"))
    finally:
        sys.setprofile(None)
    assert isinstance(got, Desired) and got.update_id == "once" and got.signature is not None
    assert sorted(calls) == ["canonical_json", "loads"], calls
    tampered = {**doc, "version": "9.9.9"}
    with pytest.raises(RecordError, match="signature"):
        gate.accept(dumps(tampered), T.desired("d1"))


def _old_record() -> dict:
    """A rollout record as controllers have always retained it (strings for status and states)."""
    return {"id": "r1", "group": "g", "bundle": {"name": "m", "version": "1.1.0"}, "previous": None,
            "settings": {}, "waves": [
                {"devices": ["d0"], "state": "passed", "update_id": "r1-w1", "started": 1.0,
                 "outcomes": {"d0": "committed"}, "readings": {}, "summary": "ok", "times": {"update_s": 1.0}},
                {"devices": ["d1", "d2"], "state": "pending", "update_id": None, "started": None,
                 "outcomes": {}, "readings": {}, "summary": None, "times": {}}],
            "status": "paused", "current": 1, "baseline": {}, "reason": "paused by op", "created": 1.0,
            "updated": 2.0, "controller": "A", "schema": "edgepack.rollout/1", "model": "m"}


def test_rollout_records_hold_enums_and_write_the_same_json():
    old = _old_record()
    rec = RolloutRecord.from_dict(old)
    assert rec.status is RolloutStatus.PAUSED and [w.state for w in rec.waves] == [WaveState.PASSED, WaveState.PENDING]
    assert json.dumps(rec.to_dict()) == json.dumps(old)  # same values, same key order
    assert rec.summary_lines()[0] == "rollout r1: m 1.1.0 to group g: paused (paused by op)"
    assert rec.summary_lines()[2].startswith("> wave 2: 2 device(s), pending; committed 0")
    assert RolloutStatus.read("done") is RolloutStatus.DONE and RolloutStatus.read("later") is None
    assert RolloutStatus.read(["running"]) is None
    with pytest.raises(ValueError):
        RolloutRecord.from_dict({**old, "status": "later"})
