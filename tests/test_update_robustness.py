"""The update path against bad records, full disks, crash loops and restarts (findings 8-13):
real agents, real mosquitto, real bundles."""
from __future__ import annotations

import json
import time

import pytest

from agents import AgentProc, Watcher, wait_until
from faults import fill_disk
from edgeproto.desired import Probation
from otakit import ROOT, agent, infer, publish_record, push, record, state, version, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.agent]


def test_full_disk_does_not_stop_the_agent(broker, digits_bundle, keys, small_disk):
    """Finding 8: telemetry that cannot be written is dropped and counted; the API keeps serving
    and the status says so. Once space is back, telemetry flows again."""
    a = AgentProc(small_disk / "data", bundle=digits_bundle, broker=broker.url, device_id="dev1", interval=0.2,
                  extra=("--log-format", "text")).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        w.wait("dev1/telemetry")
        filler = fill_disk(small_disk)
        st = w.wait("dev1/status", lambda p: ((p.get("buffer") or {}).get("write_errors") or 0) > 0, timeout=15)
        assert "full" in st["buffer"]["error"], st["buffer"]
        time.sleep(1.0)
        assert a.proc.poll() is None, a.log.read_text()[-2000:]
        assert a._get("/v2/health/ready") == 200 and infer(a) == 200
        filler.unlink()
        tel = w.wait("dev1/telemetry", lambda p: p["buffer"]["write_errors"] > 0, timeout=15)
        assert tel["buffer"]["write_errors"] >= 1
    finally:
        w.stop()
        a.stop()


@pytest.mark.parametrize("field,value,fragment", [
    ("size", -1, "size"),
    ("staging", {"max_p95_ms": "fast"}, "staging.max_p95_ms"),
    ("probation", {"seconds": "abc", "requests": 200, "max_error_rate": 0.02, "max_p95_ms": None},
     "probation.seconds"),
])
def test_wrong_record_fails_at_once(broker, versions, keys, tmp_path, field, value, fragment):
    """Findings 9 and 10: a record with a wrong type or range is a `failed` event at once (no
    retrying forever, no skipped probation), and the device keeps its model."""
    a = agent(tmp_path, broker, versions["v1"], keys, trusted=())
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/events"])
    try:
        doc, chunks = record(versions["v2"], target="devices/dev1", **{field: value})
        publish_record(broker, doc, chunks)
        ev = wait_final(w, doc["update_id"], timeout=15)
        assert ev["state"] == "failed" and fragment in ev["error"], ev
        assert version(a) == "1.0.0" and infer(a) == 200
        assert state(tmp_path / "data") != "downloading"
    finally:
        w.stop()
        a.stop()


def test_sigkill_in_probation_of_first_model(broker, versions, keys, tmp_path):
    """Finding 11: a device with no model before its first OTA update is killed on probation: it
    comes back consistent (rolled back, serving no model), not 'rolled back' while serving the candidate."""
    a = agent(tmp_path, broker, None, keys, start=False).start(wait_ready=False)
    wait_until(lambda: a._get("/v2/health/live") == 200, 30, what="agent up")
    push(broker, versions["v1"], device="dev1", sign=keys / "a.key", probation=Probation(seconds=60, requests=10 ** 6))
    wait_until(lambda: state(tmp_path / "data") == "probation" and version(a) == "1.0.0", 30, what="on probation")
    a.stop("kill")
    a.start(wait_ready=False)
    try:
        wait_until(lambda: a._get("/v2/health/live") == 200, 30, what="agent back")
        rec = json.loads((tmp_path / "data" / "update.json").read_text())
        assert rec["state"] == "rolled_back"
        assert a._get("/v2/health/ready") == 503 and version(a) is None
        assert json.loads((tmp_path / "data" / "active.json").read_text()).get("bundle") is None
    finally:
        a.stop()


def test_superseded_download_is_removed(broker, versions, keys, tmp_path):
    """Finding 12: a download cut short by a newer push leaves nothing behind."""
    a = agent(tmp_path, broker, versions["v1"], keys, trusted=())
    try:
        doc, chunks = record(versions["v2"], target="devices/dev1")
        publish_record(broker, doc, chunks, upto=5)  # the rest never comes
        work = tmp_path / "data" / "downloads" / doc["sha256"][:16]
        wait_until(lambda: (work / "chunks.done").is_file() and len((work / "chunks.done").read_text().split()) >= 5,
                   30, what="5 chunks stored")
        res = push(broker, versions["v2b"], device="dev1", wait=True)
        assert res.devices["dev1"]["state"] in ("committed", "failed"), res.devices
        wait_until(lambda: not work.exists(), 10, what="superseded download removed")
        assert not list((tmp_path / "data" / "downloads").rglob("*.part"))
    finally:
        a.stop()


def test_crash_loop_in_staging_ends_as_failed(broker, versions, keys, tmp_path):
    """Finding 13: an update that takes the agent down while staging (here: SIGKILL, as a
    runtime crash would) is tried a bounded number of times, across restarts, then ends as failed."""
    env = {"EDGEPACK_AGENT_FAULT_DELAY": "staging=30", "EDGEPACK_AGENT_MAX_ATTEMPTS": "2"}
    a = agent(tmp_path, broker, versions["v1"], keys, trusted=(), env=env)
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/events"])
    try:
        res = push(broker, versions["v2"], device="dev1")
        uid = res.desired["update_id"]
        for _ in range(2):
            wait_until(lambda: state(tmp_path / "data") == "staging", 30, what="staging")
            a.stop("kill")
            a.start()
        ev = wait_final(w, uid, timeout=30)
        assert ev["state"] == "failed" and "attempt" in ev["error"], ev
        assert version(a) == "1.0.0" and infer(a) == 200
        time.sleep(1.5)
        assert state(tmp_path / "data") == "failed"
    finally:
        w.stop()
        a.stop()


def test_golden_check_needs_no_system_temp_dir(digits_bundle, tmp_path, monkeypatch):
    """Finding 13: golden.npz went to the system temp dir (often a small RAM disk on a device)."""
    import tempfile

    from device_agent.model import load_bundle

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    m = load_bundle(digits_bundle, model_dir=tmp_path / "m")
    assert m.check_golden()["ok"]
    m.close()


def test_bundle_members_are_hashed_once_on_load(digits_bundle, tmp_path, monkeypatch):
    """Finding 13: verify once. Loading a bundle streams each member through its hash once."""
    from edgebundle import archive
    from device_agent.model import load_bundle

    calls: dict[str, int] = {}
    orig = archive.Bundle._stream

    def counting(self, zf, name, sink):
        calls[name] = calls.get(name, 0) + 1
        return orig(self, zf, name, sink)

    monkeypatch.setattr(archive.Bundle, "_stream", counting)
    m = load_bundle(digits_bundle, model_dir=tmp_path / "m")
    m.close()
    assert calls and max(calls.values()) == 1, calls


def test_zip_bomb_refused_before_inflating(digits_bundle, tmp_path):
    """Finding 13: a member that inflates far beyond the archive (a zip bomb) is refused on open,
    without inflating it."""
    import dataclasses
    import zipfile

    from edgebundle.archive import open_bundle, write_bundle
    from edgebundle.errors import BundleError

    b = open_bundle(digits_bundle)
    parts = tmp_path / "parts"
    parts.mkdir()
    files = {}
    with zipfile.ZipFile(digits_bundle) as z:
        for n in b.manifest.files:
            (parts / n).write_bytes(z.read(n))
            files[n] = parts / n
    with open(parts / "labels.txt", "wb") as f:  # 96 MB of zeros: ~100 KB deflated
        f.truncate(96 << 20)
    files["labels.txt"] = parts / "labels.txt"
    bomb = tmp_path / "bomb.edgepack"
    write_bundle(bomb, dataclasses.replace(b.manifest, labels_file="labels.txt"), files)
    (parts / "labels.txt").unlink()
    assert bomb.stat().st_size < 1 << 20
    t0 = time.monotonic()
    with pytest.raises(BundleError, match="expands"):
        open_bundle(bomb)
    assert time.monotonic() - t0 < 1.0


def test_telemetry_sequence_is_durable(tmp_path):
    """Finding 13: with synchronous=NORMAL a power loss can roll back committed seq numbers, so
    seq went backwards. The queue commits with FULL durability."""
    from device_agent.buffer import DiskQueue

    q = DiskQueue(tmp_path / "q.sqlite")
    try:
        assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        q.close()
