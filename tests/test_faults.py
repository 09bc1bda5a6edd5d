"""The fault matrix: SIGKILL in every update state (x seeds), the broker killed mid-transfer and
mid-probation, the disk full at each state, the wall clock jumping. After each: the device is back
serving a verified model, and no model it needs is lost.

The normal run kills the agent once in every state (one seed) and fills the disk at every state;
the whole matrix (5 seeds per state):
    EDGEPACK_FAULT_SEEDS=5 .venv/bin/python -m pytest tests/test_faults.py
or `python benchmarks/fault_matrix.py`, which prints the figures (docs/security.md)."""
from __future__ import annotations

import random
import subprocess
import time

import pytest

from agents import AgentProc, Watcher, wait_until
from brokers import Broker
from edgeproto.desired import Probation
from faults import (FAULT_SEEDS, FINAL, LIBFAKETIME, UPDATE_STATES, check_device, ended, fill_disk,
                    report, update_record)
from otakit import ROOT, Publisher, infer, publish_record, push, record, sign_record

pytestmark = [pytest.mark.slow, pytest.mark.agent, pytest.mark.broker]


def _agent(data, broker, bundle, keys, *, env=None, port=None, interval=1.0):
    return AgentProc(data, bundle=bundle, broker=broker.url, device_id="dev1", interval=interval, port=port,
                     extra=("--trusted-key", str(keys / "a.pub"), "--log-format", "text"), env=env)


@pytest.mark.parametrize("seed", range(FAULT_SEEDS))
@pytest.mark.parametrize("state", UPDATE_STATES)
def test_sigkill_in_every_state(broker, versions, keys, tmp_path, state, seed):
    rng = random.Random(f"{state}/{seed}")
    data, pause = tmp_path / "data", 1.0
    a = _agent(data, broker, versions["v1"], keys, env={"EDGEPACK_AGENT_FAULT_DELAY": f"{state}={pause}"}).start()
    res = push(broker, versions["v2"], device="dev1", sign=keys / "a.key",
               probation=Probation(seconds=2, requests=10 ** 6))
    uid = res.desired["update_id"]
    wait_until(lambda: update_record(data).get("state") == state, 30, what=f"state {state}")
    time.sleep(rng.uniform(0, pause + 0.6))  # before, at or after the handler starts
    a.stop("kill")
    killed_in = update_record(data).get("state")
    b = _agent(data, broker, None, keys, port=a.port).start()  # ready = serving a verified model again
    try:
        wait_until(lambda: ended(data, uid), 60, what="the update ended")
        final = ended(data, uid)
        figures = check_device(b, data, keys / "a.pub")
        report(kind="sigkill", state=state, seed=seed, killed_in=killed_in, final=final, **figures)
        assert figures["serving_verified"] and figures["models_lost"] == 0, figures
        if killed_in in ("downloading", "verifying", "staging"):
            assert final == "committed" and figures["version"] == "1.1.0", (killed_in, final)
        else:
            assert final in ("rolled_back", "committed"), final
            assert figures["version"] == ("1.0.0" if final == "rolled_back" else "1.1.0")
        assert infer(b) == 200
    finally:
        b.stop()


@pytest.fixture
def persistent_broker(tmp_path):
    if Broker.kind != "mosquitto":
        pytest.skip("needs mosquitto (persistence)")
    b = Broker(tmp_path / "pbroker", persistent=True).start()
    yield b
    b.stop()


def test_broker_restart_mid_transfer(persistent_broker, versions, keys, tmp_path):
    """The broker goes down with 10 chunks on the device and comes back: the download resumes from
    the retained chunks (persistence on, as the generated configuration sets it)."""
    b, data = persistent_broker, tmp_path / "data"
    a = _agent(data, b, versions["v1"], keys).start()
    try:
        doc, chunks = record(versions["v2"], target="devices/dev1", chunk_size=2048)
        doc = sign_record(doc, keys / "a.key")
        publish_record(b, doc, chunks, upto=10)
        done = data / "downloads" / doc["sha256"][:16] / "chunks.done"
        wait_until(lambda: done.is_file() and len(done.read_text().split()) >= 10, 30, what="10 chunks stored")
        time.sleep(1.5)  # autosave: what the broker holds is on its disk
        b.stop()
        time.sleep(1.0)
        b.start()
        p = Publisher(b.url)
        for i in range(10, len(chunks)):
            p.publish(f"{doc['transfer']['topic']}/chunks/{i}", chunks[i])
        p.stop()
        wait_until(lambda: ended(data, doc["update_id"]), 60, what="the update ended")
        figures = check_device(a, data, keys / "a.pub")
        report(kind="broker restart", state="downloading", seed=0, final=ended(data, doc["update_id"]), **figures)
        assert ended(data, doc["update_id"]) == "committed" and figures["serving_verified"], figures
        assert figures["models_lost"] == 0
    finally:
        a.stop()


def test_broker_killed_mid_probation(persistent_broker, versions, keys, tmp_path):
    """SIGKILL to the broker during probation: probation goes on, the update commits, and the
    events queued meanwhile reach the fleet after the broker is back."""
    b, data = persistent_broker, tmp_path / "data"
    a = _agent(data, b, versions["v1"], keys).start()
    try:
        res = push(b, versions["v2"], device="dev1", sign=keys / "a.key", probation=Probation(seconds=4, requests=10 ** 6))
        uid = res.desired["update_id"]
        wait_until(lambda: update_record(data).get("state") == "probation", 30, what="probation")
        b.stop("kill")
        time.sleep(2.0)
        b.start()
        w = Watcher(b.url, [f"{ROOT}/devices/dev1/events"])
        try:
            ev = w.wait("dev1/events", lambda e: e.get("update_id") == uid and e.get("state") in FINAL, timeout=40)
        finally:
            w.stop()
        figures = check_device(a, data, keys / "a.pub")
        report(kind="broker kill", state="probation", seed=0, final=ev["state"], **figures)
        assert ev["state"] == "committed" and figures["serving_verified"] and figures["models_lost"] == 0, figures
    finally:
        a.stop()


@pytest.fixture
def tmpfs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("state", UPDATE_STATES)
def test_disk_full_at_each_state(broker, versions, keys, tmpfs, state):
    """The disk fills up just as the update enters `state`: every write from there on fails with a
    real ENOSPC. The update ends (bounded attempts), the agent keeps serving a verified model, and
    once space is back the next push goes through."""
    data = tmpfs / "data"
    env = {"EDGEPACK_AGENT_FAULT_DELAY": f"{state}=1.0", "EDGEPACK_AGENT_MAX_ATTEMPTS": "2"}
    a = _agent(data, broker, versions["v1"], keys, env=env, interval=0.5).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/events"])
    filler = None
    try:
        res = push(broker, versions["v2"], device="dev1", sign=keys / "a.key", probation=Probation(seconds=2, requests=10 ** 6))
        uid = res.desired["update_id"]
        wait_until(lambda: update_record(data).get("state") == state, 30, what=f"state {state}")
        filler = fill_disk(tmpfs)
        ev = w.wait("dev1/events", lambda e: e.get("update_id") == uid and e.get("state") in FINAL, timeout=40)
        assert a.proc.poll() is None, a.log.read_text()[-2000:]
        during = check_device(a, data, keys / "a.pub")
        assert during["serving_verified"] and infer(a) == 200, during
        filler.unlink()
        filler = None
        again = push(broker, versions["v2"], device="dev1", wait=True, sign=keys / "a.key",
                     probation=Probation(seconds=1, requests=10 ** 6))
        figures = check_device(a, data, keys / "a.pub")
        report(kind="disk full", state=state, seed=0, final=ev["state"], recovered=again.ok, **figures)
        assert again.ok, again.devices
        assert figures["serving_verified"] and figures["models_lost"] == 0 and figures["version"] == "1.1.0", figures
    finally:
        if filler is not None:
            filler.unlink()
        w.stop()
        a.stop()


@pytest.mark.skipif(LIBFAKETIME is None, reason="needs libfaketime (apt-get install libfaketime)")
def test_wall_clock_jumps(broker, versions, keys, tmp_path):
    """The device's wall clock jumps 400 days back mid-download and 800 days forward on probation
    (a Pi without RTC, then NTP): the update commits, telemetry `seq` keeps counting by one, and a
    record pushed afterwards is still accepted (replay checks compare records, not clocks)."""
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_CACHE_DURATION": "1",
           "DONT_FAKE_MONOTONIC": "1", "EDGEPACK_AGENT_FAULT_DELAY": "probation=1"}
    data = tmp_path / "data"
    a = _agent(data, broker, versions["v1"], keys, env=env, interval=0.3).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        doc, chunks = record(versions["v2"], target="devices/dev1", chunk_size=2048,
                             probation={"seconds": 3, "requests": 10 ** 6, "max_error_rate": 0.02, "max_p95_ms": None})
        doc = sign_record(doc, keys / "a.key")
        publish_record(broker, doc, chunks, upto=10)
        wait_until(lambda: update_record(data).get("state") == "downloading", 30, what="downloading")
        clock.write_text("-400d\n")
        w.wait("dev1/telemetry", lambda p: p["ts"] < "2026-01-01", timeout=10)  # the device lives in the past now
        p = Publisher(broker.url)
        for i in range(10, len(chunks)):
            p.publish(f"{doc['transfer']['topic']}/chunks/{i}", chunks[i])
        p.stop()
        wait_until(lambda: update_record(data).get("state") == "probation", 30, what="probation")
        clock.write_text("+800d\n")
        wait_until(lambda: ended(data, doc["update_id"]), 30, what="the update ended")
        assert ended(data, doc["update_id"]) == "committed"
        res = push(broker, versions["v1"], device="dev1", wait=True, allow_downgrade=True, sign=keys / "a.key",
                   probation=Probation(seconds=1, requests=10 ** 6))
        assert res.ok, res.devices
        figures = check_device(a, data, keys / "a.pub")
        report(kind="clock jump", state="downloading+probation", seed=0, final="committed", **figures)
        assert figures["serving_verified"] and figures["models_lost"] == 0
        seqs = [t["seq"] for t in w.of("dev1/telemetry")]
        assert len(seqs) > 5 and seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert any(t["ts"] > "2028-01-01" for t in w.of("dev1/telemetry"))  # and in the future later
    finally:
        w.stop()
        a.stop()
