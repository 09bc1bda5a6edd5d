"""The bundle an agent is started with (`--bundle`) becomes active only once it is verified whole:
a damaged or truncated one stops the agent with exit 5 and leaves no data directory behind, and a
stored bundle damaged on disk gives way to a good `--bundle` at the next start (issue 24, finding 3)."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from agents import AgentProc, wait_until
from tinybundles import infer_body, log_bundle

pytestmark = pytest.mark.agent


def _run(data_dir, bundle):
    return subprocess.run([sys.executable, "-m", "device_agent.cli", "run", "--data-dir", str(data_dir),
                           "--api-port", "0", "--bundle", str(bundle)], capture_output=True, text=True, timeout=60)


def _answers(agent) -> bool:
    import json
    import urllib.request

    req = urllib.request.Request(f"{agent.base}/v2/models/logm/infer", data=infer_body([1, 2, 3, 4]),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status == 200 and json.loads(r.read())["outputs"][0]["name"] == "y"


def _tampered(good, out):
    """The same bundle with one byte of its model changed; its manifest (and hashes) as they were."""
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == "model.onnx" else data)
    return out


def test_a_damaged_or_truncated_bundle_exits_5_and_leaves_nothing(tmp_path):
    good = log_bundle(tmp_path / "b")
    truncated = tmp_path / "truncated.edgepack"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (_tampered(good, tmp_path / "tampered.edgepack"), truncated):
        data = tmp_path / f"data-{bad.stem}"
        r = _run(data, bad)
        assert r.returncode == 5, (bad.name, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and r.stderr.startswith(f"error: {bad.name}"), r.stderr
        assert not data.exists(), sorted(p.name for p in data.rglob("*"))  # nothing unverified kept
    empty = tmp_path / "made-by-the-installer"  # an empty data directory is kept, and left empty
    empty.mkdir()
    assert _run(empty, truncated).returncode == 5 and empty.is_dir() and not any(empty.iterdir())


def test_a_data_dir_with_history_keeps_running_without_a_damaged_bundle(tmp_path):
    """A device that served before (here: its model was removed, active.json names none) is not
    stopped by a damaged --bundle: it stays reachable for updates and serves nothing unverified."""
    good = log_bundle(tmp_path / "b")
    data = tmp_path / "data"
    data.mkdir()
    (data / "active.json").write_text("{}")
    a = AgentProc(data, bundle=_tampered(good, tmp_path / "t.edgepack")).start(wait_ready=False)
    try:
        # the API answers (or the agent exits, which fails below with its log); 60 s: a loaded CI
        # host has taken over 30 s to start an agent here
        wait_until(lambda: a._get("/v2/health/ready") or a.proc.poll() is not None, 60, what="the API")
        assert a.proc.poll() is None, a.log.read_text()[-3000:]
        assert a._get("/v2/health/ready") == 503, a.log.read_text()[-3000:]
        assert not list((data / "bundles").glob("*.edgepack"))  # nothing unverified copied in
    finally:
        a.stop()


def test_a_bundle_damaged_on_disk_gives_way_to_a_good_bundle(tmp_path):
    good = log_bundle(tmp_path / "b")
    data = tmp_path / "data"
    a = AgentProc(data, bundle=good).start()
    assert _answers(a)
    a.stop()
    [stored] = (data / "bundles").glob("*.edgepack")
    _tampered(good, tmp_path / "t.edgepack").replace(stored)  # the disk damaged the active copy
    a = AgentProc(data, bundle=good, port=a.port).start()
    try:
        assert _answers(a)  # the good bundle serves again
        assert "cannot be loaded" in a.log.read_text() and "replaces it" in a.log.read_text()
    finally:
        a.stop()
