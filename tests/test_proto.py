"""The shared protocol package (edgeproto) and the floors: the agent, the fleet side and the
protocol import only downwards."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from edgeproto.bundleref import BundleRef, Limits, MqttTransfer, RecordError
from edgeproto.desired import Desired
from edgeproto.documents import (AgentStatus, AgentTelemetry, StatusDocument, TelemetryDocument, Totals, last_will,
                                 model_section)
from edgeproto.jobs import ProfileJob
from edgeproto.records import DeviceStatus, TelemetryWindow, UpdateEvent
from edgeproto.topics import DeviceTopics, Topics, shared


def _imported(stmt: str) -> set[str]:
    code = f"import json, sys\n{stmt}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def test_floors_import_only_downwards():
    heavy = {"tensorflow", "keras", "tf2onnx", "onnx"}
    proto = _imported("import edgeproto.topics, edgeproto.records, edgeproto.desired, edgeproto.jobs, "
                      "edgeproto.documents, edgeproto.mqtt, edgeproto.broker")
    assert not proto & (heavy | {"packager", "fleet", "device_agent"}), proto
    fleet = _imported("import fleet, fleet.cli, fleet.status, fleet.push, fleet.broker")
    assert not fleet & (heavy | {"packager", "device_agent"}), fleet


def test_topics_build_and_parse():
    t = Topics("site/v1")
    assert t.status("d1") == "site/v1/devices/d1/status" and t.telemetry() == "site/v1/devices/+/telemetry"
    assert t.group_desired("g") == "site/v1/groups/g/desired" == t.target_desired("groups/g")
    assert Topics.chunk(t.bundle("ab"), 3) == "site/v1/bundles/ab/chunks/3"
    assert t.parse_device("site/v1/devices/d1/telemetry") == ("d1", "telemetry")
    assert t.parse_device("other/v1/devices/d1/status") is None
    assert t.parse_device("site/v1/devices/d1/unknown") is None
    assert shared("collectors", t.telemetry()) == "$share/collectors/site/v1/devices/+/telemetry"
    d = DeviceTopics("site/v1", "d1")
    assert (d.status, d.desired, d.group_desired("g")) == (t.status("d1"), t.desired("d1"), t.group_desired("g"))


def test_records_read_leniently():
    st = DeviceStatus.from_dict("d1", {"online": "yes", "groups": ["a", 3], "model": {"name": "m", "version": 7},
                                       "ota": {"signed_updates": True, "key_serial": 2}})
    assert st.online is None and st.groups == ("a",) and st.model.name == "m" and st.model.version is None
    assert st.signed_updates is True and st.key_serial == 2
    assert DeviceStatus.from_dict("d2", "garbage").model is None
    tel = TelemetryWindow.from_dict("d1", {"inference": {"count": 10, "errors": 1, "latency_ms": {"p95": 2.5}},
                                           "system": {"cpu_percent": 12}})
    assert (tel.count, tel.errors, tel.nonfinite, tel.p95_ms) == (10, 1, 0, 2.5)  # nonfinite missing: 0
    assert tel.value("system.cpu_percent") == 12.0 and tel.value("system.nope") is None
    ev = UpdateEvent.from_dict({"update_id": "u1", "state": "rolled_back", "error": "slow"})
    assert ev.final and UpdateEvent.from_dict(ev.to_dict()) == ev
    assert UpdateEvent.from_dict(None) is None


SHA = "a" * 64
BUNDLE = {"name": "m", "version": "1.0.0", "sha256": SHA, "size": 10,
          "transfer": {"method": "mqtt", "topic": f"r/bundles/{SHA}", "chunk_size": 4, "chunks": 3,
                       "chunk_sha256": ["b" * 64] * 3}}
RECORDS = [(Desired, {"schema": "edgepack.desired/1", "update_id": "u1"}, "desired record"),
           (ProfileJob, {"schema": "edgepack.profile-job/1", "job_id": "j1", "target": "devices/d1"}, "profile job")]


@pytest.mark.parametrize("cls,head,what", RECORDS)
def test_desired_records_and_profile_jobs_name_a_bundle_alike(cls, head, what):
    rec = cls.parse(json.dumps({**head, **BUNDLE}).encode(), source="t", topic_prefix="r")
    assert rec.bundle == BundleRef(name="m", version="1.0.0", sha256=SHA, size=10, transfer=MqttTransfer(
        topic=f"r/bundles/{SHA}", chunk_size=4, chunks=3, chunk_sha256=("b" * 64,) * 3))
    assert rec.mismatch(SimpleNamespace(name="m", version="1.0.0"), named_by="it") is None
    assert rec.mismatch(SimpleNamespace(name="m", version="2.0.0"), named_by="the job") == \
        "the bundle is m 2.0.0, the job says m 1.0.0"
    for field, value, said in [("size", 0, "size 0 is outside"), ("version", "1.0", "version"),
                               ("sha256", "A" * 64, "sha256 must be 64 lowercase"), ("name", "a/b", "name must be"),
                               ("transfer", {"method": "ftp"}, "unknown transfer method"),
                               ("record_signature", [], "record_signature must be an object")]:
        with pytest.raises(RecordError, match=f"malformed {what} on t: {said}") as e:
            cls.parse(json.dumps({**head, **BUNDLE, field: value}).encode(), source="t", topic_prefix="r")
        assert e.value.update_id == next(iter(v for k, v in head.items() if k.endswith("_id")))
    with pytest.raises(RecordError, match=f"{what} on t is 2 bytes; at most 1 are accepted"):
        cls.parse(b"{}", source="t", limits=Limits(max_record_bytes=1))
    with pytest.raises(RecordError, match=f"{what} on t is not valid JSON"):
        cls.parse(b"{", source="t")


def test_status_and_telemetry_documents_of_agent_and_simulator():
    """One writer for both: the keys, values and order of the protocol, the agent's sections only
    when an agent writes (docs/schemas/)."""
    import jsonschema
    from pathlib import Path

    from edgebundle.manifest import Manifest, TensorSpec

    schemas = Path(__file__).resolve().parent.parent / "docs" / "schemas"
    man = Manifest(name="m", version="1.0.0", target={"name": "arm-cpu"}, format="tflite", precision="int8",
                   model_file="model.tflite", inputs=(TensorSpec("x", (1, 2), "float32"),),
                   outputs=(TensorSpec("y", (1, 2), "float32"),), runtime={"name": "litert"})
    model = model_section(man, bundle_sha256=SHA, interface="0123456789abcdef", runtime="litert", runtime_version="1.4",
                          provider="xnnpack", notes=[])
    assert list(model) == ["name", "version", "bundle_sha256", "interface", "target", "format", "precision",
                           "runtime", "runtime_version", "provider", "notes"] and model["target"] == "arm-cpu"
    upd = {"state": "committed", "previous": {"version": "0.9.0"}}
    buf = {"queued": 0, "dropped_total": 0}
    common = dict(device_id="d1", ts="t", groups=("g",), model=model, model_error=None, update=upd, ota={"k": 1})
    agent = StatusDocument(**common, agent_version="0.1.0", agent=AgentStatus(
        state={"state": "serving"}, started="s", buffer=buf, profile=None, platform={}, api={})).to_dict()
    assert list(agent) == ["device_id", "online", "reason", "ts", "state", "groups", "agent_version", "started",
                           "model", "model_error", "previous_model", "update", "ota", "buffer", "profile", "platform",
                           "api"]
    assert agent["previous_model"] == {"version": "0.9.0"} and agent["online"] is True and agent["profile"] is None
    sim = StatusDocument(**common, agent_version="sim", sim={"faults": [], "base_ms": 10.0}).to_dict()
    assert list(sim) == ["device_id", "online", "reason", "ts", "groups", "agent_version", "model", "model_error",
                         "previous_model", "update", "ota", "sim"]
    for doc in (agent, sim, last_will("d1")):
        jsonschema.validate(doc, json.loads((schemas / "status.schema.json").read_text()))
    window = {"count": 0, "errors": 0, "nonfinite": 0, "window_s": 1.0, "throughput_ips": 0.0, "latency_ms": None}
    tel = TelemetryDocument(device_id="d1", ts="t", seq=3, inference=window,
                            totals=Totals(count=5, errors=1, nonfinite=0), system={}, model_name="m",
                            model_version="1.0.0",
                            agent=AgentTelemetry(buffer=buf, profile=None)).to_dict()
    assert list(tel) == ["device_id", "ts", "seq", "inference", "totals", "system", "buffer", "profile", "model"]
    assert tel["totals"] == {"count": 5, "errors": 1, "nonfinite": 0}
    assert tel["model"] == {"name": "m", "version": "1.0.0"}
    simtel = TelemetryDocument(device_id="d1", ts="t", seq=3, inference=window, totals=Totals(count=5, errors=1),
                               system={}).to_dict()
    assert simtel == {"device_id": "d1", "ts": "t", "seq": 3, "inference": window, "totals": {"count": 5, "errors": 1},
                      "system": {}, "model": None}


def test_model_topics_targets_and_removals():
    """Several models per device: a model's topics, its `target`, and a removal record."""
    from edgeproto.desired import Removal, parse_record
    from edgeproto.topics import model_of, target

    t, dt = Topics("r/v1"), DeviceTopics("r/v1", "d1")
    assert dt.model_desired("cls") == "r/v1/devices/d1/models/cls/desired" == t.target_desired(
        target("devices", "d1", "cls"))
    assert dt.model_desired() == "r/v1/devices/d1/models/+/desired"
    assert t.group_model_desired("g", "cls") == "r/v1/groups/g/models/cls/desired"
    assert model_of(dt.model_desired("cls")) == "cls" and model_of(dt.desired) is None
    assert t.parse_device(dt.model_desired("cls")) is None  # not a device-level kind
    doc = {"schema": "edgepack.desired/1", "update_id": "u1", "remove": True, "issued": "2026-01-01T00:00:00Z",
           "target": "devices/d1/models/cls"}
    rec = parse_record(json.dumps(doc).encode(), source="x")
    assert isinstance(rec, Removal) and rec.target == "devices/d1/models/cls" and rec.to_dict() == doc
    assert parse_record(b"", source="x") is None
    for bad, why in (({**doc, "remove": False}, "remove must be true"), ({**doc, "name": "m"}, "no bundle"),
                     ({**doc, "target": "devices/d1/models/a/b"}, "target must be")):
        with pytest.raises(RecordError, match=why):
            parse_record(json.dumps(bad).encode(), source="x")


def test_status_and_telemetry_seen_through_one_model():
    """A fleet reads one model of a device; an old agent's one model answers for any name."""
    old = DeviceStatus.from_dict("d", {"model": {"name": "a", "version": "1.0.0"}, "update": {"state": "committed"}})
    assert old.for_model("b").model.version == "1.0.0" and old.for_model("b").update.state == "committed"
    new = DeviceStatus.from_dict("d", {"model": {"name": "a", "version": "1.0.0"}, "models": {
        "a": {"model": {"name": "a", "version": "1.0.0"}, "update": None},
        "b": {"model": {"name": "b", "version": "2.0.0"}, "update": {"state": "probation", "update_id": "u"}}}})
    assert new.for_model("b").model.version == "2.0.0" and new.for_model("b").update.update_id == "u"
    assert new.for_model("a").update is None and new.for_model("zz").model is None
    assert new.for_model(None).model.name == "a"
    raw = {"inference": {"count": 10, "errors": 1}, "model": {"name": "a", "version": "1.0.0"}, "models": {
        "a": {"version": "1.0.0", "inference": {"count": 4, "errors": 0, "latency_ms": {"p95": 2.0}}},
        "b": {"version": "2.0.0", "inference": {"count": 6, "errors": 1, "latency_ms": {"p95": 5.0}}}}}
    w = TelemetryWindow.from_dict("d", raw)
    assert (w.count, w.for_model("b").count, w.for_model("b").p95_ms) == (10, 6, 5.0)
    assert w.for_model("b").model_version == "2.0.0" and w.for_model("zz").count == 0
    assert TelemetryWindow.from_dict("d", {"inference": {"count": 3}}).for_model("b").count == 3
    ev = UpdateEvent(update_id="u", state="removed", model="b")
    assert UpdateEvent.from_dict(ev.to_dict()) == ev and ev.final
