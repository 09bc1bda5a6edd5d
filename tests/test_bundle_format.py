"""Bundle writing/reading/verification: no TensorFlow, runs in milliseconds."""
import json
import stat
import zipfile

import numpy as np
import pytest

from edgebundle.archive import MANIFEST, open_bundle, verify_bundle, write_bundle
from edgebundle.errors import BundleError, VerificationError
from edgebundle.manifest import FileEntry, Manifest, RuntimeSpec, TensorSpec, parse_version


def _manifest(**kw):
    base = dict(name="m", version="1.2.3", target={"name": "arm-cpu", "sha256": "0" * 64}, format="tflite",
                precision="fp32", model_file="model.tflite",
                inputs=(TensorSpec("x", (1, 4), "float32"),), outputs=(TensorSpec("y", (1, 2), "float32"),),
                runtime={"name": "litert"})
    base.update(kw)
    return Manifest(**base)


@pytest.fixture
def bundle(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"\x00fake model bytes" * 100)
    dest = tmp_path / "out" / "m-1.2.3-arm-cpu.edgepack"
    write_bundle(dest, _manifest(), {"model.tflite": model})
    return dest


def test_roundtrip_and_extract(bundle, tmp_path):
    b = verify_bundle(bundle)
    assert b.manifest.name == "m" and b.manifest.files["model.tflite"].size == 1700
    out = b.extract(tmp_path / "x")
    assert out["model.tflite"].read_bytes() == b"\x00fake model bytes" * 100
    assert b.manifest.file_name == "m-1.2.3-arm-cpu.edgepack"


def test_no_temp_files_left(bundle):
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]


def _rewrite(src, dest, mutate):
    """Copy a bundle member by member, letting `mutate(name, data)` change or drop members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for zi in zin.infolist():
            res = mutate(zi.filename, zin.read(zi.filename))
            if res is not None:
                zout.writestr(zi, res)
    return dest


def test_tampered_model_fails_verify(bundle, tmp_path):
    bad = _rewrite(bundle, tmp_path / "bad.edgepack",
                   lambda n, d: d.replace(b"fake", b"evil") if n == "model.tflite" else d)
    with pytest.raises(VerificationError) as e:
        verify_bundle(bad)
    assert "model.tflite: sha256" in e.value.problems[0]
    with pytest.raises(VerificationError):  # extraction refuses too, and leaves nothing behind
        open_bundle(bad).extract(tmp_path / "ex")
    assert not list((tmp_path / "ex").iterdir())


def test_manifest_edit_is_detected(bundle, tmp_path):
    def mutate(n, d):
        if n == MANIFEST:
            m = json.loads(d)
            m["files"]["model.tflite"]["size"] += 1
            return json.dumps(m).encode()
        return d

    with pytest.raises(VerificationError, match="does not match its manifest"):
        open_bundle(_rewrite(bundle, tmp_path / "bad.edgepack", mutate))


def test_extra_member_refused(bundle, tmp_path):
    bad = tmp_path / "bad.edgepack"
    _rewrite(bundle, bad, lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("payload.sh", b"rm -rf /")
    with pytest.raises(VerificationError) as e:
        open_bundle(bad)
    assert any("payload.sh" in p for p in e.value.problems)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/passwd", "sub/dir.txt", "..", "a\\..\\b"])
def test_path_traversal_member_refused(bundle, tmp_path, name):
    bad = tmp_path / "bad.edgepack"
    _rewrite(bundle, bad, lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(name, b"x")
    with pytest.raises(BundleError, match="unsafe member name|directory"):
        open_bundle(bad)


def test_symlink_member_refused(bundle, tmp_path):
    bad = tmp_path / "bad.edgepack"
    _rewrite(bundle, bad, lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as z:
        zi = zipfile.ZipInfo("link")
        zi.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(zi, "/etc/passwd")
    with pytest.raises(BundleError, match="symbolic link"):
        open_bundle(bad)


def test_absurd_size_refused(bundle, tmp_path):
    bad = tmp_path / "bad.edgepack"
    _rewrite(bundle, bad, lambda n, d: d)
    data = bytearray(bad.read_bytes())
    # Patch the central directory's uncompressed size of the first member to ~4 GiB+.
    cd = data.rfind(b"PK\x01\x02")
    first = data.find(b"PK\x01\x02")
    assert first != -1 and cd != -1
    data[first + 24:first + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="over the limit"):
        open_bundle(bad)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_not_a_bundle(tmp_path, content):
    p = tmp_path / "x.edgepack"
    p.write_bytes(content)
    with pytest.raises(BundleError, match="not an edgepack bundle"):
        open_bundle(p)


def test_missing_manifest(tmp_path):
    p = tmp_path / "x.edgepack"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("model.tflite", b"x")
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(p)


def test_write_refuses_unsafe_names(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "b.edgepack", _manifest(model_file="../model.tflite"), {"../model.tflite": f})
    assert not (tmp_path / "b.edgepack").exists()


def test_failed_write_leaves_nothing(tmp_path):
    f = tmp_path / "missing.tflite"  # does not exist: hashing fails before anything is written
    with pytest.raises(OSError):
        write_bundle(tmp_path / "b.edgepack", _manifest(), {"model.tflite": f})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path):
    """The file-size limit of a child process (RLIMIT_FSIZE: EFBIG past 64 KiB, as a full disk gives ENOSPC)
    stops a 1 MB bundle half-written: OutputError naming the file and the space, no .part left behind."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    (tmp_path / "model.tflite").write_bytes(np.random.default_rng(0).bytes(1 << 20))  # incompressible
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_bundle_format import _manifest
        from pathlib import Path
        from edgebundle.archive import write_bundle
        from edgebundle.errors import OutputError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            write_bundle(Path({str(tmp_path / "out" / "b.edgepack")!r}), _manifest(),
                         {{"model.tflite": Path({str(tmp_path / "model.tflite")!r})}})
        except OutputError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write b.edgepack in" in r.stdout and "File too large" in r.stdout, r.stdout
    assert "MB are free there now" in r.stdout and "-o DIR" in r.stdout
    assert list((tmp_path / "out").iterdir()) == []


def test_semver_ordering():
    assert parse_version("1.10.0") > parse_version("1.9.9")
    assert parse_version("2.0.0-rc.1") < parse_version("2.0.0")
    assert parse_version("2.0.0-alpha") < parse_version("2.0.0-alpha.1") < parse_version("2.0.0-beta")
    with pytest.raises(BundleError, match="semantic version"):
        parse_version("1.0")


PACKAGER_RUNTIME = {"name": "litert", "min_version": "1.2.0", "threads": 4, "delegates": ["xnnpack"], "providers": [],
                    "tensorrt_fp16": False, "tensorrt_engine_cache": False, "cpu_fallback": True, "flex": False,
                    "edgetpu_compiled": None}


def test_runtime_is_typed_and_its_json_unchanged():
    m = _manifest(runtime=dict(PACKAGER_RUNTIME))
    assert isinstance(m.runtime, RuntimeSpec) and m.runtime.threads == 4 and m.runtime.delegates == ("xnnpack",)
    assert m.runtime.cpu_fallback is True and m.runtime.edgetpu_compiled is None
    assert m.to_dict()["runtime"] == PACKAGER_RUNTIME and list(m.to_dict()["runtime"]) == list(PACKAGER_RUNTIME)
    assert m.runtime.to_dict() == RuntimeSpec(**{**PACKAGER_RUNTIME, "delegates": ("xnnpack",)}).to_dict()
    m = m.with_files({"model.tflite": FileEntry("0" * 64, 1)})
    again = Manifest.from_json(m.to_json())
    assert again.runtime == m.runtime and again.to_json() == m.to_json()


def test_runtime_of_older_and_newer_bundles_round_trips(tmp_path):
    """Missing keys read as defaults and stay missing; unknown keys stay where they were; the
    manifest bytes (what signatures cover) do not change on a read and a write."""
    rt = {"name": "onnxruntime", "future_option": {"a": [1, 2]}, "providers": ["CPUExecutionProvider"]}
    m = _manifest(runtime=rt)
    assert m.runtime.providers == ("CPUExecutionProvider",) and m.runtime.threads == 0 and not m.runtime.cpu_fallback
    assert m.runtime.extra == {"future_option": {"a": [1, 2]}}
    assert list(m.to_dict()["runtime"].items()) == list(rt.items())
    model = tmp_path / "model.tflite"
    model.write_bytes(b"model")
    write_bundle(tmp_path / "b.edgepack", m, {"model.tflite": model})
    b = verify_bundle(tmp_path / "b.edgepack")
    assert b.manifest.to_json() == b.manifest_bytes and b.manifest.runtime == m.runtime


@pytest.mark.parametrize("key,value", [("threads", "4"), ("threads", -1), ("delegates", "xnnpack"),
                                       ("cpu_fallback", 1), ("name", 7)])
def test_runtime_field_of_the_wrong_type_is_refused(key, value):
    with pytest.raises(BundleError, match=f"runtime.{key}"):
        Manifest.from_dict({**_manifest().to_dict(), "runtime": {"name": "litert", key: value},
                            "files": {"model.tflite": {"sha256": "0" * 64, "size": 1}}})
