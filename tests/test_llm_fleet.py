"""A generative model in the fleet: one agent serves the digits CNN and the tiny LLM; the LLM is updated
over the air (delta transfer, signed record) while clients keep using both, and the CNN never notices."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from agents import wait_until
from edgeproto.broker import BrokerConfig
from fleet.status import status
from otakit import agent, push

pytestmark = [pytest.mark.slow, pytest.mark.agent]


def _post(a, path: str, doc: dict) -> tuple[int, dict]:
    req = urllib.request.Request(a.base + path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _get(a, path: str) -> dict:
    with urllib.request.urlopen(a.base + path, timeout=10) as r:
        return json.loads(r.read())


DIGITS = {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.5] * 64}]}
PROMPT = {"model": "tiny-llm", "prompt": "The function returns", "max_tokens": 6, "temperature": 0}


class Load:
    """Clients on both models until stopped (bounded); what did not answer 200 is kept."""

    def __init__(self, a):
        self.stop, self.sent, self.failed, self.lock = threading.Event(), {"digits": 0, "llm": 0}, [], threading.Lock()
        calls = (("digits", "/v2/models/digits/infer", DIGITS), ("llm", "/v1/completions", PROMPT))
        self.threads = [threading.Thread(target=self._run, args=(a, *c), daemon=True) for c in calls]
        for t in self.threads:
            t.start()

    def _run(self, a, kind, path, body) -> None:
        for _ in range(100_000):
            if self.stop.is_set():
                return
            code, out = _post(a, path, body)
            with self.lock:
                self.sent[kind] += 1
                if code != 200:
                    self.failed.append((kind, code, out))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_an_llm_beside_a_cnn_is_updated_by_delta_and_the_cnn_serves_throughout(tmp_path, broker, versions,
                                                                                 llm_bundles, keys):
    a = agent(tmp_path, broker, None, keys, extra=("--bundle", str(versions["v1"]), "--bundle", str(llm_bundles["v1"])))
    try:
        assert {m["id"] for m in _get(a, "/v1/models")["data"]} == {"tiny-llm"}
        code, before = _post(a, "/v1/completions", PROMPT)
        assert code == 200 and before["usage"]["completion_tokens"] >= 1
        load = Load(a)
        wait_until(lambda: min(load.sent.values()) >= 5, 30, what="both models answering")
        rows = status(BrokerConfig(url=broker.url), listen_s=2.5)  # telemetry every second: two windows
        llm = next(m for m in rows[0]["models"] if m["name"] == "tiny-llm")
        assert llm["decode_tok_s"] > 0 and llm["ttft_p95_ms"] > 0, llm  # what `fleet status` shows per device
        assert next(m for m in rows[0]["models"] if m["name"] == "digits")["decode_tok_s"] is None
        progress = []
        res = push(broker, llm_bundles["v2"], device="dev1", model="tiny-llm", delta=True, wait=True, timeout=90,
                   sign=keys / "a.key", progress=lambda _d, e: progress.append(e["progress"]) if e.get("progress") else None)
        load.end()
        assert res.ok, res.devices
        assert not load.failed and min(load.sent.values()) >= 10, (load.sent, load.failed[:3])
        meta = _get(a, "/v2/models/tiny-llm")
        assert meta["versions"] == ["1.1.0"] and _get(a, "/v2/models/digits")["versions"] == ["1.0.0"]
        size = llm_bundles["v2"].stat().st_size
        last = progress[-1]
        assert last["fetched"] + last["reused"] == size and last["fetched"] < 0.5 * size, last  # same weights
        code, after = _post(a, "/v1/completions", PROMPT)
        assert code == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]  # the same weights
        code, out = _post(a, "/v2/models/digits/infer", DIGITS)
        assert code == 200 and np.asarray(out["outputs"][0]["data"]).size == 10
    finally:
        a.stop()
