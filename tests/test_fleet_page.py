"""`edgepack fleet serve`: the view and its JSON/SSE endpoints (fast), then the page in a real
headless browser against real agents and mosquitto (slow)."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from click.testing import CliRunner

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from fleet.web import FleetPage, FleetView, PageServer, parse_listen, rollout_view

ROOT = "edgepack/v1"


def _status(dev, *, groups=("a",), version="1.0.0", online=True, update=None):
    return json.dumps({"device_id": dev, "online": online, "groups": list(groups), "ts": "2026-11-23T00:00:00+00:00",
                       "model": {"name": "digits", "version": version}, "update": update}).encode()


def _telemetry(dev, seq, p95):
    return json.dumps({"device_id": dev, "seq": seq, "ts": "2026-11-23T00:00:01+00:00",
                       "inference": {"count": 10, "errors": 0, "throughput_ips": 5.0, "latency_ms": {"p95": p95}},
                       "totals": {"count": 10 * seq, "errors": 1}}).encode()


def _rollout(rid="r1", *, status="running", current=1):
    return {"schema": "edgepack.rollout/1", "id": rid, "group": "a", "status": status, "current": current,
            "bundle": {"name": "digits", "version": "1.1.0", "sha256": "0" * 64},
            "previous": None, "settings": {}, "baseline": {}, "reason": None, "created": 1.0, "updated": 2.0,
            "controller": "ctl", "waves": [
                {"devices": ["d1"], "state": "passed", "update_id": "r1-w1", "started": 1.0,
                 "outcomes": {"d1": "committed"}, "readings": {}, "summary": "p95 ok", "times": {}},
                {"devices": ["d2", "d3"], "state": "updating", "update_id": "r1-w2", "started": 2.0,
                 "outcomes": {"d2": "committed"}, "readings": {}, "summary": None, "times": {}}]}


def _models_status(dev, *, cls_version="2.0.0", cls_update=None) -> dict:
    """A device serving two models (det first, cls second), as a multi-model agent's status lists them."""
    def entry(name, version, update):
        return {"model": {"name": name, "version": version}, "model_error": None, "previous_model": None,
                "update": update, "threads": 1, "memory": None}

    return {"device_id": dev, "online": True, "groups": ["a"], "ts": "2026-11-23T00:00:00+00:00",
            "model": {"name": "det", "version": "1.0.0"}, "update": None,
            "models": {"det": entry("det", "1.0.0", None), "cls": entry("cls", cls_version, cls_update)}}


def _models_telemetry(dev, seq, *, cls_p95=9.0) -> dict:
    """One window of both models: the device's sum, and each model's own window and totals."""
    det = {"count": 10, "errors": 0, "throughput_ips": 1.0, "latency_ms": {"p95": 2.0}}
    cls = {"count": 20, "errors": 2, "throughput_ips": 2.0, "latency_ms": {"p95": cls_p95}}
    return {"device_id": dev, "seq": seq, "ts": "2026-11-23T00:00:01+00:00",
            "model": {"name": "det", "version": "1.0.0"},
            "inference": {"count": 30, "errors": 2, "throughput_ips": 3.0, "latency_ms": {"p95": cls_p95}},
            "totals": {"count": 30 * seq, "errors": 3},
            "models": {"det": {"version": "1.0.0", "inference": det, "totals": {"count": 10 * seq, "errors": 0}},
                       "cls": {"version": "2.0.0", "inference": cls, "totals": {"count": 20 * seq, "errors": 3},
                               "drift": {"image": {"psi": 1.84, "psi_max": 10.1, "ks": 0.89, "values": 6400},
                                         "output_0": {"psi": 0.05, "psi_max": 0.05, "ks": 0.01, "values": 100}}}}}


def _fed() -> FleetView:
    v = FleetView()
    v.feed(f"{ROOT}/devices/d1/status", _status("d1", groups=("a",)))
    v.feed(f"{ROOT}/devices/d2/status", _status("d2", groups=("b",), update={"state": "committed", "version": "1.0.0"}))
    return v


def test_view_rows_update_steps_history_and_rollouts():
    v = _fed()
    for seq, p95 in ((1, 2.5), (2, 3.5)):
        v.feed(f"{ROOT}/devices/d1/telemetry", _telemetry("d1", seq, p95))
    # what must not break the view: another root, junk payloads, an event without a state, a lease topic
    for topic, payload in (("other/v1/devices/x/status", _status("x")), (f"{ROOT}/devices/d1/telemetry", b"\xff{"),
                           (f"{ROOT}/devices/d1/events", b'{"update_id": "u1"}'), (f"{ROOT}/devices/d3/telemetry", b"[1]"),
                           (f"{ROOT}/rollouts/r1/lease", b'{"owner": "x"}'),
                           (f"{ROOT}/devices/d1/events", b'{"update_id": "u1", "state": "downloading", "progress": {"percent": "x"}}'),
                           (f"{ROOT}/devices/d2/status", _status("d2", groups=("b",), update={"state": 5}))):
        v.feed(topic, payload)
    v.feed(f"{ROOT}/devices/d1/events", json.dumps({"update_id": "u1", "state": "downloading", "version": "1.1.0",
                                                    "progress": {"bytes": 1, "total": 2, "percent": 50.0}}).encode())
    snap = v.snapshot()
    assert [r["device_id"] for r in snap["devices"]] == ["d1", "d2"] and snap["groups"] == ["a", "b"]
    d1 = snap["devices"][0]
    assert (d1["model"], d1["version"], d1["p95_ms"], d1["errors"], d1["seq"]) == ("digits", "1.0.0", 3.5, 1, 2)
    assert [p[1] for p in d1["p95_history"]] == [2.5, 3.5]
    assert d1["update_live"] == {"state": "downloading", "update_id": "u1", "version": "1.1.0", "error": None,
                                 "final": False, "percent": 50.0, "model": None}  # an agent that predates models
    assert [s["state"] for s in d1["update_steps"]] == ["downloading"]
    d2 = snap["devices"][1]  # an update that ended before the page started: known from the status only
    assert d2["update_live"]["state"] == "committed" and d2["update_live"]["final"]
    assert [s["state"] for s in d2["update_steps"]] == ["committed"]
    # a status that overtakes the queued events does not reorder the steps; the events carry on
    for st in ("verifying", "switching"):
        v.feed(f"{ROOT}/devices/d1/events", json.dumps({"update_id": "u1", "state": st, "version": "1.1.0"}).encode())
    v.feed(f"{ROOT}/devices/d1/status", _status("d1", update={"state": "probation", "update_id": "u1"}))
    v.feed(f"{ROOT}/devices/d1/events", json.dumps({"update_id": "u1", "state": "probation"}).encode())
    v.feed(f"{ROOT}/devices/d1/events", json.dumps({"update_id": "u1", "state": "committed"}).encode())
    d1 = v.device("d1")
    assert [s["state"] for s in d1["update_steps"]] == ["downloading", "verifying", "switching", "probation",
                                                        "committed"]
    assert d1["update_live"]["state"] == "committed"
    assert [r["device_id"] for r in v.snapshot(group="b")["devices"]] == ["d2"]

    seq = v.seq
    v.feed(f"{ROOT}/rollouts/r1", json.dumps(_rollout()).encode())
    v.feed(f"{ROOT}/rollouts/odd", json.dumps({"schema": "edgepack.rollout/9", "waves": "nonsense"}).encode())
    seq2, items = v.changes(seq, timeout=0)
    assert seq2 == seq + 2 and {i["rollout"] for i in items} == {"r1", "odd"}
    ro = {r["id"]: r for r in v.rollouts()}
    assert ro["odd"]["readable"] is False and ro["odd"]["waves"] == []
    r1 = ro["r1"]
    assert (r1["name"], r1["version"], r1["group"], r1["status"], r1["current"]) == ("digits", "1.1.0", "a", "running", 1)
    assert [(w["state"], w["committed"], len(w["devices"])) for w in r1["waves"]] == [("passed", 1, 1), ("updating", 1, 2)]
    assert v.rollouts(group="b") == [ro["odd"]]  # a record without a group shows in every group

    v.feed(f"{ROOT}/rollouts/r1", b"")  # cleared retained record
    v.feed(f"{ROOT}/devices/d2/status", b"")  # a removed device
    _, items = v.changes(seq2, timeout=0)
    assert {"rollout": "r1", "record": None} in items and {"device": "d2", "row": None} in items
    assert [r["id"] for r in v.rollouts()] == ["odd"] and [r["device_id"] for r in v.snapshot()["devices"]] == ["d1"]
    assert rollout_view("x", None) == {"id": "x", "readable": False}
    v = _fed()
    v.feed(f"{ROOT}/devices/d1/events", b'{"update_id": "u2", "state": "downloading", "progress": {"percent": "x"}}')
    assert v.device("d1")["update_live"]["percent"] is None


def test_view_lists_each_model_with_its_own_figures_and_update():
    """A multi-model device: a row per model with its version, p95, errors and update (from its own
    events, until the status names a later update); the device row keeps the device's sums."""
    v = FleetView()
    v.feed(f"{ROOT}/devices/m1/status", json.dumps(_models_status("m1")).encode())
    v.feed(f"{ROOT}/devices/m1/telemetry", json.dumps(_models_telemetry("m1", 4)).encode())
    v.feed(f"{ROOT}/devices/m1/events", json.dumps({"update_id": "u9", "state": "downloading", "model": "cls",
                                                    "version": "2.1.0", "progress": {"percent": 40.0}}).encode())
    row = v.device("m1")
    assert (row["model"], row["p95_ms"], row["errors"]) == ("det", 9.0, 3)  # the device: its first model, its sums
    det, cls = row["models"]
    assert (det["name"], det["version"], det["p95_ms"], det["errors"], det["update_live"]) == ("det", "1.0.0", 2.0, 0,
                                                                                                None)
    assert (cls["name"], cls["version"], cls["p95_ms"], cls["errors"], cls["throughput_ips"]) == ("cls", "2.0.0", 9.0,
                                                                                                  3, 2.0)
    assert cls["update_live"]["state"] == "downloading" and cls["update_live"]["percent"] == 40.0
    assert row["update_steps"][-1]["model"] == "cls"
    done = {"state": "committed", "update_id": "u9", "version": "2.1.0"}
    v.feed(f"{ROOT}/devices/m1/status", json.dumps(_models_status("m1", cls_version="2.1.0", cls_update=done)).encode())
    cls = v.device("m1")["models"][1]
    assert (cls["version"], cls["update"], cls["update_id"]) == ("2.1.0", "committed", "u9")
    one = FleetView()  # an agent that predates models: its one model is the device's
    one.feed(f"{ROOT}/devices/d1/status", _status("d1"))
    one.feed(f"{ROOT}/devices/d1/telemetry", _telemetry("d1", 1, 2.5))
    assert [(m["name"], m["version"], m["p95_ms"], m["errors"]) for m in one.device("d1")["models"]] == [
        ("digits", "1.0.0", 2.5, 1)]


def _get(server, path, host=None):
    c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    c.request("GET", path, headers={"Host": host} if host else {})
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


class _Stream:
    """An SSE reader with a bounded wait per event."""

    def __init__(self, server, path):
        self.c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=8)
        self.c.request("GET", path)
        self.r = self.c.getresponse()
        assert self.r.status == 200 and self.r.getheader("Content-Type") == "text/event-stream"

    def next(self, name: str, max_events: int = 20) -> dict:
        for _ in range(max_events):
            event, data = None, None
            while True:
                line = self.r.fp.readline().decode()
                assert line, "stream ended"
                if line == "\n":
                    break
                key, _, value = line.rstrip("\n").partition(": ")
                event, data = (value, data) if key == "event" else (event, value if key == "data" else data)
            if event == name:
                return json.loads(data)
        raise AssertionError(f"no {name} event in {max_events}")

    def close(self):
        self.c.close()


def test_server_json_and_event_stream():
    v = _fed()
    srv = PageServer(v, port=0, broker_url="mqtt://127.0.0.1:1")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code, headers, body = _get(srv, "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert "connect-src 'self'" in headers["Content-Security-Policy"]
        page = body.decode()
        assert "<script src" not in page and 'href="http' not in page and "EventSource" in page
        code, _, body = _get(srv, "/api/fleet?group=a")
        snap = json.loads(body)
        assert code == 200 and [r["device_id"] for r in snap["devices"]] == ["d1"] and snap["broker"]["connected"]
        assert _get(srv, "/nope")[0] == 404
        assert _get(srv, "/api/fleet", host="evil.example:8780")[0] == 403  # DNS rebinding
        assert _get(srv, "/api/fleet", host="localhost:8780")[0] == 200

        s = _Stream(srv, "/api/stream?group=a")
        try:
            assert [r["device_id"] for r in s.next("snapshot")["devices"]] == ["d1"]
            v.feed(f"{ROOT}/devices/d2/telemetry", _telemetry("d2", 1, 9.0))  # group b: comes as "not ours"
            v.feed(f"{ROOT}/devices/d1/telemetry", _telemetry("d1", 7, 4.25))
            got = {}
            deadline = time.monotonic() + 5
            while "d1" not in got and time.monotonic() < deadline:
                ev = s.next("device")
                got[ev["device"]] = ev["row"]
            assert got["d1"]["p95_ms"] == 4.25 and got["d1"]["seq"] == 7 and got.get("d2", None) is None
            v.feed(f"{ROOT}/rollouts/r1", json.dumps(_rollout()).encode())
            assert s.next("rollout")["record"]["waves"][1]["committed"] == 1
        finally:
            s.close()
    finally:
        v.close()
        srv.shutdown()
        srv.server_close()


def test_server_scope_and_broker_state():
    """--group fixes the scope whatever the page asks; the broker's state is reported as it is."""
    link = {"up": False}
    srv = PageServer(_fed(), port=0, group="b", connected=lambda: link["up"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        snap = json.loads(_get(srv, "/api/fleet?group=a")[2])
        assert [r["device_id"] for r in snap["devices"]] == ["d2"] and snap["scope"] == "b"
        assert snap["broker"]["connected"] is False
        link["up"] = True
        assert json.loads(_get(srv, "/api/fleet")[2])["broker"]["connected"] is True
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_cli_refuses_bad_listen_and_busy_port():
    from edgepack.cli import main

    assert parse_listen("[::1]:0") == ("::1", 0)
    res = CliRunner().invoke(main, ["fleet", "serve", "--listen", "localhost"])
    assert res.exit_code == 2 and "not HOST:PORT" in res.output
    srv = PageServer(FleetView(), port=0)
    try:
        with pytest.raises(InputError, match="cannot listen"):
            PageServer(FleetView(), port=srv.server_address[1])
    finally:
        srv.server_close()
    assert "127.0.0.1" in CliRunner().invoke(main, ["fleet", "serve", "--help"]).output


def test_fleet_page_over_mosquitto(broker):
    """The page's feed from a real broker: retained status and rollout records, live telemetry."""
    from otakit import Publisher

    from agents import wait_until

    pub = Publisher(broker.url)
    try:
        pub.publish(f"{ROOT}/devices/m1/status", json.loads(_status("m1")))
        pub.publish(f"{ROOT}/rollouts/r1", _rollout())
        with FleetPage(BrokerConfig(url=broker.url), port=0) as page:
            def snap():
                c = http.client.HTTPConnection("127.0.0.1", page.server.server_address[1], timeout=5)
                c.request("GET", "/api/fleet")
                return json.loads(c.getresponse().read())

            s = wait_until(lambda: (lambda x: x if x["devices"] and x["rollouts"] else None)(snap()), 10,
                           what="retained records on the page")
            assert s["devices"][0]["version"] == "1.0.0" and s["rollouts"][0]["id"] == "r1" and s["broker"]["connected"]
            pub.publish(f"{ROOT}/devices/m1/telemetry", json.loads(_telemetry("m1", 3, 1.5)), retain=False)
            wait_until(lambda: snap()["devices"][0]["p95_ms"] == 1.5, 10, what="live telemetry")
    finally:
        pub.stop()


_ROWS_JS = """return [...document.querySelectorAll('#devices tbody tr[data-device]')].map(tr => ({id: tr.dataset.device,
  seq: tr.dataset.seq, cells: Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.textContent]))}))"""


_ROLLOUT_JS = """const box = document.querySelector(`.rollout[data-rollout="${arguments[0]}"]`);
return box && {text: box.textContent, waves: [...box.querySelectorAll('.wave')].map(w => ({state: w.dataset.state,
  text: w.textContent, cls: w.className}))}"""


@pytest.mark.slow
@pytest.mark.agent
def test_fleet_page_in_browser(broker, versions, keys, tmp_path):
    """Two real agents (one per group) on mosquitto, the page in headless Chromium: rows, live
    telemetry without a reload, the group filter, an update's steps, a rollout record, no console errors."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from agents import wait_until
    from browser import console_errors, headless_chrome, screenshot
    from otakit import Publisher, agent, infer, push

    def rows(d) -> dict:
        return {r["id"]: r for r in d.execute_script(_ROWS_JS)}

    north = agent(tmp_path, broker, versions["v1"], keys, device="north-1", group="north", name="n")
    south = agent(tmp_path, broker, versions["v1"], keys, device="south-1", group="south", name="s")
    try:
        with FleetPage(BrokerConfig(url=broker.url), port=0) as page, headless_chrome(height=1500) as d:
            d.get(page.url)
            assert d.title == "edgepack fleet"
            # online comes with the retained status, the error count with the first telemetry
            r = wait_until(lambda: (lambda x: x if len(x) == 2 and all(
                v["cells"]["online"] == "online" and v["cells"]["errors"] != "-" for v in x.values()) else None)(rows(d)),
                           20, what="both devices on the page with their first telemetry")
            for dev, group in (("north-1", "north"), ("south-1", "south")):
                c = r[dev]["cells"]
                assert (c["model"], c["version"], c["groups"], c["errors"]) == ("digits", "1.0.0", group, "0"), c
            assert "connected" in d.execute_script("return document.getElementById('broker').textContent")

            # live: requests on north-1 show up as a p95 and a longer chart line, with no reload
            d.execute_script("window.notReloaded = true")
            seq0 = int(rows(d)["north-1"]["seq"] or 0)
            points = 'svg[data-chart=p95] polyline[data-device="north-1"]'
            for i in range(40):  # ~3 telemetry windows with requests: a p95 and a line on the chart
                assert infer(north) == 200
                if i == 5:
                    wait_until(lambda: rows(d)["north-1"]["cells"]["p95"] not in ("-", ""), 15, what="p95 on the page")
                    live = rows(d)["north-1"]
                    assert int(live["seq"]) > seq0 and float(live["cells"]["p95"]) > 0
                time.sleep(0.08)
            wait_until(lambda: d.execute_script(f"return +document.querySelector('{points}').dataset.n") >= 2, 10,
                       what="p95 points on the chart")  # read in the page: the chart is redrawn as data arrives
            assert d.execute_script("return window.notReloaded") is True
            screenshot(d, "fleet-page.png")

            # the group filter
            Select(d.find_element(By.ID, "group")).select_by_value("south")
            wait_until(lambda: set(rows(d)) == {"south-1"}, 5, what="filtered rows")
            assert "group=south" in d.current_url
            assert not d.find_elements(By.CSS_SELECTOR, 'svg[data-chart=p95] polyline[data-device="north-1"]')
            screenshot(d, "fleet-page-group.png")
            Select(d.find_element(By.ID, "group")).select_by_value("")
            wait_until(lambda: set(rows(d)) == {"north-1", "south-1"}, 5, what="all rows again")

            # an update: the steps show up as they happen, then the new version
            res = push(broker, versions["v2"], device="south-1", sign=keys / "a.key")
            wait_until(lambda: rows(d)["south-1"]["cells"]["version"] == "1.1.0"
                       and rows(d)["south-1"]["cells"]["update"].startswith("committed"), 60, what="update committed")
            steps = d.execute_script("return [...document.querySelectorAll('#activity li[data-device=\"south-1\"]')]"
                                     ".map(li => li.dataset.state)")
            assert steps[::-1] == ["downloading", "verifying", "staging", "switching", "probation", "committed"], steps
            assert rows(d)["north-1"]["cells"]["version"] == "1.0.0"

            # a rollout record (the format fleet/rollout_state.py retains) shows its waves
            rec = _rollout("canary")
            rec["waves"][0]["devices"], rec["waves"][0]["outcomes"] = ["south-1"], {"south-1": "committed"}
            rec["bundle"]["version"], rec["group"] = "1.1.0", "south"
            pub = Publisher(broker.url)
            try:
                pub.publish(f"{ROOT}/rollouts/canary", rec)
            finally:
                pub.stop()
            box = wait_until(lambda: d.execute_script(_ROLLOUT_JS, "canary"), 10, what="rollout on the page")
            assert "digits 1.1.0" in box["text"] and "group south" in box["text"] and "running" in box["text"]
            assert [w["state"] for w in box["waves"]] == ["passed", "updating"]
            assert "1/1 committed" in box["waves"][0]["text"] and "current" in box["waves"][1]["cls"]

            # a device that stops shows offline
            north.stop()
            wait_until(lambda: rows(d)["north-1"]["cells"]["online"].startswith("offline"), 10, what="offline")
            screenshot(d, "fleet-page-update.png")
            assert console_errors(d) == []
        assert res.desired["version"] == "1.1.0"
    finally:
        north.stop()
        south.stop()


_MODELS_JS = """return [...document.querySelectorAll('#devices tbody tr[data-model-of]')].map(tr => ({
  device: tr.dataset.modelOf, model: tr.dataset.model,
  cells: Object.fromEntries([...tr.cells].filter(td => td.dataset.col)
    .map(td => [td.dataset.col, td.textContent]))}))"""


def test_fleet_page_shows_each_model_in_browser(broker):
    """The page in headless Chromium over mosquitto: a two-model device gets a row per model with its
    version, p95 and errors, live as telemetry and events arrive; a one-model device keeps one row."""
    from agents import wait_until
    from browser import console_errors, headless_chrome, screenshot
    from otakit import Publisher

    pub = Publisher(broker.url)
    try:
        pub.publish(f"{ROOT}/devices/multi-1/status", _models_status("multi-1"))
        pub.publish(f"{ROOT}/devices/solo-1/status", json.loads(_status("solo-1")))
        with FleetPage(BrokerConfig(url=broker.url), port=0) as page, headless_chrome(height=1200) as d:
            d.get(page.url)

            def models() -> dict:
                return {(m["device"], m["model"]): m["cells"] for m in d.execute_script(_MODELS_JS)}

            wait_until(lambda: len(models()) == 2, 15, what="a row per model of multi-1")
            dev = {r["id"]: r["cells"] for r in d.execute_script(_ROWS_JS)}
            assert dev["multi-1"]["model"] == "2 models" and dev["solo-1"]["model"] == "digits"
            assert set(models()) == {("multi-1", "det"), ("multi-1", "cls")}  # solo-1 has no model rows
            pub.publish(f"{ROOT}/devices/multi-1/telemetry", _models_telemetry("multi-1", 1, cls_p95=7.5), retain=False)
            m = wait_until(lambda: (lambda x: x if x[("multi-1", "cls")]["p95"] == "7.50" else None)(models()), 10,
                           what="cls's own p95 on the page")
            assert (m[("multi-1", "cls")]["version"], m[("multi-1", "cls")]["errors"]) == ("2.0.0", "3")
            assert (m[("multi-1", "det")]["p95"], m[("multi-1", "det")]["errors"]) == ("2.00", "0")
            # drift: the model's most drifted tensor; the device row shows its worst model
            assert (m[("multi-1", "cls")]["drift"], m[("multi-1", "det")]["drift"]) == ("1.84", "-")
            assert {r["id"]: r["cells"] for r in d.execute_script(_ROWS_JS)}["multi-1"]["drift"] == "1.84"
            pub.publish(f"{ROOT}/devices/multi-1/events", {"update_id": "u9", "state": "downloading", "model": "cls",
                                                           "version": "2.1.0", "progress": {"percent": 40.0}},
                        retain=False)
            cell = wait_until(lambda: (lambda c: c if "downloading" in c else None)(
                models()[("multi-1", "cls")]["update"]), 10, what="cls's update on its own row")
            assert "40%" in cell and "2.1.0" in cell and models()[("multi-1", "det")]["update"] == "-"
            screenshot(d, "fleet-page-models.png")
            assert console_errors(d) == []
    finally:
        pub.stop()


_STATE_JS = """return Object.fromEntries([...document.querySelectorAll('#devices tbody tr[data-device]')].map(tr => [
  tr.dataset.device, {silent: tr.querySelector('[data-col=online]').dataset.silent,
  state: tr.querySelector('[data-col=online]').textContent, old: tr.querySelector('[data-col=update]').dataset.old,
  update: tr.querySelector('[data-col=update]').innerHTML, errors: tr.querySelector('[data-col=errors]').textContent,
  errorsBad: tr.querySelector('[data-col=errors]').classList.contains('bad'),
  drift: tr.querySelector('[data-col=drift]').title}]))"""


def test_fleet_page_says_what_is_stale_refused_drifted_and_rolled_back(broker):
    """Issue 24, finding 6, in headless Chromium over mosquitto: a device whose last status says online
    but that sent nothing for ten minutes is "silent"; a failed update two hours old is grey with its age;
    requests refused as bad input are shown beside the model's errors, not as them; the drift cell says
    which tensor shifted and what that means; a rolled-back wave is not drawn as committed; 21 devices
    in the chart get 21 colours."""
    from datetime import datetime, timedelta, timezone

    from agents import wait_until
    from browser import console_errors, headless_chrome, screenshot
    from otakit import Publisher

    ago = lambda **kw: (datetime.now(timezone.utc) - timedelta(**kw)).isoformat()  # noqa: E731
    pub = Publisher(broker.url)
    try:
        pub.publish(f"{ROOT}/devices/quiet-1/status", dict(json.loads(_status("quiet-1")), ts=ago(minutes=10)))
        pub.publish(f"{ROOT}/devices/old-1/status", dict(json.loads(_status("old-1")), ts=ago(seconds=1), update={
            "state": "failed", "version": "0.9.0", "error": "downgrade refused", "issued": ago(hours=2)}))
        pub.publish(f"{ROOT}/devices/new-1/status", dict(_models_status("new-1"), ts=ago(seconds=1), update={
            "state": "failed", "version": "0.9.0", "error": "downgrade refused", "issued": ago(seconds=30)}))
        ro = _rollout("r9", status="stopped", current=1)
        ro["waves"][1].update(state="rolled_back", outcomes={"d2": "committed", "d3": "committed"})
        pub.publish(f"{ROOT}/rollouts/r9", ro)
        with FleetPage(BrokerConfig(url=broker.url), port=0) as page, headless_chrome(height=1400) as d:
            d.get(page.url)
            wait_until(lambda: len(d.execute_script(_STATE_JS)) == 3, 15, what="three rows")
            for i in range(21):
                pub.publish(f"{ROOT}/devices/chart-{i:02d}/status", dict(json.loads(_status(f"chart-{i:02d}")),
                                                                          ts=ago(seconds=1)))
                pub.publish(f"{ROOT}/devices/chart-{i:02d}/telemetry", dict(
                    json.loads(_telemetry(f"chart-{i:02d}", 1, 2.0 + i / 10)), ts=ago(seconds=1),
                    totals={"count": 10, "errors": 0, "rejected": 5 if i == 0 else 0},
                    models=None, drift=None), retain=False)
            pub.publish(f"{ROOT}/devices/new-1/telemetry", dict(_models_telemetry("new-1", 1),
                                                               ts=ago(seconds=1)), retain=False)
            rows = wait_until(lambda: (lambda s: s if len(s) == 24 and "+5 refused" in s["chart-00"]["errors"]
                                       else None)(d.execute_script(_STATE_JS)), 20, what="24 rows, chart-00's refusals")
            assert rows["quiet-1"]["silent"] == "true" and rows["quiet-1"]["state"].startswith("silent (nothing for 10")
            assert rows["old-1"]["silent"] == "false" and rows["old-1"]["state"] == "online"
            assert rows["old-1"]["old"] == "true" and "2.0 h ago" in rows["old-1"]["update"]
            assert 'class="bad"' not in rows["old-1"]["update"]  # grey, not red
            assert rows["new-1"]["old"] == "false" and 'class="bad"' in rows["new-1"]["update"]
            assert rows["chart-00"]["errors"] == "0 +5 refused" and not rows["chart-00"]["errorsBad"]
            assert "image" in rows["new-1"]["drift"] and "shifted" in rows["new-1"]["drift"]  # psi 1.84
            box = d.execute_script(_ROLLOUT_JS, "r9")
            back = box["waves"][1]
            assert back["state"] == "rolled_back" and "rolled back (2/2 had committed)" in back["text"]
            assert d.execute_script(
                "return document.querySelector('.rollout[data-rollout=r9] .wave[data-wave=\"2\"] .bar > span')"
                ".style.width") == "0%"
            colors = d.execute_script("return [...document.querySelectorAll('#p95 polyline')].map(p => p.getAttribute('stroke'))")
            assert len(colors) == 24 and len(set(colors)) == 24, colors
            assert "23 online" in d.execute_script("return document.getElementById('counts').textContent")
            screenshot(d, "fleet-page-stale.png")
            assert console_errors(d) == []
    finally:
        pub.stop()
