"""Delta updates (content-defined chunks): the record, the bundle layout that keeps unchanged
tensors byte-identical, the device's assembly from held and fetched chunks, the fleet's index;
then real agents on a real broker: a last-layer update fetches a fraction, a device with nothing
fetches everything, a corrupt local chunk is fetched instead, a kill mid-assembly resumes, and an
old-style record still works."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgebundle.cdc import CdcParams, chunk_file
from edgeproto.desired import CdcTransfer, Desired, RecordError
from otakit import FakeFetcher

ROOT = "edgepack/v1"


def _transfer(data: bytes, params: CdcParams, tmp_path: Path) -> CdcTransfer:
    f = tmp_path / "blob"
    f.write_bytes(data)
    chunks = chunk_file(f, params)
    return CdcTransfer(topic=f"{ROOT}/chunks", params=params, chunk_sha256=tuple(c.sha256 for c in chunks),
                       chunk_sizes=tuple(c.size for c in chunks))


def _desired(data: bytes, t: CdcTransfer) -> Desired:
    return Desired(update_id="u1", name="m", version="1.0.0", sha256=hashlib.sha256(data).hexdigest(),
                   size=len(data), transfer=t)


# ---- fast: parameters, record, bundle layout ----

def test_params_scale_with_the_bundle_and_stay_within_bounds():
    assert CdcParams.for_size(40_000) == CdcParams(512, 2048, 16384)
    assert CdcParams.for_size(14 << 20).avg_size == 65536
    assert CdcParams.for_size(1 << 30).avg_size == 1 << 20
    p = CdcParams.for_size(14 << 20)
    assert p.suits(15 << 20) and not p.suits(2 << 30)  # a next version of similar size is cut alike


def test_cdc_record_round_trips_and_refuses_what_does_not_add_up(tmp_path):
    data = os.urandom(100_000)
    t = _transfer(data, CdcParams(512, 2048, 16384), tmp_path)
    doc = {"schema": "edgepack.desired/1", **{k: v for k, v in _desired(data, t).to_dict().items() if k != "schema"}}
    back = Desired.parse(json.dumps(doc).encode(), source="t", topic_prefix=ROOT)
    assert back.transfer == t and sum(t.chunk_sizes) == len(data)
    import jsonschema

    schema = json.loads((Path(__file__).parent.parent / "docs" / "schemas" / "desired.schema.json").read_text())
    jsonschema.validate(doc, schema)
    bad = {"chunk_sizes": [*t.chunk_sizes[:-1], t.chunk_sizes[-1] + 1], "topic": f"{ROOT}/bundles",
           "chunking": {"min_size": 512, "avg_size": 2048, "max_size": 16}}
    for field, value in bad.items():
        wrong = {**doc, "transfer": {**doc["transfer"], field: value}}
        with pytest.raises(RecordError, match=field.split("_")[0]):
            Desired.parse(json.dumps(wrong).encode(), source="t", topic_prefix=ROOT)
    big = {**doc, "transfer": {**doc["transfer"], "chunk_sizes": [len(data)], "chunk_sha256": [doc["sha256"]]}}
    with pytest.raises(RecordError, match="chunk_sizes"):  # one chunk over the parameters' max_size
        Desired.parse(json.dumps(big).encode(), source="t", topic_prefix=ROOT)


def test_model_members_are_stored_and_deflated_bundles_still_load(tmp_path):
    from edgebundle.archive import verify_bundle
    from tinybundles import log_bundle

    new = log_bundle(tmp_path)
    with zipfile.ZipFile(new) as z:
        kinds = {i.filename: i.compress_type for i in z.infolist()}
        old = tmp_path / "old.edgepack"  # as bundles were written before: every member deflated
        with zipfile.ZipFile(old, "w", zipfile.ZIP_DEFLATED) as zout:
            for name in kinds:
                zout.writestr(name, z.read(name))
    assert kinds == {"manifest.json": zipfile.ZIP_DEFLATED, "model.onnx": zipfile.ZIP_STORED}
    assert verify_bundle(old).manifest.files == verify_bundle(new).manifest.files


# ---- fast: the device's assembly (a fake fetcher serves the broker's chunks) ----

class Held:
    def __init__(self, store):
        self.store = store

    def chunks(self, params):
        return self.store.chunks(params)


def _versions(tmp_path):
    """An old and a new 'bundle' (stored in a Store) sharing all but a 3 KB region."""
    from device_agent.store import Store

    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    new = old[:120_000] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + old[123_000:]
    store = Store(tmp_path / "data")
    (store.bundles / "aaaa-old.edgepack").write_bytes(old)
    return store, old, new


def test_assembly_copies_held_chunks_and_fetches_only_the_rest(tmp_path):
    from device_agent.ota.delta import fetch_delta

    store, old, new = _versions(tmp_path)
    params = CdcParams(512, 2048, 16384)
    t = _transfer(new, params, tmp_path)
    d = _desired(new, t)
    fetcher = FakeFetcher({s: new[o:o + n] for s, o, n in zip(t.chunk_sha256, t.offsets(), t.chunk_sizes)})
    seen = []
    for w in ("w1", "w2"):
        (tmp_path / w).mkdir()
    out = fetch_delta(fetcher, d, tmp_path / "w1", local=store, progress=lambda *a: seen.append(a),
                      cancelled=lambda: False)
    assert out.read_bytes() == new
    held = {c.sha256 for c in chunk_file(store.bundles / "aaaa-old.edgepack", params)}
    expect = sum(n for s, n in zip(t.chunk_sha256, t.chunk_sizes) if s not in held)
    done, total, stats = seen[-1]
    assert (done, total) == (len(new), len(new)) and stats["fetched"] == expect < 0.15 * len(new)
    assert stats["reused"] == len(new) - expect
    assert list(store.chunk_lists.glob("aaaa-old.edgepack.*.json"))  # the cut is kept for next time

    # a held chunk whose bytes went bad (same size and mtime: the cached list still names it) is fetched
    path = store.bundles / "aaaa-old.edgepack"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[50_000] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = next(c for c in chunk_file(tmp_path / "blob", params) if c.offset <= 50_000 < c.offset + c.size)
    seen.clear()
    fetch_delta(fetcher, d, tmp_path / "w2", local=store, progress=lambda *a: seen.append(a), cancelled=lambda: False)
    assert (tmp_path / "w2" / "bundle.edgepack").read_bytes() == new
    assert seen[-1][2]["fetched"] == expect + bad.size


def test_device_with_nothing_fetches_every_chunk_once(tmp_path):
    from device_agent.ota.delta import fetch_delta
    from device_agent.store import Store

    data = bytes(60_000) + os.urandom(40_000)  # the zeros repeat one chunk: fetched once, written to each place
    t = _transfer(data, CdcParams(512, 2048, 16384), tmp_path)
    fetcher = FakeFetcher({s: data[o:o + n] for s, o, n in zip(t.chunk_sha256, t.offsets(), t.chunk_sizes)})
    seen = []
    (tmp_path / "w").mkdir()
    out = fetch_delta(fetcher, _desired(data, t), tmp_path / "w", local=Store(tmp_path / "empty"),
                      progress=lambda *a: seen.append(a), cancelled=lambda: False)
    assert out.read_bytes() == data
    assert len(fetcher.asked) == len(set(t.chunk_sha256)) < len(t.chunk_sha256)
    assert seen[-1][2] == {"fetched": sum(dict(zip(t.chunk_sha256, t.chunk_sizes)).values()), "reused": 0,
                           "patched": 0, "resumed": 0}


def test_fleet_index_publishes_new_chunks_and_drops_unnamed_bundles(tmp_path):
    from fleet.delta import ModelIndex, cost

    rng = np.random.default_rng(3)
    a = _transfer(rng.bytes(200_000), CdcParams(512, 2048, 16384), tmp_path)
    ix = {"m": ModelIndex()}
    assert ix["m"].take_over("A" * 64, a, "t/devices/d1/models/m/desired") == set()
    data = (tmp_path / "blob").read_bytes()
    b = _transfer(data[:30_000] + rng.bytes(2000) + data[30_000:], a.params, tmp_path)
    c = cost(b, ix, running={"d1": "A" * 64, "d2": None})
    assert c.devices["d2"] is None and 0 < c.devices["d1"] == c.publish_bytes < 0.2 * c.bundle_bytes
    gone = ix["m"].take_over("B" * 64, b, "t/devices/d1/models/m/desired")
    assert gone == {"A" * 64} and set(ix["m"].bundles) == {"B" * 64}
    # a rollout names its bundle by its own topic until the group's record takes it over
    assert ix["m"].take_over("A" * 64, a, "t/rollouts/r1") == set() and len(ix["m"].bundles) == 2
    assert ix["m"].take_over("A" * 64, a, "t/devices/d1/models/m/desired", release=("t/rollouts/r1",)) == {"B" * 64}
    assert ix["m"].bundles["A" * 64]["topics"] == ["t/devices/d1/models/m/desired"]
    assert ix["m"].release(("t/devices/d1/models/m/desired",)) == {"A" * 64} and not ix["m"].bundles
    assert ModelIndex.from_doc(json.loads(json.dumps(ix["m"].to_doc()))).bundles == ix["m"].bundles


# ---- real agents on a real broker ----

def _variant(model: Path, dest: Path, *, layers: str, seed: int) -> Path:
    """The model with the last layer's weights (`layers="last"`) or every layer's changed, as a
    fine-tuned head or a full retraining would leave them."""
    import keras

    m = keras.models.load_model(model)
    rng = np.random.default_rng(seed)
    for layer in m.layers[-1:] if layers == "last" else m.layers:
        layer.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in layer.get_weights()])
    m.save(dest)
    return dest


@pytest.fixture(scope="module")
def deltas(digits, keys, tmp_path_factory):
    """digits fp32 bundles, signed: 1.0.0; 1.1.0 with the last layer retrained; 2.0.0 fully retrained."""
    from packager.build import BuildOptions, build
    from targets import Precision

    out = tmp_path_factory.mktemp("deltas")
    sources = {"1.0.0": digits["model"], "1.1.0": _variant(digits["model"], out / "head.keras", layers="last", seed=1),
               "2.0.0": _variant(digits["model"], out / "all.keras", layers="all", seed=2)}
    made = {}
    for version, model in sources.items():
        res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=out / version, name="digits",
                                 version=version, precision=Precision.FP32, validation=str(digits["validation"]),
                                 bench_runs=5, bench_seconds=0.2, speed_gate=False, sign_key=keys / "a.key"))
        assert res.ok, res.results[0].error
        made[version] = res.results[0].bundle
    return made


def _push(broker, bundle, keys, **flags):
    from otakit import push

    return push(broker, bundle, device="dev1", wait=True, timeout=90, sign=keys / "a.key", **flags)


def _expected_fetch(new: Path, held: list[Path]) -> tuple[int, CdcParams]:
    params = CdcParams.for_size(new.stat().st_size)
    have = {c.sha256 for b in held for c in chunk_file(b, params)}
    return sum(dict((c.sha256, c.size) for c in chunk_file(new, params) if c.sha256 not in have).values()), params


def _delta_push(broker, bundle, keys):
    """push --delta --wait; returns the result and the update's last download progress."""
    progress = []
    res = _push(broker, bundle, keys, delta=True,
                progress=lambda _d, e: progress.append(e["progress"]) if e.get("progress") else None)
    assert res.ok, res.devices
    return res, progress[-1]


@pytest.mark.slow
@pytest.mark.agent
def test_last_layer_update_fetches_a_fraction_and_old_records_still_work(broker, deltas, keys, tmp_path):
    from otakit import agent, version

    a = agent(tmp_path, broker, deltas["1.0.0"], keys)
    try:
        new = deltas["1.1.0"]
        expect, _ = _expected_fetch(new, [deltas["1.0.0"]])
        res, last = _delta_push(broker, new, keys)
        size = new.stat().st_size
        assert last["fetched"] == expect and last["fetched"] + last["reused"] == size, last
        assert last["fetched"] < 0.5 * size, last  # digits is tiny: manifest, golden and zip directory weigh
        assert res.cost.devices["dev1"] is None  # the index did not know the bundle dev1 started with
        assert version(a) == "1.1.0"
        res = _push(broker, deltas["2.0.0"], keys)  # an old-style record (fixed-size chunks) after a delta
        assert res.ok and version(a) == "2.0.0", res.devices
    finally:
        a.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_device_with_nothing_fetches_everything(broker, deltas, keys, tmp_path):
    from agents import wait_until
    from otakit import agent, version

    a = agent(tmp_path, broker, None, keys, start=False).start(wait_ready=False)  # serves nothing: never ready
    try:
        wait_until(lambda: a._get("/v2/health/live") == 200, 30, what="agent live")
        new = deltas["1.1.0"]
        _, last = _delta_push(broker, new, keys)
        assert last["reused"] == 0 and last["fetched"] == _expected_fetch(new, [])[0] <= new.stat().st_size
        assert version(a) == "1.1.0"
    finally:
        a.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_corrupt_local_chunk_is_fetched_instead(broker, deltas, keys, tmp_path):
    from device_agent.store import Store
    from otakit import agent, version

    a = agent(tmp_path, broker, deltas["1.0.0"], keys)
    try:
        new = deltas["1.1.0"]
        expect, params = _expected_fetch(new, [deltas["1.0.0"]])
        store = Store(tmp_path / "data")
        held = next(store.bundles.glob("*.edgepack"))
        view = store.chunks(params)  # the list the agent will find cached: it still names the chunk
        shared = {c.sha256 for c in chunk_file(new, params)}
        sha, (path, offset, size) = next((s, v) for s, v in view.items() if s in shared and v[2] > 1024)
        st = held.stat()
        with open(held, "r+b") as f:
            f.seek(offset + size // 2)
            byte = f.read(1)
            f.seek(offset + size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(held, ns=(st.st_atime_ns, st.st_mtime_ns))
        _, last = _delta_push(broker, new, keys)
        assert last["fetched"] == expect + size, (last, expect, size)
        assert version(a) == "1.1.0"
    finally:
        a.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_kill_during_assembly_resumes_to_a_verified_commit(broker, deltas, keys, tmp_path):
    from agents import Watcher, wait_until
    from edgeproto.desired import sign_record
    from edgebundle.signing import load_private_key
    from edgeproto.topics import Topics
    from fleet.delta import publish_delta
    from fleet.records import make_record
    from fleet.transfer import prepare
    from otakit import Publisher, agent, publish_record, state, version

    a = agent(tmp_path, broker, deltas["1.0.0"], keys)
    new = deltas["1.1.0"]
    p = prepare(new, Topics(ROOT), indexes={})
    doc = make_record(p, target="devices/dev1", update_id="delta-kill", issued=_now())
    publish_record(broker, sign_record(doc, load_private_key(keys / "a.key")))  # the record, no chunk yet
    done = tmp_path / "data" / "downloads" / p.sha256[:16] / "chunks.done"
    wait_until(lambda: done.is_file() and len(done.read_text().split()) >= 3, 30, what="held chunks copied")
    a.stop("kill")
    assert state(tmp_path / "data") == "downloading"
    pub = Publisher(broker.url)
    try:
        publish_delta(_Client(pub), new, p.transfer, skip=set())
    finally:
        pub.stop()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/events"])
    a2 = agent(tmp_path, broker, None, keys)
    try:
        wait_until(lambda: version(a2) == "1.1.0" and state(tmp_path / "data") == "committed", 60,
                   what="resumed delta update")
        prog = [e["progress"] for e in w.of("dev1/events") if e.get("update_id") == "delta-kill" and e.get("progress")]
        assert prog[-1]["resumed"] > 0 and prog[-1]["bytes"] == new.stat().st_size, prog[-1]
    finally:
        w.stop()
        a2.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_profile_job_with_a_cdc_transfer_copies_held_chunks(broker, deltas, keys, tmp_path):
    """A profile job naming content-defined chunks (it once failed with a TypeError): only the
    chunks the serving bundle lacks are on the broker, so the job can only finish by copying."""
    from agents import Watcher
    from edgebundle.signing import load_private_key
    from edgeproto.desired import sign_record
    from edgeproto.jobs import SCHEMA
    from edgeproto.topics import Topics
    from fleet.delta import publish_delta
    from fleet.transfer import prepare
    from otakit import Publisher, agent, version

    a = agent(tmp_path, broker, deltas["1.0.0"], keys)
    new = deltas["1.1.0"]
    p = prepare(new, Topics(ROOT), indexes={})
    held = {c.sha256 for c in chunk_file(deltas["1.0.0"], p.transfer.params)}
    job = sign_record({"schema": SCHEMA, "job_id": "cdc-job", "target": "devices/dev1", "issued": _now(),
                       "name": p.name, "version": p.version, "sha256": p.sha256, "size": p.size,
                       "transfer": p.transfer.to_dict(), "bench": {"runs": 20, "warmup": 2, "max_seconds": 1.0}},
                      load_private_key(keys / "a.key"))
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/profile/result"])
    pub = Publisher(broker.url)
    try:
        assert publish_delta(_Client(pub), new, p.transfer, skip=held) < len(set(p.transfer.chunk_sha256))
        pub.publish(f"{ROOT}/devices/dev1/profile/job", job, retain=False)
        r = w.wait("dev1/profile/result", lambda m: m.get("job_id") == "cdc-job" and m.get("state") not in
                   ("accepted", "running"), timeout=60)
        assert r["state"] == "done" and r["figures"]["golden_ok"] is True, r
        assert version(a) == "1.0.0"  # measured, never activated
    finally:
        pub.stop()
        w.stop()
        a.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_delta_rollout_says_each_device_cost_and_fetches_only_that(broker, deltas, keys, tmp_path):
    """rollout --delta to a group of 2 whose record a delta push made: the cost said per device
    before publishing is what each device fetches; once done the group's record names the new
    bundle in the model's index, and the old version's chunks left the index."""
    from agents import Watcher
    from edgeproto.broker import BrokerConfig
    from fleet import rollout as ro
    from fleet.delta import ModelIndex
    from fleet.gates import Gates
    from fleet.records import Signer
    from fleet.rollout_state import RolloutSettings
    from otakit import QUICK, agent, push, version

    old, new = deltas["1.0.0"], deltas["1.1.0"]
    agents = [agent(tmp_path, broker, old, keys, device=f"d{i}", group="g", name=f"data{i}") for i in range(2)]
    w = Watcher(broker.url, [f"{ROOT}/devices/+/events"])
    said: list[str] = []
    try:
        push(broker, old, group="g", sign=keys / "a.key", delta=True)  # the group's record, and the index
        settings = RolloutSettings(waves="1,100%", soak_s=1.0, baseline_s=0.5, wave_timeout_s=60.0, lease_s=3.0,
                                   probation=QUICK, gates=Gates(max_latency_ratio=50.0, min_requests=0))
        rec = ro.start(new, BrokerConfig(url=broker.url), group="g", settings=settings,
                       signer=Signer.load(keys / "a.key"), delta=True, say=said.append)
        assert rec.status == "done", rec.reason
        assert [version(a) for a in agents] == ["1.1.0", "1.1.0"]
        expect, _ = _expected_fetch(new, [old])  # the chunks 1.0.0 lacks; patches against it cost less
        size = new.stat().st_size
        for dev in ("d0", "d1"):
            cost = next(int(line.split()[2]) for line in said if line.startswith(f"  {dev}: fetches "))
            prog = [e["progress"] for e in w.of(f"{dev}/events") if e.get("progress") and e.get("version") == "1.1.0"]
            assert prog[-1]["fetched"] == cost < 0.6 * expect, (prog[-1], cost, expect)
            assert prog[-1]["reused"] == size - expect and 0 < prog[-1]["patched"] <= expect, prog[-1]
        ix = Watcher(broker.url, [f"{ROOT}/chunks/index/digits"])
        try:
            doc = ix.wait("index/digits", lambda d: isinstance(d, dict))
        finally:
            ix.stop()
        bundles = ModelIndex.from_doc(doc).bundles
        assert [b["topics"] for b in bundles.values()] == [[f"{ROOT}/groups/g/models/digits/desired"]], bundles
    finally:
        w.stop()
        for a in agents:
            a.stop()


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Client:
    """A bare paho publisher as fleet.delta.publish_delta's client (publish returns an info)."""

    def __init__(self, pub):
        self.pub = pub

    def publish(self, topic, payload, *, qos, retain):
        return self.pub.c.publish(topic, payload, qos=qos, retain=retain)
