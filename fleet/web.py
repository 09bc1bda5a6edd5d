"""`edgepack fleet serve`: a local web page of the fleet, live as messages arrive.

`FleetView` is the model: feed it (topic, payload) from any MQTT client; it keeps the device table
(fleet.status.FleetTable), each device's latest update step and a short p95 history, and the
retained rollout records, and tells waiting readers what changed since a sequence number.
`PageServer` serves one self-contained HTML page (fleet/static/fleet.html), a JSON snapshot
(`/api/fleet`) and a server-sent-event stream (`/api/stream`), standard library only.
`FleetPage` wires a view to the broker and a server (what the CLI runs).

The page has no login: it binds to 127.0.0.1 by default and refuses requests whose Host header
names another site (a DNS-rebinding page could otherwise read the fleet through the browser)."""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.records import FINAL_STATES, UpdateEvent, UpdateState
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json
from fleet.status import FleetTable

HISTORY = 120  # p95 points kept per device (two minutes at a 1 s telemetry interval)
STEPS = 12  # update steps kept per device (one update is 6-7 steps)
MAX_STREAMS = 32  # concurrent event streams (each holds a thread)
HEARTBEAT_S = 5.0  # a `tick` event at least this often: broker state, server clock, dead-client detection
ROLLOUT_SCHEMAS = ("edgepack.rollout/1",)  # what fleet/rollout_state.py writes


# ---- the model ----

def _s(d: dict, key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def rollout_view(rollout_id: str, doc) -> dict:
    """What the page shows of a retained rollout record, read leniently: a record from a newer or
    damaged controller still shows its id and whatever fields it has."""
    if not isinstance(doc, dict):
        return {"id": rollout_id, "readable": False}
    bundle = doc.get("bundle") if isinstance(doc.get("bundle"), dict) else {}
    waves = []
    for w in doc.get("waves") if isinstance(doc.get("waves"), list) else []:
        if not isinstance(w, dict):
            continue
        devices = [d for d in w.get("devices") or [] if isinstance(d, str)]
        outcomes = {k: v for k, v in (w.get("outcomes") or {}).items() if isinstance(v, str)} \
            if isinstance(w.get("outcomes"), dict) else {}
        waves.append({"devices": devices, "state": _s(w, "state"), "summary": _s(w, "summary"),
                      "outcomes": outcomes, "committed": sum(1 for v in outcomes.values() if v == "committed")})
    current = doc.get("current")
    return {"id": rollout_id, "readable": doc.get("schema") in ROLLOUT_SCHEMAS,
            "group": _s(doc, "group"), "name": _s(bundle, "name"), "version": _s(bundle, "version"),
            "status": _s(doc, "status"), "reason": _s(doc, "reason"), "waves": waves,
            "current": current if isinstance(current, int) and not isinstance(current, bool) else None,
            "updated": doc.get("updated") if isinstance(doc.get("updated"), (int, float)) else None}


@dataclass
class _Extra:
    """What the page keeps beside the FleetTable entry of one device."""

    update: dict | None = None  # the latest update step heard (status summary or event), with progress
    models: dict = field(default_factory=dict)  # model name -> the latest update step its events told
    heard: float = 0.0  # time.time() when this server last heard from the device
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (time heard, p95 ms) per window
    steps: deque = field(default_factory=lambda: deque(maxlen=STEPS))  # recent update steps, oldest first
    transfer: dict | None = None  # the last update's bytes (transfer_view), from its download progress
    transfers: dict = field(default_factory=dict)  # model name -> its last update's bytes

    def step(self, update: dict, at: float, *, from_status: bool = False) -> None:
        """Events are the ordered log of an update; the status summary (published directly, so it
        can overtake queued events) only fills in updates whose events this page did not hear."""
        mine = [s for s in self.steps if s["update_id"] == update["update_id"]]
        if from_status and mine and (mine[-1]["state"] in FINAL_STATES or update["state"] not in FINAL_STATES):
            return
        self.update = update
        last = self.steps[-1] if self.steps else None
        if update["state"] != UpdateState.IDLE and (last is None or (last["state"], last["update_id"], last["error"]) !=
                                          (update["state"], update["update_id"], update["error"])):
            keep = ("state", "update_id", "version", "error", "model")
            self.steps.append({"t": round(at, 3), **{k: update.get(k) for k in keep}})


def transfer_view(ev: UpdateEvent) -> dict | None:
    """What an update's download cost, from its progress event: `fetched` bytes (a delta's, this
    attempt's; None for a full transfer, which fetches what it does not resume) of `total`."""
    prog = ev.progress or {}
    total, fetched = prog.get("total"), prog.get("fetched")
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        return None
    return {"update_id": ev.update_id, "version": ev.version, "total": total,
            "fetched": fetched if isinstance(fetched, int) and not isinstance(fetched, bool) else None}


class FleetView:
    """Devices, their update steps and rollouts, with a change sequence for live readers."""

    def __init__(self, topics: Topics = Topics()):
        self.topics = topics
        self.table = FleetTable(topics)
        self._extra: dict[str, _Extra] = {}
        self._rollouts: dict[str, dict] = {}
        self._changed: dict[tuple[str, str], int] = {}  # ("device"|"rollout", id) -> seq of its last change
        self._cond = threading.Condition()
        self.seq = 0
        self.closed = False

    @property
    def subscriptions(self) -> list[str]:
        return [*self.table.subscriptions, self.topics.events(), self.topics.rollout()]

    def feed(self, topic: str, payload: bytes) -> None:
        """Take one message (any topic: those that are not ours are ignored)."""
        rollout_head = self.topics.rollout("")
        if topic.startswith(rollout_head) and "/" not in topic[len(rollout_head):]:
            return self._feed_rollout(topic[len(rollout_head):], payload)
        hit = self.topics.parse_device(topic)
        if hit is None:
            return
        dev, kind = hit
        if kind == "events":
            ev = UpdateEvent.from_dict(parse_json(payload))
            if ev is None or ev.state is None:
                return
            with self._cond:
                x = self._extra.setdefault(dev, _Extra())
                x.heard = time.time()
                pct = (ev.progress or {}).get("percent")
                step = {"state": ev.state, "update_id": ev.update_id, "version": ev.version, "error": ev.error,
                        "final": ev.final, "percent": pct if isinstance(pct, (int, float)) else None, "model": ev.model}
                x.step(step, x.heard)
                if ev.model:
                    x.models[ev.model] = step
                if (t := transfer_view(ev)) is not None:
                    x.transfer = t
                    if ev.model:
                        x.transfers[ev.model] = t
                self._bump(("device", dev))
            return
        if self.table.feed(topic, payload) is None:
            return
        entry = self.table.get(dev)
        with self._cond:
            if entry is None:  # a cleared retained status: the device was removed
                self._extra.pop(dev, None)
            else:
                x = self._extra.setdefault(dev, _Extra())
                x.heard = time.time()
                if kind == "status" and entry.status.update is not None and entry.status.update.state:
                    u = entry.status.update
                    x.step({"state": u.state, "update_id": u.update_id, "version": u.version, "error": u.error,
                            "final": u.state in FINAL_STATES, "percent": None}, x.heard, from_status=True)
                elif kind == "telemetry" and entry.telemetry is not None and entry.telemetry.p95_ms is not None:
                    x.history.append((round(x.heard, 3), entry.telemetry.p95_ms))
            self._bump(("device", dev))

    def _feed_rollout(self, rollout_id: str, payload: bytes) -> None:
        if not rollout_id:
            return
        doc = parse_json(payload)
        with self._cond:
            if doc is None and not payload:  # cleared retained record
                self._rollouts.pop(rollout_id, None)
            else:
                self._rollouts[rollout_id] = rollout_view(rollout_id, doc)
            self._bump(("rollout", rollout_id))

    def _bump(self, key: tuple[str, str]) -> None:  # caller holds self._cond
        self.seq += 1
        self._changed[key] = self.seq
        self._cond.notify_all()

    # ---- reading ----
    def device(self, dev: str, *, group: str | None = None) -> dict | None:
        entry = self.table.get(dev)
        if entry is None or (group is not None and group not in entry.status.groups):
            return None
        row = entry.row()
        raw, tel = entry.status_raw or {}, entry.telemetry
        with self._cond:
            x = self._extra.get(dev) or _Extra()
            for m in row["models"]:
                m["update_live"] = dict(x.models[m["name"]]) if m["name"] in x.models else None
                m["transfer"] = x.transfers.get(m["name"])
            row.update(update_live=dict(x.update) if x.update else None, heard=x.heard or entry.updated,
                       transfer=x.transfer,
                       p95_history=[list(p) for p in x.history], update_steps=list(x.steps),
                       model_error=_s(raw, "model_error"), reason=_s(raw, "reason"),
                       seq=tel.seq if tel else None,
                       throughput_ips=(tel.raw.get("inference") or {}).get("throughput_ips") if tel else None)
        return row

    def rollouts(self, *, group: str | None = None) -> list[dict]:
        with self._cond:
            items = list(self._rollouts.values())
        return sorted((r for r in items if group is None or r.get("group") in (None, group)),
                      key=lambda r: (r.get("updated") or 0, r["id"]), reverse=True)

    def snapshot(self, *, group: str | None = None) -> dict:
        devices = [r for r in (self.device(e.status.device_id, group=group) for e in self.table.entries(group=group))
                   if r is not None]
        groups = sorted({g for e in self.table.entries() for g in e.status.groups})
        return {"seq": self.seq, "server_time": time.time(), "group": group, "groups": groups,
                "devices": devices, "rollouts": self.rollouts(group=group)}

    def changes(self, since: int, *, group: str | None = None, timeout: float = HEARTBEAT_S) -> tuple[int, list[dict]]:
        """Wait up to `timeout` for changes after `since`; returns the new seq and one item per
        changed device ({"device": id, "row": row or None when gone or out of the group}) or
        rollout ({"rollout": id, "record": view or None})."""
        with self._cond:
            if self.seq == since and not self.closed:
                self._cond.wait(timeout)
            seq = self.seq
            keys = [k for k, s in self._changed.items() if s > since]
        out = []
        for kind, key in keys:
            if kind == "device":
                out.append({"device": key, "row": self.device(key, group=group)})
            else:
                rec = next((r for r in self.rollouts(group=group) if r["id"] == key), None)
                out.append({"rollout": key, "record": rec})
        return seq, out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


# ---- the HTTP side ----

def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InputError(f"--listen {text!r} is not HOST:PORT", hint="for example 127.0.0.1:8780")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PageServer(ThreadingHTTPServer):
    """Serves the page and its data for one FleetView. `connected` says whether the broker link is up."""

    daemon_threads = True

    def __init__(self, view: FleetView, *, host: str = "127.0.0.1", port: int = 0, group: str | None = None,
                 connected=lambda: True, broker_url: str = ""):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.view, self.group, self.connected, self.broker_url = view, group, connected, broker_url
        self.page = resources.files("fleet").joinpath("static/fleet.html").read_bytes()
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                             hint="pick another --listen port (or 0 for a free one)") from None
        self.loopback = is_loopback(host)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def host_allowed(self, header: str | None) -> bool:
        """On loopback, only loopback names: a foreign Host header means a rebinding attempt."""
        if not self.loopback:
            return True
        if not header:
            return False
        name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return is_loopback(name.strip("[]"))


_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _Handler(BaseHTTPRequestHandler):
    server: PageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # quiet: the CLI says where the page is, that is enough
        pass

    def do_GET(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            return self._send(403, b"forbidden host\n", "text/plain")
        url = urlsplit(self.path)
        route = ROUTES.get(url.path)
        if route is None:
            return self._send(404, b"not found\n", "text/plain")
        route(self, self._group(url.query))

    def _group(self, query: str) -> str | None:
        """--group fixes the scope; otherwise ?group= narrows it."""
        return self.server.group or (parse_qs(query).get("group") or [None])[0] or None

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        self.wfile.write(body)

    def page(self, group) -> None:
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def snapshot(self, group) -> None:
        snap = dict(self.server.view.snapshot(group=group), broker=self._broker(), scope=self.server.group)
        self._send(200, json.dumps(snap).encode(), "application/json")

    def _broker(self) -> dict:
        return {"url": self.server.broker_url, "connected": bool(self.server.connected())}

    def stream(self, group) -> None:
        """Server-sent events: `snapshot` first, then `device`/`rollout` changes and a `tick` at
        least every HEARTBEAT_S (a browser's EventSource reconnects by itself and gets a new snapshot)."""
        if not self.server.streams.acquire(blocking=False):
            return self._send(503, b"too many open pages\n", "text/plain")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            view = self.server.view
            snap = dict(view.snapshot(group=group), broker=self._broker(), scope=self.server.group)
            self._event("snapshot", snap)
            seq, last_tick = snap["seq"], 0.0
            while not view.closed:
                seq, items = view.changes(seq, group=group, timeout=HEARTBEAT_S)
                for it in items:
                    self._event("device" if "device" in it else "rollout", it)
                if time.monotonic() - last_tick >= HEARTBEAT_S or not items:
                    self._event("tick", {"server_time": time.time(), "broker": self._broker(), "seq": seq})
                    last_tick = time.monotonic()
                time.sleep(0.1)  # coalesce bursts: one row per device per 100 ms at most
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the page was closed
        finally:
            self.close_connection = True
            self.server.streams.release()

    def _event(self, name: str, data: dict) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


ROUTES = {"/": _Handler.page, "/index.html": _Handler.page, "/api/fleet": _Handler.snapshot,
          "/api/stream": _Handler.stream}


class FleetPage:
    """A FleetView fed from the broker and served over HTTP, in background threads until stop()."""

    def __init__(self, broker: BrokerConfig, *, host: str = "127.0.0.1", port: int = 0, group: str | None = None):
        self.view = FleetView(Topics(broker.topic_prefix))
        self.server = PageServer(self.view, host=host, port=port, group=group, broker_url=broker.url,
                                 connected=lambda: self._conn.client.connected.is_set())
        try:
            self._conn = Collector(broker, self.view.subscriptions, name="fleet-page", on_message=self.view.feed)
        except BaseException:
            self.server.server_close()
            raise
        self._thread = threading.Thread(target=self.server.serve_forever, name="fleet-page", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.view.close()
        self.server.shutdown()
        self.server.server_close()
        self._conn.stop()

    def __enter__(self) -> "FleetPage":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(broker: BrokerConfig, *, host: str = "127.0.0.1", port: int = 8780, group: str | None = None,
          ready=lambda url: None) -> None:
    """Run the page until Ctrl-C (`edgepack fleet serve`)."""
    page = FleetPage(broker, host=host, port=port, group=group)
    ready(page.url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        page.stop()


__all__ = ["FleetView", "PageServer", "FleetPage", "serve", "rollout_view", "parse_listen", "is_loopback"]
