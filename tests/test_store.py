"""The build cache's store (packager/store.py) on its own: files and folders (a SavedModel, an ONNX
export) kept and given back byte for byte, a damaged entry deleted instead of used, the oldest
entries pruned past the size limit. The builds that use it are in test_build.py and test_text_tflite.py."""
from __future__ import annotations

import json
import os

from packager.store import Store, digest_path


def _folder(root, tag: bytes):
    d = root / "saved_model"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph " + tag)
    (d / "variables" / "variables.data-00000-of-00001").write_bytes(tag * 1000)
    return d


def test_files_and_folders_come_back_as_they_went_in(tmp_path):
    store = Store(tmp_path / "cache")
    model = tmp_path / "m.tflite"
    model.write_bytes(b"\x00tflite" * 100)
    folder = _folder(tmp_path / "src", b"a")
    k1, k2 = store.key({"what": "file"}), store.key({"what": "folder"})
    assert k1 != k2 and store.get(k1, tmp_path / "x") is None  # absent
    assert store.put(k1, model, {"weights": "int8"}) and store.put(k2, folder, {"onnx2tf": "1"})
    hit = store.get(k1, tmp_path / "out1")
    assert hit.path.read_bytes() == model.read_bytes() and hit.info == {"weights": "int8"}
    hit = store.get(k2, tmp_path / "out2")
    assert hit.path == tmp_path / "out2" / "saved_model" and hit.info == {"onnx2tf": "1"}
    assert digest_path(hit.path) == digest_path(folder)
    assert sorted(p.name for p in hit.path.rglob("*")) == ["saved_model.pb", "variables", "variables.data-00000-of-00001"]


def test_a_damaged_folder_entry_is_deleted_not_used(tmp_path):
    store = Store(tmp_path / "cache")
    key = store.key({"what": "folder"})
    store.put(key, _folder(tmp_path / "src", b"a"), {})
    entry = tmp_path / "cache" / key[:2] / key
    (entry / "saved_model" / "variables" / "variables.data-00000-of-00001").write_bytes(b"half-written")
    assert store.get(key, tmp_path / "out") is None
    assert not entry.exists() and not (tmp_path / "out" / "saved_model").exists()
    store.put(key, _folder(tmp_path / "src2", b"b"), {})  # rebuilt: the new entry is used
    assert (store.get(key, tmp_path / "out3").path / "saved_model.pb").read_bytes() == b"graph b"


def test_an_entry_from_the_file_only_format_still_reads(tmp_path):
    """Entries written before folders were kept (meta.json's sha256 of the file's bytes) stay valid."""
    import hashlib

    store = Store(tmp_path / "cache")
    key = store.key({"what": "old"})
    entry = tmp_path / "cache" / key[:2] / key
    entry.mkdir(parents=True)
    (entry / "m.onnx").write_bytes(b"onnx bytes")
    (entry / "meta.json").write_text(json.dumps({"file": "m.onnx", "sha256": hashlib.sha256(b"onnx bytes").hexdigest(),
                                                 "info": {}}))
    assert store.get(key, tmp_path / "out").path.read_bytes() == b"onnx bytes"


def test_the_least_recently_used_entries_go_past_the_limit(tmp_path):
    store = Store(tmp_path / "cache", max_bytes=5000)
    keys = [store.key({"n": i}) for i in range(3)]
    for i, key in enumerate(keys):
        store.put(key, _folder(tmp_path / f"src{i}", bytes([65 + i])), {})  # ~1 KB each
        entry = tmp_path / "cache" / key[:2] / key
        os.utime(entry, (1_000_000 + i, 1_000_000 + i))  # put in this order, a second apart
    store.get(keys[0], tmp_path / "used")  # the oldest, used again: now the most recent
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2500)
    store.put(store.key({"n": "big"}), big, {})
    assert store.get(keys[1], tmp_path / "o1") is None  # the least recently used went first
    assert store.get(keys[0], tmp_path / "o0") is not None
