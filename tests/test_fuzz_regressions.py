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
    from device_agent.ota.desired import Desired, RecordError

    doc = {"schema": "edgepack.desired/1", "update_id": "u1", "name": "m", "version": version, "sha256": "0" * 64,
           "size": 10, "transfer": {"method": "url", "url": "https://example.com/b"}}
    with pytest.raises(RecordError, match="version"):
        Desired.parse(json.dumps(doc).encode(), source="t")
