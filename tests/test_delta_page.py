"""Issue 19 item 4 on the fleet page: each device's (and each model's) last update says the bytes
it fetched against the bundle's size, from the download progress its update events carry."""
from __future__ import annotations

import json

import pytest

from edgeproto.broker import BrokerConfig
from fleet.web import FleetPage, FleetView
from test_fleet_page import _MODELS_JS, _ROWS_JS, _models_status, _status

ROOT = "edgepack/v1"


def _event(uid, *, version="1.1.0", model=None, **progress) -> dict:
    return {"update_id": uid, "state": "downloading", "version": version, "model": model,
            "progress": {"percent": 100.0, **progress}}


def test_view_keeps_each_last_update_bytes():
    v = FleetView()
    v.feed(f"{ROOT}/devices/d1/status", _status("d1"))
    v.feed(f"{ROOT}/devices/m1/status", json.dumps(_models_status("m1")).encode())
    assert v.device("d1")["transfer"] is None
    v.feed(f"{ROOT}/devices/d1/events", json.dumps(_event("u1", bytes=500, total=500)).encode())
    assert v.device("d1")["transfer"] == {"update_id": "u1", "version": "1.1.0", "total": 500, "fetched": None}
    v.feed(f"{ROOT}/devices/d1/events",  # a later delta update: a progress event without sizes changes nothing
           json.dumps(_event("u2", version="1.2.0", bytes=800, total=800, fetched=60, reused=740)).encode())
    v.feed(f"{ROOT}/devices/d1/events", json.dumps({"update_id": "u2", "state": "committed"}).encode())
    assert v.device("d1")["transfer"] == {"update_id": "u2", "version": "1.2.0", "total": 800, "fetched": 60}
    v.feed(f"{ROOT}/devices/m1/events",
           json.dumps(_event("u3", model="cls", bytes=900, total=900, fetched=90, reused=810)).encode())
    models = {m["name"]: m["transfer"] for m in v.device("m1")["models"]}
    assert models == {"det": None, "cls": {"update_id": "u3", "version": "1.1.0", "total": 900, "fetched": 90}}
    v.feed(f"{ROOT}/devices/d1/events", json.dumps(_event("u4", total=True, fetched="x")).encode())  # not sizes
    assert v.device("d1")["transfer"]["update_id"] == "u2"


@pytest.mark.slow
def test_fleet_page_shows_bytes_fetched_in_browser(broker):
    """Headless Chromium over mosquitto: the `fetched` column of a device row and of a model row."""
    from agents import wait_until
    from browser import console_errors, headless_chrome
    from otakit import Publisher

    pub = Publisher(broker.url)
    try:
        pub.publish(f"{ROOT}/devices/solo-1/status", json.loads(_status("solo-1")))
        pub.publish(f"{ROOT}/devices/multi-1/status", _models_status("multi-1"))
        with FleetPage(BrokerConfig(url=broker.url), port=0) as page, headless_chrome(height=1200) as d:
            d.get(page.url)

            def rows() -> dict:
                return {r["id"]: r["cells"] for r in d.execute_script(_ROWS_JS)}

            wait_until(lambda: {"solo-1", "multi-1"} <= set(rows()), 15, what="both devices on the page")
            assert rows()["solo-1"]["fetched"] == "-"
            pub.publish(f"{ROOT}/devices/solo-1/events", _event("u1", bytes=1_600_000, total=1_600_000), retain=False)
            wait_until(lambda: rows()["solo-1"]["fetched"] == "full 1.6 MB", 10, what="a full transfer's size")
            pub.publish(f"{ROOT}/devices/solo-1/events",
                        _event("u2", bytes=1_600_000, total=1_600_000, fetched=120_000, reused=1_480_000), retain=False)
            wait_until(lambda: rows()["solo-1"]["fetched"] == "120.0 kB / 1.6 MB 8%", 10, what="a delta's bytes")
            pub.publish(f"{ROOT}/devices/multi-1/events",
                        _event("u3", model="cls", bytes=40_000, total=40_000, fetched=4_000, reused=36_000),
                        retain=False)

            def model_cells() -> dict:
                return {(m["device"], m["model"]): m["cells"] for m in d.execute_script(_MODELS_JS)}

            wait_until(lambda: model_cells()[("multi-1", "cls")]["fetched"] == "4.0 kB / 40.0 kB 10%", 10,
                       what="the model row's bytes")
            assert model_cells()[("multi-1", "det")]["fetched"] == "-"
            assert console_errors(d) == []
    finally:
        pub.stop()
