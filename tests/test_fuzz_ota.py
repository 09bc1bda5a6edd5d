"""Fuzzing what reaches the update path from outside: desired records (plain and signed), chunk
messages, the update record and download log on disk, and bundle archives (zip-slip names,
symbolic links, duplicate members, lying sizes, zip bombs, corrupt bytes).

Properties: every input ends in a value or in the one error type of its layer (RecordError,
TransferError, BundleError); a changed signed record is always refused; a chunk transfer yields
exactly the published bytes or fails; nothing is written outside the folder it was given."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import stat
import tempfile
import threading
import uuid
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fuzzing import FUZZ, JSON, TRIED, mutate, report

pytestmark = pytest.mark.fuzz
ROOT = "edgepack/v1"


def _valid_record(size: int = 5000, chunk: int = 1024) -> dict:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    chunks = [data[i:i + chunk] for i in range(0, size, chunk)]
    sha = hashlib.sha256(data).hexdigest()
    return {"schema": "edgepack.desired/1", "update_id": uuid.uuid4().hex, "name": "digits", "version": "1.1.0",
            "sha256": sha, "size": size,
            "transfer": {"method": "mqtt", "topic": f"{ROOT}/bundles/{sha}", "chunk_size": chunk,
                         "chunks": len(chunks), "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks]},
            "allow_downgrade": False, "probation": {"seconds": 30, "requests": 200, "max_error_rate": 0.02,
                                                    "max_p95_ms": None},
            "staging": {"max_p95_ms": None}, "issued": "2026-11-23T01:00:00.000+00:00", "target": "devices/dev1"}


# ---- desired records ----

def test_fuzz_desired_record_bytes():
    from edgeproto.desired import Desired, RecordError

    @FUZZ
    @given(payload=st.binary(max_size=2000) | JSON.map(lambda v: json.dumps(v).encode()))
    def run(payload):
        TRIED["desired record: any bytes"] += 1
        try:
            d = Desired.parse(payload, source=f"{ROOT}/devices/dev1/desired", topic_prefix=ROOT)
        except RecordError as e:
            assert str(e)
            return
        assert d is None or d.size >= 1

    run()
    report("desired record: any bytes")


def test_fuzz_desired_record_mutated():
    @FUZZ
    @given(data=st.data())
    def run(data):
        from edgeproto.desired import Desired, RecordError

        TRIED["desired record: mutated valid record"] += 1
        doc = mutate(_valid_record(), data)
        try:
            d = Desired.parse(json.dumps(doc).encode(), source="t", topic_prefix=ROOT)
        except RecordError as e:
            assert "malformed desired record" in str(e) or "not valid JSON" in str(e), str(e)
            return
        # accepted: every field has the type and range the updater relies on
        assert isinstance(d.size, int) and 1 <= d.size and isinstance(d.allow_downgrade, bool)
        assert isinstance(d.probation.seconds, float) and 0 <= d.probation.seconds <= 86400
        assert d.staging_max_p95_ms is None or d.staging_max_p95_ms > 0
        assert Desired.parse(json.dumps(d.to_dict()).encode(), source="t", topic_prefix=ROOT) is not None

    run()
    report("desired record: mutated valid record")


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    from edgebundle.signing import generate_keys, load_private_key, load_public_key

    d = tmp_path_factory.mktemp("fuzz-keys")
    generate_keys(d / "k.key", d / "k.pub")
    return load_private_key(d / "k.key"), load_public_key(d / "k.pub")


def test_fuzz_signed_record_changes_are_refused(signer):
    @FUZZ
    @given(data=st.data())
    def run(data):
        from edgeproto.desired import Limits, RecordError, sign_record
        from device_agent.ota.gate import RecordGate, SourcePolicy
        from device_agent.ota.keyring import Keyring

        TRIED["desired record: changed after signing"] += 1
        key, pub = signer
        signed = sign_record(_valid_record(), key)
        changed = mutate(signed, data)

        def covered(doc):  # everything but the key id in the signature block, which is only a hint
            doc = json.loads(json.dumps(doc))
            if isinstance(doc.get("record_signature"), dict):
                doc["record_signature"].pop("key_id", None)
            return json.dumps(doc, sort_keys=True)

        assume(covered(changed) != covered(signed))
        gate = RecordGate(keyring=Keyring(direct=[pub], roots=[]), limits=Limits(), topic_prefix=ROOT,
                          sources=SourcePolicy(), state_path=None)
        with pytest.raises(RecordError):
            gate.accept(json.dumps(changed).encode(), f"{ROOT}/devices/dev1/desired")
        assert gate.accept(json.dumps(signed).encode(), f"{ROOT}/devices/dev1/desired").update_id == signed["update_id"]

    run()
    report("desired record: changed after signing")


# ---- chunk messages ----

class FakeMqtt:
    """The broker as the chunk fetcher sees it: retained payloads delivered on subscribe, plus
    whatever else arrives on the connection (`noise`)."""

    def __init__(self, retained: dict[str, bytes], noise: list[tuple[str, bytes]]):
        self.retained, self.noise, self.fetcher = retained, noise, None
        self.connected = threading.Event()
        self.connected.set()

    def subscribe(self, topics, qos=1):
        for t, p in self.noise:
            self.fetcher.on_message(t, p)
        self.noise = []
        for topic in [topics] if isinstance(topics, str) else topics:
            if topic in self.retained:
                self.fetcher.on_message(topic, self.retained[topic])

    def unsubscribe(self, topic):
        pass


def test_fuzz_chunk_messages():
    @FUZZ
    @given(size=st.integers(1, 6000), chunk=st.integers(64, 2048), data=st.data())
    def run(size, chunk, data):
        from edgeproto.desired import Desired
        from device_agent.ota.transfer import MqttChunkFetcher, TransferError

        TRIED["chunk messages"] += 1
        payload = data.draw(st.binary(min_size=size, max_size=size))
        chunks = [payload[i:i + chunk] for i in range(0, size, chunk)]
        sha = hashlib.sha256(payload).hexdigest()
        rec = {"schema": "edgepack.desired/1", "update_id": "u1", "name": "m", "version": "1.0.0", "sha256": sha,
               "size": size, "transfer": {"method": "mqtt", "topic": f"{ROOT}/bundles/{sha}", "chunk_size": chunk,
                                          "chunks": len(chunks),
                                          "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks]}}
        d = Desired.parse(json.dumps(rec).encode(), source="t", topic_prefix=ROOT)
        base = f"{ROOT}/bundles/{sha}/chunks/"
        retained = {base + str(i): c for i, c in enumerate(chunks)}
        bad = data.draw(st.lists(st.integers(0, len(chunks) - 1), unique=True, max_size=2))
        for i in bad:  # a tampered, empty, truncated or over-long chunk
            retained[base + str(i)] = data.draw(st.binary(max_size=chunk * 2) | st.just(chunks[i] * 3))
        noise = data.draw(st.lists(st.tuples(
            st.sampled_from([base + "x", base + "-1", base + "99999999999", base + str(len(chunks)), base, base + "01",
                             "elsewhere/chunks/0", base + "0/../1"]) | st.text(max_size=30),
            st.binary(max_size=3000)), max_size=4))
        mqtt = FakeMqtt(retained, noise)
        fetcher = MqttChunkFetcher(mqtt, stall_s=5)
        mqtt.fetcher = fetcher
        changed = any(retained[base + str(i)] != chunks[i] for i in bad)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "w"
            work.mkdir()
            try:
                out = fetcher.fetch(d, work, progress=lambda *_: None, cancelled=lambda: False)
            except TransferError as e:
                assert changed, e  # only a changed chunk may fail the transfer
                assert not list(work.iterdir())  # nothing half-written stays behind
            else:
                assert not changed and out.read_bytes() == payload
            assert {p.parent for p in Path(tmp).rglob("*")} <= {Path(tmp), work}

    run()
    report("chunk messages")


def test_fuzz_download_log_on_disk():
    @FUZZ
    @given(done=st.binary(max_size=200) | st.lists(st.integers(-5, 40)).map(lambda v: "\n".join(map(str, v)).encode()),
           part=st.binary(max_size=3000))
    def run(done, part):
        from device_agent.ota.transfer import _resume

        TRIED["download log on disk"] += 1
        data = bytes(range(256)) * 8
        hashes = [hashlib.sha256(data[i:i + 256]).hexdigest() for i in range(0, len(data), 256)]
        with tempfile.TemporaryDirectory() as tmp:
            p, dfile = Path(tmp) / "bundle.part", Path(tmp) / "chunks.done"
            p.write_bytes(part if part else data)
            dfile.write_bytes(done)
            got = _resume(p, dfile, hashes, 256, len(data))
            assert got <= set(range(len(hashes)))
            content = p.read_bytes() if p.exists() else b""
            for i in got:  # only chunks whose bytes really are on disk count as stored
                assert hashlib.sha256(content[i * 256:(i + 1) * 256]).hexdigest() == hashes[i]

    run()
    report("download log on disk")


# ---- the update record on disk ----

@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from test_updater_unit import _bundle

    return _bundle(tmp_path_factory.mktemp("fuzz-record"), "1.0.0")


def test_fuzz_update_record_on_disk(small_bundle):
    @FUZZ
    @given(data=st.data())
    def run(data):
        from test_updater_unit import FakeHost

        from device_agent.ota.record import Record, State
        from device_agent.ota.updater import Updater, UpdaterSettings

        TRIED["update record on disk"] += 1
        valid = {"state": data.draw(st.sampled_from([s.value for s in State])), "update_id": "u1",
                 "desired": _valid_record(), "previous": {"bundle": "bundles/x.edgepack", "sha256": "0" * 64,
                                                           "version": "1.0.0"},
                 "candidate": {"bundle": "bundles/y.edgepack", "sha256": "1" * 64}, "error": None, "since": 1.0,
                 "attempts": 0, "ended": {"u0": "committed"}, "schema": 1}
        content = data.draw(st.binary(max_size=300) | st.just(json.dumps(mutate(valid, data)).encode())
                            | st.just(json.dumps(valid).encode()))
        with tempfile.TemporaryDirectory() as tmp:
            host = FakeHost(Path(tmp) / "data")
            path, sha = host.store.add(small_bundle)
            host.store.activate(path, sha)
            (Path(tmp) / "data" / "update.json").write_bytes(content)
            u = Updater(host, Path(tmp) / "data", settings=UpdaterSettings(max_attempts=2))
            u.recover()  # never raises, whatever the file says
            assert isinstance(u.record, Record) and isinstance(u.record.state, State)
            reread = Record.load(Path(tmp) / "data" / "update.json")
            assert isinstance(reread.state, State)
            assert all(p.is_relative_to(Path(tmp)) for p in Path(tmp).rglob("*"))

    run()
    report("update record on disk")


# ---- bundle archives ----

NAMES = st.sampled_from(["manifest.json", "manifest.sig", "model.tflite", "golden.npz", "labels.txt", "../evil",
                         "/etc/passwd", "a/b", "sub/", "..", ".", "x" * 200, "model.tflite\x00", "MODEL.TFLITE",
                         "model.tflite/", "C:\\evil", "ünïcode"]) | st.text(min_size=1, max_size=12)


def _manifest(files: dict[str, bytes], lie: dict[str, int]) -> bytes:
    from edgebundle.manifest import Manifest, TensorSpec

    m = Manifest(name="m", version="1.0.0", target={"name": "arm-cpu"}, format="tflite", precision="fp32",
                 model_file="model.tflite", inputs=(TensorSpec("x", (1, 4), "float32"),),
                 outputs=(TensorSpec("y", (1, 2), "float32"),), runtime={"name": "litert"})
    from edgebundle.manifest import FileEntry

    return m.with_files({n: FileEntry(hashlib.sha256(b).hexdigest(), len(b) + lie.get(n, 0))
                         for n, b in files.items()}).to_json()


BOMB = b"\0" * (24 << 20)  # past the archive's 16 MB expansion allowance


@functools.lru_cache(maxsize=1)
def _bomb_deflated() -> tuple[bytes, int]:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate, as in a zip member
    return c.compress(BOMB) + c.flush(), zlib.crc32(BOMB)


def _write_bomb(z: zipfile.ZipFile, zi: zipfile.ZipInfo) -> None:
    """BOMB as a deflated member, compressed once per session instead of once per example (0.16 s each:
    most of this test's time): what writestr writes, from the cached stream."""
    comp, crc = _bomb_deflated()
    zi.file_size, zi.compress_size, zi.CRC, zi.header_offset = len(BOMB), len(comp), crc, z.fp.tell()
    z.fp.write(zi.FileHeader(zip64=False))
    z.fp.write(comp)
    z.filelist.append(zi)
    z.NameToInfo[zi.filename] = zi
    z.start_dir = z.fp.tell()


def test_fuzz_bundle_archives():
    @FUZZ
    @given(data=st.data())
    def run(data):
        from edgebundle.archive import open_bundle
        from edgebundle.errors import BundleError

        TRIED["bundle archives"] += 1
        files = {"model.tflite": data.draw(st.binary(max_size=300))}
        if data.draw(st.booleans()):
            files["golden.npz"] = data.draw(st.binary(max_size=100))
        lie = data.draw(st.dictionaries(st.sampled_from(sorted(files)), st.integers(-3, 3), max_size=1))
        members = [("manifest.json", _manifest(files, lie), 0)] + [(n, b, 0) for n, b in files.items()]
        for _ in range(data.draw(st.integers(0, 3))):  # extra members: traversal, links, folders, duplicates, bombs
            kind = data.draw(st.sampled_from(["file", "symlink", "dir", "dup", "bomb", "device"]))
            name = data.draw(NAMES)
            if kind == "dup":
                name = data.draw(st.sampled_from([m[0] for m in members]))
            content = BOMB if kind == "bomb" else data.draw(st.binary(max_size=50))
            mode = {"symlink": stat.S_IFLNK | 0o777, "dir": stat.S_IFDIR | 0o755, "device": stat.S_IFCHR | 0o644}.get(
                kind, stat.S_IFREG | 0o644)
            members.append((name, content, mode))
        buf = io.BytesIO()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about duplicate names: that is the point
            with zipfile.ZipFile(buf, "w", compression=data.draw(st.sampled_from([zipfile.ZIP_STORED,
                                                                                  zipfile.ZIP_DEFLATED]))) as z:
                for name, content, mode in members:
                    zi = zipfile.ZipInfo(name.rstrip("\0") or "x", date_time=(2020, 1, 1, 0, 0, 0))
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    zi.external_attr = (mode or stat.S_IFREG | 0o644) << 16
                    if content is BOMB:
                        _write_bomb(z, zi)
                    else:
                        z.writestr(zi, content)
        raw = bytearray(buf.getvalue())
        for pos, val in data.draw(st.lists(st.tuples(st.integers(0, 10 ** 7), st.integers(0, 255)), max_size=3)):
            raw[pos % len(raw)] = val  # byte-level damage, anywhere (headers, sizes, CRCs, data)
        with tempfile.TemporaryDirectory() as tmp:
            path, out = Path(tmp) / "b.edgepack", Path(tmp) / "out"
            path.write_bytes(bytes(raw))
            try:
                b = open_bundle(path)
                b.verify(extract_to=out, extract=sorted(b.manifest.files))
            except BundleError as e:
                assert str(e)
            for p in Path(tmp).rglob("*"):  # nothing outside `out`, no links, no folders in it
                assert p in (path, out) or (p.parent == out and p.is_file() and not p.is_symlink()), p
            assert sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) < 32 << 20  # no bomb inflated

    run()
    report("bundle archives")
