"""Chunk patches (edgebundle.patch): a missing chunk encoded against the chunks of the same region
the device holds. The codec (round trip, shifted and multi-segment content, damaged patches refused
without inflating more than the chunk), the planner, the record's `patches`, the fleet's cost, and
the device's assembly: patches used where its bases are held, the chunk fetched instead where a
base is damaged here or a patch does not decode to the chunk."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgebundle import patch
from edgebundle.cdc import CdcParams, chunk_file
from edgeproto.bundleref import Patch
from edgeproto.desired import CdcTransfer, Desired, RecordError
from otakit import FakeFetcher

ROOT = "edgepack/v1"
PARAMS = CdcParams(512, 2048, 16384)


def _chunks(data: bytes, path: Path, params: CdcParams = PARAMS) -> list:
    path.write_bytes(data)
    return chunk_file(path, params)


def _old_new(seed: int = 0) -> tuple[bytes, bytes]:
    """200 KB of weights-like bytes; the new version grew its header by 18 bytes (a re-deflated
    manifest) and changed 300 bytes in two places, as a retrained head does."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    new = bytearray(old[:5000] + rng.bytes(18) + old[5000:])
    new[60_000:60_200] = rng.bytes(200)
    new[150_000:150_100] = rng.bytes(100)
    return old, bytes(new)


def test_codec_round_trips_shifted_and_long_chunks():
    rng = np.random.default_rng(1)
    source = rng.bytes(100_000)
    # a 60 KB chunk (4 segments) that sat 7 KB further on, 40 bytes changed in it
    new = bytearray(source[37_000:97_000])
    new[30_000:30_040] = rng.bytes(40)
    enc = patch.encode(bytes(new), source, anchor=30_000)
    assert patch.decode(enc, source, size=len(new)) == new
    assert len(enc) < 0.015 * len(new), len(enc)  # the changed bytes, matches and framing, not the chunk
    unrelated = rng.bytes(5000)  # nothing in common: a patch is about as big as the chunk
    enc = patch.encode(unrelated, source, anchor=0)
    assert patch.decode(enc, source, size=5000) == unrelated and len(enc) >= 4900
    assert patch.decode(patch.encode(b"x" * 10, b"", anchor=0), b"", size=10) == b"x" * 10


def test_damaged_patches_are_refused_not_inflated():
    rng = np.random.default_rng(2)
    source = rng.bytes(20_000)
    chunk = source[2000:12_000]
    enc = patch.encode(chunk, source, anchor=2000)
    bad = [b"", b"EPZ0" + enc[4:], enc[:-1], enc + b"\0", enc[:6] + b"\xff\xff\xff\x7f" + enc[10:]]
    for i in range(len(enc) - 1, 6, -max(1, len(enc) // 40)):  # flipped bytes all through it
        bad.append(enc[:i] + bytes([enc[i] ^ 0x5A]) + enc[i + 1:])
    for b in bad:
        try:
            out = patch.decode(b, source, size=len(chunk))
        except ValueError:
            continue
        assert len(out) == len(chunk)  # decoded to something: never longer; its sha256 then decides
    with pytest.raises(ValueError):
        patch.decode(enc, source, size=len(chunk) - 1)  # a size other than the record's
    # a segment that says it inflates to 0 bytes (zlib would take 0 as "no limit") over a stream of
    # 8 MB of zeros: refused after one byte, not inflated
    import struct
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb_stream = z.compress(bytes(8 << 20)) + z.flush()
    bomb = b"EPZ1" + struct.pack("<H", 1) + struct.pack("<IIII", 0, 0, 0, len(bomb_stream)) + bomb_stream
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ValueError):
        patch.decode(bomb, source, size=len(chunk))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < len(bomb) + (1 << 20), peak
    with pytest.raises(ValueError):
        patch.decode(enc, source[:1000], size=len(chunk))  # a dictionary slice past the source


def test_plan_finds_the_old_region_across_a_shift(tmp_path):
    old, new = _old_new()
    oc, nc = _chunks(old, tmp_path / "old"), _chunks(new, tmp_path / "new")
    held = {c.sha256: old[c.offset:c.offset + c.size] for c in oc}
    plans = patch.plan([(c.sha256, c.size) for c in nc], [(c.sha256, c.size) for c in oc])
    missing = [c for c in nc if c.sha256 not in held]
    assert set(plans) == {c.sha256 for c in missing}
    total = 0
    for c in missing:
        bases, anchor = plans[c.sha256]
        assert 1 <= len(bases) <= 4 and all(b in held for b in bases)
        source = b"".join(held[b] for b in bases)
        enc = patch.encode(new[c.offset:c.offset + c.size], source, anchor=anchor)
        assert patch.decode(enc, source, size=c.size) == new[c.offset:c.offset + c.size]
        total += len(enc)
    assert total < 0.25 * sum(c.size for c in missing), (total, sum(c.size for c in missing))
    assert patch.plan([("a" * 64, 10)], []) == {}  # nothing held: nothing to patch against
    # repeated chunks (zero tensors): the shift comes from the occurrence nearest the new offset
    z, a, b, b2, c = ("z" * 64, 100), ("a" * 64, 100), ("b" * 64, 100), ("e" * 64, 100), ("c" * 64, 100)
    assert patch.plan([z, a, z, b2, c], [z, a, z, b, c], margin=0) == {b2[0]: ((b[0],), 0)}


def _transfer(chunks, patches=()) -> CdcTransfer:
    return CdcTransfer(topic=f"{ROOT}/chunks", params=PARAMS, chunk_sha256=tuple(c.sha256 for c in chunks),
                       chunk_sizes=tuple(c.size for c in chunks), patches=tuple(patches))


def _patched(old: bytes, new: bytes, tmp_path: Path) -> tuple[CdcTransfer, dict[str, bytes]]:
    """The new version's transfer with a patch per missing chunk, and every retained payload."""
    oc, nc = _chunks(old, tmp_path / "old.bin"), _chunks(new, tmp_path / "new.bin")
    held = {c.sha256: old[c.offset:c.offset + c.size] for c in oc}
    retained = {c.sha256: new[c.offset:c.offset + c.size] for c in nc}
    patches = []
    for sha, (bases, anchor) in patch.plan([(c.sha256, c.size) for c in nc], [(c.sha256, c.size) for c in oc]).items():
        enc = patch.encode(retained[sha], b"".join(held[b] for b in bases), anchor=anchor)
        retained[hashlib.sha256(enc).hexdigest()] = enc
        patches.append(Patch(chunk=sha, bases=bases, sha256=hashlib.sha256(enc).hexdigest(), size=len(enc)))
    return _transfer(nc, patches), retained


def test_record_carries_patches_and_refuses_bad_ones(tmp_path):
    import jsonschema

    old, new = _old_new()
    t, _ = _patched(old, new, tmp_path)
    d = Desired(update_id="u1", name="m", version="1.0.0", sha256=hashlib.sha256(new).hexdigest(), size=len(new),
                transfer=t)
    doc = d.to_dict()
    assert Desired.parse(json.dumps(doc).encode(), source="t", topic_prefix=ROOT).transfer == t and t.patches
    schema = json.loads((Path(__file__).parent.parent / "docs" / "schemas" / "desired.schema.json").read_text())
    jsonschema.validate(doc, schema)
    first = doc["transfer"]["patches"][0]
    # (the schema cannot say "one of chunk_sha256" or "smaller than its chunk": only the parser does)
    for wrong, match, in_schema in (({**first, "chunk": "f" * 64}, "chunk", False), ({**first, "from": []}, "from", True),
                                    ({**first, "size": 10 ** 9}, "size", False), ({**first, "extra": 1}, "exactly", True),
                                    ({**first, "sha256": "x"}, "sha256", True)):
        bad = {**doc, "transfer": {**doc["transfer"], "patches": [wrong]}}
        with pytest.raises(RecordError, match=match):
            Desired.parse(json.dumps(bad).encode(), source="t", topic_prefix=ROOT)
        if in_schema:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
    # a record without patches is as before (old pushers), and to_dict leaves the field out
    plain = _transfer(_chunks(new, tmp_path / "n2"))
    assert "patches" not in plain.to_dict()


def _assemble(store, t: CdcTransfer, new: bytes, retained: dict[str, bytes], work: Path) -> tuple[dict, list]:
    from device_agent.ota.delta import fetch_delta

    work.mkdir()
    seen = []
    fetcher = FakeFetcher(retained)
    d = Desired(update_id="u1", name="m", version="1.0.0", sha256=hashlib.sha256(new).hexdigest(), size=len(new),
                transfer=t)
    out = fetch_delta(fetcher, d, work, local=store, progress=lambda *a: seen.append(a), cancelled=lambda: False)
    assert out.read_bytes() == new
    return seen[-1][2], fetcher.asked


def test_device_fetches_patches_and_falls_back_to_chunks(tmp_path):
    from device_agent.store import Store

    old, new = _old_new()
    t, retained = _patched(old, new, tmp_path)
    store = Store(tmp_path / "data")
    held_path = store.bundles / "aaaa-old.edgepack"
    held_path.write_bytes(old)
    sizes = dict(zip(t.chunk_sha256, t.chunk_sizes))
    missing = {p.chunk for p in t.patches}
    stats, asked = _assemble(store, t, new, retained, tmp_path / "w1")
    assert stats["fetched"] == sum(p.size for p in t.patches) < 0.25 * sum(sizes[s] for s in missing), stats
    assert stats["patched"] == sum(sizes[s] for s in missing) and stats["reused"] + stats["patched"] == len(new)
    assert set(asked) == {p.sha256 for p in t.patches}  # no chunk itself was fetched

    # one patch's base damaged here (same size and mtime: the cached chunk list still names it):
    # that chunk is fetched whole, every other patch is used
    victim = t.patches[0]
    base = next(c for c in chunk_file(held_path, PARAMS) if c.sha256 == victim.bases[0])
    st = held_path.stat()
    raw = bytearray(old)
    raw[base.offset + base.size // 2] ^= 0xFF
    held_path.write_bytes(bytes(raw))
    os.utime(held_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    stats, asked = _assemble(store, t, new, retained, tmp_path / "w2")
    assert victim.chunk in asked and stats["patched"] < sum(sizes[s] for s in missing), stats

    # a retained patch that is not the chunk it claims (a pusher bug: its own sha256 matches the
    # record, the decoded bytes do not): that chunk is fetched whole
    held_path.write_bytes(old)
    os.utime(held_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    wrong = patch.encode(b"\0" * sizes[victim.chunk], b"", anchor=0)
    retained2 = {**retained, hashlib.sha256(wrong).hexdigest(): wrong}
    liar = Patch(chunk=victim.chunk, bases=victim.bases, sha256=hashlib.sha256(wrong).hexdigest(), size=1)
    t2 = CdcTransfer(topic=t.topic, params=t.params, chunk_sha256=t.chunk_sha256, chunk_sizes=t.chunk_sizes,
                     patches=(liar, *t.patches[1:]))
    stats, asked = _assemble(store, t2, new, retained2, tmp_path / "w3")
    assert liar.sha256 in asked and victim.chunk in asked, asked

    # a patch the broker does not have (cleared, never published): the chunks are fetched instead
    gone = {k: v for k, v in retained.items() if k != victim.sha256}
    stats, asked = _assemble(store, t, new, gone, tmp_path / "w4")
    assert victim.chunk in asked and stats["patched"] < sum(sizes[s] for s in missing), stats


def test_fleet_cost_counts_the_patches_a_device_can_use(tmp_path):
    from fleet.delta import ModelIndex, cost

    old, new = _old_new()
    t_old = _transfer(_chunks(old, tmp_path / "o"))
    t, _ = _patched(old, new, tmp_path)
    ix = {"m": ModelIndex()}
    ix["m"].take_over("A" * 64, t_old, "t/devices/d1/models/m/desired")
    c = cost(t, ix, running={"d1": "A" * 64, "d2": None})
    sizes = dict(zip(t.chunk_sha256, t.chunk_sizes))
    assert c.devices["d1"] == sum(p.size for p in t.patches) < sum(sizes[p.chunk] for p in t.patches)
    assert c.devices["d2"] is None
    # the index keeps the patches with the bundle, so they are cleared with it
    ix["m"].take_over("B" * 64, t, "t/devices/d1/models/m/desired")
    assert {p.sha256 for p in t.patches} <= ix["m"].chunks()
    assert ModelIndex.from_doc(json.loads(json.dumps(ix["m"].to_doc()))).chunks() == ix["m"].chunks()


@pytest.mark.agent
def test_pusher_reads_bases_from_the_broker_and_patches_only_what_pays(broker, tmp_path):
    """add_patches against bases retained on a real mosquitto: every changed chunk of a small edit
    gets a patch that decodes to it; a base the broker lacks leaves its chunk unpatched; a version
    in which every byte moved gets no patch at all."""
    from edgeproto.broker import BrokerConfig
    from edgeproto.mqtt import MqttClient
    from fleet.patches import add_patches

    old, new = _old_new()
    oc = _chunks(old, tmp_path / "old.bin")
    t_new = _transfer(_chunks(new, tmp_path / "new.bin"))
    lists = {"A" * 64: {"chunks": [c.sha256 for c in oc], "sizes": [c.size for c in oc]}}
    cfg = BrokerConfig(url=broker.url)
    client = MqttClient(cfg, client_id="seed")
    client.start()
    try:
        assert client.connected.wait(10)
        kept = oc[:len(oc) // 2]  # the second half of the old version's chunks is not retained
        for c in kept:
            assert client.publish_wait(f"{ROOT}/chunks/{c.sha256}", old[c.offset:c.offset + c.size], retain=True)
    finally:
        client.stop()
    t, payloads = add_patches(cfg, tmp_path / "new.bin", t_new, lists, ["A" * 64, None], timeout_s=5)
    held = {c.sha256: old[c.offset:c.offset + c.size] for c in kept}
    chunks = {s: new[o:o + n] for s, o, n in zip(t.chunk_sha256, t.offsets(), t.chunk_sizes)}
    assert t.patches and set(payloads) == {p.sha256 for p in t.patches}
    for p in t.patches:
        assert all(b in held for b in p.bases) and len(payloads[p.sha256]) == p.size
        assert patch.decode(payloads[p.sha256], b"".join(held[b] for b in p.bases), size=len(chunks[p.chunk])) \
            == chunks[p.chunk]
    half = sum(c.size for c in kept)
    assert all(o < half for o, s in zip(t.offsets(), t.chunk_sha256) if s in {p.chunk for p in t.patches})
    # a full retrain: nothing in common, nothing published besides the chunks
    other = np.random.default_rng(9).bytes(len(new))
    t_other = _transfer(_chunks(other, tmp_path / "other.bin"))
    t2, payloads2 = add_patches(cfg, tmp_path / "other.bin", t_other, lists, ["A" * 64], timeout_s=5)
    assert t2.patches == () and payloads2 == {}
