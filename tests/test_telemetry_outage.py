"""Telemetry under a broker outage, with the agent killed and restarted in the middle and a small
buffer bound: every message produced is either delivered or counted as dropped (never lost
silently), and drops happen only past the bound. The minute-long version with figures:
`python benchmarks/telemetry_outage.py` (docs/benchmarks.md)."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from agents import AgentProc, Watcher, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.agent]
BOUND = 15


def _load(agent, stop: threading.Event) -> None:
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()
    while not stop.is_set():
        try:
            urllib.request.urlopen(urllib.request.Request(agent.base + "/v2/models/digits/infer", data=body), timeout=2)
        except OSError:
            time.sleep(0.05)


def test_outage_with_restart_counts_every_drop(broker, digits_bundle, tmp_path):
    data = tmp_path / "data"
    env = {"EDGEPACK_AGENT_BUFFER_MAX_MESSAGES": str(BOUND)}
    a = AgentProc(data, bundle=digits_bundle, broker=broker.url, device_id="out", interval=0.1, env=env).start()
    stop = threading.Event()
    load = threading.Thread(target=_load, args=(a, stop))
    load.start()
    w = Watcher(broker.url, ["edgepack/v1/devices/out/telemetry"])
    try:
        wait_until(lambda: len(w.of("out/telemetry")) >= 5, 15, what="telemetry before the outage")
        # The watcher stays subscribed until the broker is gone: what the broker took from the agent
        # while it was shutting down reaches the watcher too (stopping the watcher first left a window in
        # which a delivered message was seen by no one, and read as a loss nobody counted).
        broker.stop()
        w.stop()
        time.sleep(2.0)
        a.stop("kill")  # power loss in the middle of the outage
        stop.set()
        load.join(10)
        a.start()
        stop.clear()
        load = threading.Thread(target=_load, args=(a, stop))
        load.start()
        time.sleep(2.0)
        broker.start()
        w2 = Watcher(broker.url, ["edgepack/v1/devices/out/telemetry"])
        wait_until(lambda: w2.of("out/telemetry") and w2.of("out/telemetry")[-1]["buffer"]["queued"] <= 1, 30,
                   what="the buffer drained")
        time.sleep(0.5)
        got = w.of("out/telemetry") + w2.of("out/telemetry")
        w2.stop()
    finally:
        stop.set()
        load.join(10)
        a.stop()
    seqs = [t["seq"] for t in got]
    produced = max(seqs) - min(seqs) + 1
    delivered = len(set(seqs))
    counted = got[-1]["buffer"]["dropped_total"] + got[-1]["buffer"]["write_errors"]
    assert produced - delivered == counted, (produced, delivered, counted)  # every loss is counted
    assert counted > 0  # the outage outlasted the bound: drops happened, oldest first
    offline = sorted(s for s in set(seqs) if s > max(t["seq"] for t in got[:5]))
    assert offline == sorted(offline) and seqs == sorted(seqs)  # delivered in order
    assert got[-1]["totals"]["count"] > 0  # it was serving throughout
