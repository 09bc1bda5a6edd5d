"""Crashes the fuzzers found along the way, each kept as a plain regression test."""
from __future__ import annotations

import hashlib
import json

import pytest


def test_damaged_download_log_is_ignored(tmp_path):
    """Chunk fuzzer: a chunks.done holding bytes that are not text (a power loss mid-write) raised
    UnicodeDecodeError out of the download; such lines are now skipped and those chunks fetched again."""
    from device_agent.ota.transfer import _resume

    data = bytes(range(256)) * 4
    hashes = [hashlib.sha256(data[i:i + 256]).hexdigest() for i in range(0, len(data), 256)]
    (tmp_path / "bundle.part").write_bytes(data)
    (tmp_path / "chunks.done").write_bytes(b"0\n\x80\xff\n2\n99\n-1\n")
    assert _resume(tmp_path / "bundle.part", tmp_path / "chunks.done", hashes, 256, len(data)) == {0, 2}


@pytest.mark.parametrize("version", ["", "1.0", "v1.0.0", "1.0.0-"])
def test_record_with_bad_version_is_a_record_error(version):
    """Signed-record fuzzer: a record whose version is not semantic raised BundleError (from the
    manifest's version parser), which the agent did not report as a refused record."""
    from edgeproto.desired import Desired, RecordError

    doc = {"schema": "edgepack.desired/1", "update_id": "u1", "name": "m", "version": version, "sha256": "0" * 64,
           "size": 10, "transfer": {"method": "url", "url": "https://example.com/b"}}
    with pytest.raises(RecordError, match="version"):
        Desired.parse(json.dumps(doc).encode(), source="t")


def test_non_ascii_digits_in_lengths_are_client_errors(tmp_path):
    """v2 fuzzer: '¹'.isdigit() is true but int('¹') raises: a header length (or Content-Length,
    or a chunk topic index) of '¹' answered 500 (or raised in the MQTT thread)."""
    from device_agent.kserve import decode_request
    from device_agent.model import InferenceError
    from device_agent.ota.transfer import MqttChunkFetcher

    with pytest.raises(InferenceError, match="not a number"):
        decode_request(b"{}", "\u00b9")
    f = MqttChunkFetcher(mqtt=None)
    f._prefix, f._count, f._max_len = "t/chunks/", 4, 100
    assert f.on_message("t/chunks/\u00b9", b"x") and not f._inbox


def test_zip_with_a_bad_offset_is_a_bundle_error(tmp_path):
    """Archive fuzzer: a local header offset damaged into a negative seek raised OSError(EINVAL)."""
    import io
    import zipfile

    from edgebundle.archive import open_bundle
    from edgebundle.errors import BundleError

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", b"{}")
    raw = bytearray(buf.getvalue())
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 42:cd + 46] = (0xFFFFFFF0).to_bytes(4, "little")  # relative offset of the local header
    p = tmp_path / "b.edgepack"
    p.write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        open_bundle(p)
