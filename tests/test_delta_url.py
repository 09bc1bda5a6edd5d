"""Delta updates from a URL (`push --delta --url`): the chunks a device lacks come as byte ranges of
the bundle on an HTTP server (a real one on 127.0.0.1 that honours Range, and one that does not),
or from a file:// URL; every chunk hash-checked; only from allowed prefixes. Then a real agent on a
real broker takes such an update."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edgebundle.cdc import CdcParams, chunk_file
from edgeproto.desired import CdcTransfer, Desired, RecordError

ROOT = "edgepack/v1"
PARAMS = CdcParams(512, 2048, 16384)


class Server:
    """Serves one file; `ranges` honours `Range: bytes=a-b` (206), else the whole file (200).
    `asked` lists each request's Range header (None: none), `sent` the bytes sent."""

    def __init__(self, data: bytes, *, ranges: bool = True):
        self.data, self.ranges, self.asked, self.sent = data, ranges, [], 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                srv.asked.append(rng)
                body, code = srv.data, 200
                if rng and srv.ranges:
                    a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
                    body, code = srv.data[a:b + 1], 206
                srv.sent += len(body)  # before the client can have read it: the test reads `sent` then
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/b.edgepack"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _versions(tmp_path):
    from device_agent.store import Store

    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    new = old[:100_000] + rng.bytes(3000) + old[103_000:250_000] + rng.bytes(500) + old[250_500:]
    store = Store(tmp_path / "data")
    (store.bundles / "aaaa-old.edgepack").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    chunks = chunk_file(tmp_path / "new.bin", PARAMS)
    held = {c.sha256 for c in chunk_file(store.bundles / "aaaa-old.edgepack", PARAMS)}
    missing = sum(dict((c.sha256, c.size) for c in chunks if c.sha256 not in held).values())
    return store, new, chunks, missing


def _desired(new: bytes, chunks, url: str) -> Desired:
    t = CdcTransfer(topic=f"{ROOT}/chunks", params=PARAMS, chunk_sha256=tuple(c.sha256 for c in chunks),
                    chunk_sizes=tuple(c.size for c in chunks), url=url)
    return Desired(update_id="u1", name="m", version="1.0.0", sha256=hashlib.sha256(new).hexdigest(), size=len(new),
                   transfer=t)


def _fetch(d, store, work: Path, allowed: tuple[str, ...]):
    from device_agent.ota.delta import fetch_delta
    from device_agent.ota.transfer import TransferPolicy

    work.mkdir()
    seen = []
    out = fetch_delta(None, d, work, local=store, progress=lambda *a: seen.append(a), cancelled=lambda: False,
                      policy=TransferPolicy(allowed_urls=allowed))
    return out, seen[-1][2]


def test_record_with_url_round_trips_and_is_checked(tmp_path):
    import jsonschema

    _, new, chunks, _ = _versions(tmp_path)
    d = _desired(new, chunks, "https://models.example.com/m.edgepack")
    doc = d.to_dict()
    assert Desired.parse(json.dumps(doc).encode(), source="t", topic_prefix=ROOT).transfer == d.transfer
    jsonschema.validate(doc, json.loads((Path(__file__).parent.parent / "docs/schemas/desired.schema.json").read_text()))
    for bad in ("ftp://x/y", "https://x/a b", 7):
        wrong = {**doc, "transfer": {**doc["transfer"], "url": bad}}
        with pytest.raises(RecordError, match="url"):
            Desired.parse(json.dumps(wrong).encode(), source="t", topic_prefix=ROOT)


def test_missing_chunks_come_as_byte_ranges(tmp_path):
    store, new, chunks, missing = _versions(tmp_path)
    srv = Server(new)
    try:
        out, stats = _fetch(_desired(new, chunks, srv.url), store, tmp_path / "w", (srv.url,))
        assert out.read_bytes() == new
        assert stats["fetched"] == missing and stats["reused"] == len(new) - missing
        assert len(srv.asked) == 2 and all(r and r.startswith("bytes=") for r in srv.asked), srv.asked
        assert missing <= srv.sent < missing + 2 * 65536  # the runs around the two changes, gaps read through
    finally:
        srv.stop()


def test_server_without_ranges_and_file_urls_are_read_through_once(tmp_path):
    store, new, chunks, missing = _versions(tmp_path)
    srv = Server(new, ranges=False)
    try:
        out, stats = _fetch(_desired(new, chunks, srv.url), store, tmp_path / "w1", (srv.url,))
        assert out.read_bytes() == new and stats["fetched"] == missing
        assert len(srv.asked) == 1 and srv.sent == len(new)  # one pass, not one per run of chunks
    finally:
        srv.stop()
    url = (tmp_path / "new.bin").as_uri()
    out, stats = _fetch(_desired(new, chunks, url), store, tmp_path / "w2", (tmp_path.as_uri() + "/",))
    assert out.read_bytes() == new and stats["fetched"] == missing


def test_refused_url_and_wrong_file_fail_clearly(tmp_path):
    from device_agent.ota.transfer import TransferError

    store, new, chunks, _ = _versions(tmp_path)
    srv = Server(bytes(len(new)))  # another file at that URL
    try:
        with pytest.raises(TransferError, match="not allowed"):
            _fetch(_desired(new, chunks, srv.url), store, tmp_path / "w1", ("https://elsewhere/",))
        with pytest.raises(TransferError, match="do not match"):
            _fetch(_desired(new, chunks, srv.url), store, tmp_path / "w2", (srv.url,))
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.agent
def test_agent_takes_a_delta_from_a_url(broker, versions, keys, tmp_path):
    """A real agent on 1.0.0; `push --delta --url` of 1.1.0 (the same model built again as another
    version) from a local HTTP server: committed, only byte ranges fetched, nothing published."""
    from otakit import agent, push, version

    new = versions["v2"]
    srv = Server(new.read_bytes())
    a = agent(tmp_path, broker, versions["v1"], keys, extra=("--allow-url", srv.url.rsplit("/", 1)[0] + "/"))
    said = []
    try:
        progress = []
        res = push(broker, new, device="dev1", wait=True, timeout=90, sign=keys / "a.key", delta=True, url=srv.url,
                   chunk_size=1 << 20, inform=said.append,
                   progress=lambda _d, e: progress.append(e["progress"]) if e.get("progress") else None)
        assert res.ok and version(a) == "1.1.0", res.devices
        last = progress[-1]
        assert 0 < last["fetched"] < new.stat().st_size and last["fetched"] + last["reused"] == new.stat().st_size
        assert srv.asked and all(r and r.startswith("bytes=") for r in srv.asked), srv.asked
        assert any("nothing is published" in line for line in said), said
    finally:
        srv.stop()
        a.stop()
