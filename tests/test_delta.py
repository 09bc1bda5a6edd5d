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
    assert CdcParams.for_size(14 << 20).avg_size == 16384
    assert CdcParams.for_size(1 << 30).avg_size == 1 << 20
    p = CdcParams.for_size(14 << 20)
    assert p.suits(15 << 20) and not p.suits(2 << 30)  # a next version of similar size is cut alike


def test_cdc_record_round_trips_and_refuses_what_does_not_add_up(tmp_path):
    data = os.urandom(100_000)
    t = _transfer(data, CdcParams(512, 2048, 16384), tmp_path)
    doc = {"schema": "edgepack.desired/1", **{k: v for k, v in _desired(data, t).to_dict().items() if k != "schema"}}
    back = Desired.parse(json.dumps(doc).encode(), source="t", topic_prefix=ROOT)
    assert back.transfer == t and sum(t.chunk_sizes) == len(data)
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

class FakeFetcher:
    """Serves `pull` from a dict of retained chunks, as MqttChunkFetcher would from the broker."""

    window = 16

    def __init__(self, retained: dict[str, bytes]):
        self.retained, self.asked = retained, []

    def pull(self, job, *, cancelled, count=0):
        for k in job.keys:
            sha = job.sha256(k)
            self.asked.append(sha)
            job.store(k, self.retained[sha])


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
                           "resumed": 0}


def test_fleet_index_publishes_new_chunks_and_drops_unnamed_bundles(tmp_path):
    from fleet.delta import ModelIndex, cost

    a = _transfer(os.urandom(50_000), CdcParams(512, 2048, 16384), tmp_path)
    ix = {"m": ModelIndex()}
    assert ix["m"].take_over("A" * 64, a, "t/devices/d1/models/m/desired") == set()
    data = (tmp_path / "blob").read_bytes()
    b = _transfer(data[:30_000] + os.urandom(2000) + data[30_000:], a.params, tmp_path)
    c = cost(b, ix, running={"d1": "A" * 64, "d2": None})
    assert c.devices["d2"] is None and 0 < c.devices["d1"] == c.publish_bytes < 0.2 * c.bundle_bytes
    gone = ix["m"].take_over("B" * 64, b, "t/devices/d1/models/m/desired")
    assert gone == {"A" * 64} and set(ix["m"].bundles) == {"B" * 64}
    assert ModelIndex.from_doc(json.loads(json.dumps(ix["m"].to_doc()))).bundles == ix["m"].bundles
