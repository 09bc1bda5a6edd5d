"""Several models per device, the fleet side: push, rollout, removal and fleet status address one
model by name; the documents that carry models follow the schemas. Fast tests first (no broker),
then simulated devices on a real mosquitto (each serves one model, named after its bundle)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agents import wait_until
from edgeproto.broker import BrokerConfig
from edgeproto.desired import Probation, RecordError, Removal
from edgeproto.topics import Topics
from edgepack.sim.simulator import SimSettings, Simulator, synthetic_bundle
from fleet.records import Address, Signer, make_record, model_for, removal_record
from fleet.transfer import prepare

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
T = Topics()
QUICK = Probation(seconds=1.0, requests=10 ** 6)


def _validate(doc, name: str) -> None:
    import jsonschema

    jsonschema.validate(doc, json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


def _invalid(doc, name: str) -> bool:
    import jsonschema

    try:
        _validate(doc, name)
    except jsonschema.ValidationError:
        return True
    return False


@pytest.fixture(scope="module")
def mb(tmp_path_factory):
    """Bundles of two models: a (1.0.0, 1.1.0) and b (1.0.0, 1.1.0)."""
    d = tmp_path_factory.mktemp("models")
    return {f"{m}-{v}": synthetic_bundle(d / f"{m}-{v}.edgepack", version=v, size=20_000, name=m)
            for m in ("a", "b") for v in ("1.0.0", "1.1.0")}


# ---- fast: addressing, records, documents, status rows ----

def test_records_address_a_model_by_default_or_the_old_style_topic(mb, tmp_path):
    from edgepack.cli import main

    assert model_for("b") == "b" and model_for("b", model="cls") == "cls" and model_for("b", device_topic=True) is None
    for bad in ({"bundle_name": "has space"}, {"bundle_name": "b", "model": "a/b"}):
        with pytest.raises(Exception, match="cannot name a model|must be"):
            Address.of(device="d1", group=None, model=model_for(bad["bundle_name"], model=bad.get("model")))
    with pytest.raises(Exception, match="exclude each other"):
        model_for("b", model="b", device_topic=True)
    assert Address.of(device="d1", group=None, model="b").target == "devices/d1/models/b"
    assert Address.of(device=None, group="g", model="b").target == "groups/g/models/b"
    assert Address.of(device=None, group="g").target == "groups/g"
    p = prepare(mb["b-1.1.0"], T, chunk_size=4096)
    doc = make_record(p, target="groups/g/models/b", update_id="u1", issued="2026-12-01T00:00:00.000+00:00")
    _validate(doc, "desired")
    _validate(make_record(p, target="devices/d1", update_id="u2", issued=None), "desired")  # old style
    assert _invalid({**doc, "target": "groups/g/models/b/c"}, "desired")
    # the CLI: a bundle or --remove, never both; --remove names a model (exit 2, before any broker)
    runner = CliRunner()
    for args, why in ((["push", str(mb["b-1.1.0"]), "--remove", "--model", "b", "--device", "d1"], "give a BUNDLE"),
                      (["push", "--device", "d1"], "give a BUNDLE"),
                      (["push", "--remove", "--device", "d1"], "--remove needs --model"),
                      (["push", "--remove", "--model", "b", "--device-topic", "--device", "d1"], "not --device-topic"),
                      (["push", str(mb["b-1.1.0"]), "--model", "b", "--device-topic", "--device", "d1"],
                       "exclude each other")):
        res = runner.invoke(main, [*args, "--broker", "mqtt://127.0.0.1:1"])
        assert res.exit_code == 2 and why in res.output, (args, res.output)


def test_removal_records_are_signed_and_checked_like_updates(keys):
    from device_agent.ota.gate import RecordGate, SourcePolicy
    from device_agent.ota.keyring import Keyring
    from edgebundle.signing import load_public_key
    from edgeproto.desired import Limits
    from edgeproto.mqtt import dumps

    topic = T.model_desired("d1", "b")
    doc = removal_record(target="devices/d1/models/b", update_id="rm1", issued="2026-12-01T00:00:00.000+00:00",
                         signer=Signer.load(keys / "a.key"))
    assert doc["remove"] is True and doc["record_signature"]["alg"] == "ed25519" and "name" not in doc
    _validate(doc, "desired")
    assert _invalid({**doc, "name": "b"}, "desired") and _invalid({**doc, "target": "devices/d1"}, "desired")
    assert _invalid({**doc, "remove": False}, "desired")

    def gate():
        return RecordGate(keyring=Keyring(direct=[load_public_key(keys / "a.pub")], roots=[]), limits=Limits(),
                          topic_prefix=T.root, sources=SourcePolicy(), state_path=None)

    got = gate().accept(dumps(doc), topic)
    assert isinstance(got, Removal) and got.target == "devices/d1/models/b"
    for bad, why in (({**doc, "issued": "2026-12-02T00:00:00.000+00:00"}, "signature"),
                     ({k: v for k, v in doc.items() if k != "record_signature"}, "not signed")):
        with pytest.raises(RecordError, match=why):
            gate().accept(dumps(bad), topic)
    with pytest.raises(RecordError, match="meant for"):
        gate().accept(dumps(doc), T.model_desired("d2", "b"))  # replayed onto another device's topic


def test_documents_with_models_follow_the_schemas():
    """What agents with several models write (edgeproto.documents), and what older agents wrote."""
    from edgebundle.manifest import Manifest, TensorSpec
    from edgeproto.documents import (AgentTelemetry, StatusDocument, TelemetryDocument, Totals, model_entry,
                                     model_section)
    from edgeproto.records import UpdateEvent

    m = Manifest(name="b", version="1.0.0", target={"name": "arm-cpu"}, format="tflite", precision="int8",
                 model_file="model.tflite", inputs=(TensorSpec("x", (1, 4), "float32"),),
                 outputs=(TensorSpec("y", (1, 2), "float32"),), runtime={"name": "litert"})
    model = model_section(m, bundle_sha256="0" * 64, interface="1" * 16, runtime="litert", runtime_version="1.4.0",
                          provider="xnnpack", notes=[])
    update = {"state": "removed", "update_id": "rm1", "version": None, "error": None, "previous": None,
              "attempts": 0, "issued": None}
    st = StatusDocument(device_id="d1", ts="t", groups=("g",), agent_version="0.1.0", model=model, model_error=None,
                        update=None, ota={"signed_updates": False}, models={
                            "a": model_entry(model=model, error=None, update=None, threads=2,
                                             memory={"needed_bytes": 1000, "available_bytes": 5000}),
                            "b": model_entry(model=None, error="removed", update=update, threads=None, memory=None)})
    doc = st.to_dict()
    _validate(doc, "status")
    _validate({k: v for k, v in doc.items() if k != "models"}, "status")  # an agent that predates models
    assert _invalid({**doc, "models": {"a/b": doc["models"]["a"]}}, "status")
    assert _invalid({**doc, "models": {"a": {"model": None}}}, "status")  # an entry has every key
    window = {"count": 3, "errors": 0, "nonfinite": 0, "window_s": 1.0, "throughput_ips": 3.0,
              "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 2.0, "mean": 1.0}}
    system = {"cpu_percent": 1.0, "process_rss_bytes": 1, "memory_total_bytes": 2, "memory_available_bytes": 1,
              "temperature_c": None, "disk_free_bytes": 1, "uptime_s": 1.0}
    tel = TelemetryDocument(device_id="d1", ts="t", seq=1, inference=window, totals=Totals(count=3, errors=0),
                            system=system, model_name="a", model_version="1.0.0",
                            agent=AgentTelemetry(buffer={"queued": 0, "dropped_total": 0}, profile=None),
                            models={"a": {"version": "1.0.0", "inference": window,
                                          "totals": {"count": 3, "errors": 0}}}).to_dict()
    _validate(tel, "telemetry")
    assert _invalid({**tel, "models": {"a": {"version": "1.0.0", "inference": {"count": 1}, "totals": {}}}},
                    "telemetry")
    ev = {"device_id": "d1", "ts": "t", **UpdateEvent(update_id="rm1", state="removed", model="b").to_dict()}
    _validate(ev, "event")
    _validate({k: v for k, v in ev.items() if k != "model"}, "event")  # an agent that predates models
    assert _invalid({**ev, "model": "a/b"}, "event")


def test_fleet_status_lists_each_model():
    from fleet.cli import _status_lines
    from fleet.status import FleetTable

    t = FleetTable()
    entry = {"model": {"name": "a", "version": "1.0.0"}, "model_error": None, "previous_model": None,
             "update": None, "threads": 1, "memory": None}
    t.feed(T.status("d1"), json.dumps({"device_id": "d1", "online": True, "groups": ["g"], **entry, "models": {
        "a": entry, "b": {**entry, "model": {"name": "b", "version": "2.0.0"},
                          "update": {"state": "probation", "update_id": "u"}}}}).encode())
    window = {"a": {"version": "1.0.0", "inference": {"count": 2, "latency_ms": {"p95": 1.5}}, "totals": {"errors": 1}},
              "b": {"version": "2.0.0", "inference": {"count": 3, "latency_ms": {"p95": 6.0}, "generation": {
                  "requests": 3, "decode_tokens_per_s": 24.5, "ttft_ms": {"p50": 80.0, "p95": 120.0, "p99": 130.0}}},
                    "totals": {"errors": 3}}}
    t.feed(T.telemetry("d1"), json.dumps({"device_id": "d1", "seq": 1, "inference": {"count": 5},
                                          "totals": {"count": 5, "errors": 4}, "models": window}).encode())
    old = {"device_id": "old", "online": True, "model": {"name": "m", "version": "1"}}  # an agent without models
    t.feed(T.status("old"), json.dumps(old).encode())
    rows = {r["device_id"]: r for r in t.rows()}
    assert [(m["name"], m["version"], m["update"], m["p95_ms"], m["errors"]) for m in rows["d1"]["models"]] == [
        ("a", "1.0.0", None, 1.5, 1), ("b", "2.0.0", "probation", 6.0, 3)]
    assert rows["d1"]["errors"] == 4 and [m["name"] for m in rows["old"]["models"]] == ["m"]
    lines = _status_lines(rows["d1"])
    assert [line[:5] for line in lines] == [("d1", "yes", "a", "1.0.0", "-"), ("", "", "b", "2.0.0", "probation")]
    assert [line[6:9] for line in lines] == [("1.50", "1", "-"), ("6.00", "3", "24.5")]  # b generates: tok/s
    assert rows["d1"]["models"][1]["ttft_p95_ms"] == 120.0 and rows["d1"]["models"][0]["decode_tok_s"] is None


# ---- simulated devices on mosquitto ----

def _sim(broker, bundle, prefix: str, n: int = 3, **kw) -> Simulator:
    sim = Simulator(BrokerConfig(url=broker.url), bundle,
                    SimSettings(devices=n, id_prefix=prefix, groups=("g",), telemetry_s=0.5, rate=30.0, **kw)).start()
    assert sim.wait_connected(30) == n
    return sim


def _desired(broker) -> dict[str, dict]:
    """Every desired record retained on the broker, by topic."""
    from fleet.conn import Collector

    c = Collector(BrokerConfig(url=broker.url), [f"{T.root}/#"], name="retained")
    try:
        time.sleep(0.5)
        return {t: json.loads(p) for t, p in c.messages if p and t.endswith("/desired")}
    finally:
        c.stop()


@pytest.mark.broker
def test_push_goes_to_one_models_topic_and_model_records_beat_old_style(broker, mb):
    import fleet

    a, b = _sim(broker, mb["a-1.0.0"], "pa"), _sim(broker, mb["b-1.0.0"], "pb")
    bc = BrokerConfig(url=broker.url)
    try:
        small, quick = fleet.TransferSpec(chunk_size=4096), fleet.Terms(probation=QUICK)
        follow = fleet.Follow(timeout=60, expect=tuple(d.device_id for d in b.devices))
        res = fleet.push(mb["b-1.1.0"], bc, fleet.PushOptions(group="g", transfer=small, terms=quick, follow=follow))
        assert res.topic == T.group_model_desired("g", "b") and res.desired["target"] == "groups/g/models/b"
        assert res.ok and set(res.devices) == {d.device_id for d in b.devices}, res.devices
        assert all(e["model"] == "b" for e in res.devices.values())  # the simulator names its model in events
        assert set(b.versions().values()) == {"1.1.0"} and set(a.versions().values()) == {"1.0.0"}
        assert not any(d.switched for d in a.devices)
        assert list(_desired(broker)) == [T.group_model_desired("g", "b")]
        # an old-style record still updates a device's (first) model; a record on the model's topic beats it
        dev = a.devices[0]
        old = fleet.push(mb["a-1.1.0"], bc, fleet.PushOptions(device=dev.device_id, device_topic=True, transfer=small,
                                                               terms=quick, follow=fleet.Follow(timeout=60)))
        assert old.topic == T.desired(dev.device_id) and old.ok and dev.version == "1.1.0"
        back = fleet.push(mb["a-1.0.0"], bc, fleet.PushOptions(
            device=dev.device_id, transfer=small, terms=fleet.Terms(allow_downgrade=True, probation=QUICK),
            follow=fleet.Follow(timeout=60)))
        assert back.topic == T.model_desired(dev.device_id, "a") and back.ok and dev.version == "1.0.0"
        assert a.devices[1].version == "1.0.0" and b.devices[0].version == "1.1.0"
    finally:
        a.stop()
        b.stop()


@pytest.mark.broker
def test_rollout_of_one_model_leaves_the_other_alone(broker, mb):
    from fleet import rollout as ro
    from fleet.rollout_state import RolloutSettings

    a, b = _sim(broker, mb["a-1.0.0"], "pa", 2), _sim(broker, mb["b-1.0.0"], "pb", 3)
    said: list[str] = []
    try:
        rec = ro.start(mb["b-1.1.0"], BrokerConfig(url=broker.url), group="g", say=said.append,
                       settings=RolloutSettings(waves="1,100%", soak_s=2.0, baseline_s=2.0, wave_timeout_s=60.0,
                                                lease_s=10.0, probation=QUICK), previous_bundle=mb["b-1.0.0"],
                       chunk_size=4096)
        assert rec.status == "done" and rec.model == "b", rec.reason
        assert sorted(d for w in rec.waves for d in w.devices) == sorted(d.device_id for d in b.devices)
        assert "2 device(s) of group g do not serve model b: left out" in said
        readings = [r for w in rec.waves for r in w.readings.values()]
        assert all(r["verdict"] == "ok" and r["requests"] > 0 for r in readings), readings
        wait_until(lambda: set(b.versions().values()) == {"1.1.0"}, 15, what="every b device on 1.1.0")
        assert set(a.versions().values()) == {"1.0.0"} and not any(d.switched for d in a.devices)
        desired = _desired(broker)
        assert list(desired) == [T.group_model_desired("g", "b")] and desired[T.group_model_desired("g", "b")][
            "version"] == "1.1.0"
    finally:
        a.stop()
        b.stop()


@pytest.mark.broker
def test_signed_removal_unloads_the_model_and_fleet_status_lists_models(broker, mb, keys):
    import fleet
    from edgepack.cli import main

    sim = _sim(broker, mb["b-1.0.0"], "pb", 2, trusted_keys=(keys / "a.pub",))
    bc = BrokerConfig(url=broker.url)
    try:
        res = CliRunner().invoke(main, ["fleet", "status", "--broker", broker.url, "--json", "--listen", "1.5"])
        rows = json.loads(res.output)
        assert [[(m["name"], m["version"]) for m in r["models"]] for r in rows] == [[("b", "1.0.0")]] * 2
        assert all(m["p95_ms"] is not None for r in rows for m in r["models"])  # from the model's own window
        dev = sim.devices[0]
        unsigned = fleet.remove(bc, model="b", device=dev.device_id, wait=True, timeout=20)
        assert not unsigned.ok and "not signed" in unsigned.devices[dev.device_id]["error"] and dev.model
        signed = fleet.remove(bc, model="b", device=dev.device_id, wait=True, timeout=20, sign_key=keys / "a.key")
        assert signed.ok and signed.devices[dev.device_id]["state"] == "removed", signed.devices
        assert signed.desired["record_signature"] and signed.topic == T.model_desired(dev.device_id, "b")
        assert dev.model is None and dev.store.active() is None and sim.devices[1].version == "1.0.0"
        status = wait_until(lambda: (lambda r: r if r[0]["models"] == [] else None)(fleet.status(bc, listen_s=0.5)),
                            10, what="the status without the model")
        assert status[0]["model"] is None and status[1]["models"][0]["name"] == "b"
    finally:
        sim.stop()
