"""Local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1.

Built on the standard library's ThreadingHTTPServer (a maintained HTTP stack with a thread per
connection and keep-alive): it costs ~12 MB less RSS than an asyncio framework on a 1-4 GB
board, and inference is serialised on the model anyway. Bound to 127.0.0.1 by default. Every
error answers in the protocol's format ({"error": "..."}) with a 4xx/5xx status; nothing a
client sends can crash the agent."""
from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from device_agent import __version__
from device_agent.kserve import HEADER_LEN, decode_request, encode_response, tensor_meta
from device_agent.model import Model, ModelClosed
from device_agent.stats import InferenceStats
from edgebundle.errors import EdgepackError

log = logging.getLogger("edgepack.agent.api")

_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?/?$")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ApiServer:
    """`get_model` returns the model serving right now (it may change between requests:
    a request keeps the model it started with, so a swap never breaks one in flight)."""

    def __init__(self, get_model: Callable[[], Model | None], *, stats: InferenceStats, host: str = "127.0.0.1",
                 port: int = 8080, token: str | None = None, max_body_bytes: int = 16 << 20):
        self.get_model, self.stats, self.token, self.max_body = get_model, stats, token, max_body_bytes
        api = self

        class Handler(_Handler):
            server_api = api

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="v2-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- routes: (status, JSON-able body) or raw (status, bytes, headers) ----
    def route(self, method: str, path: str, headers, read_body: Callable[[], bytes]):
        if path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/"):
            if method != "GET":
                raise HttpError(405, f"{method} is not allowed on {path}")
            if path == "/v2/health/live":
                return 200, {"live": True}
            if path == "/v2/health/ready":
                ok = self.get_model() is not None
                return (200 if ok else 503), {"ready": ok}
            return 200, {"name": "edgepack-agent", "version": __version__, "extensions": ["binary_tensor_data"]}
        m = _MODEL.match(path)
        if not m:
            raise HttpError(404, f"no such endpoint {path}")
        self._authorize(headers)
        action = m.group("action")
        if (action == "/infer") != (method == "POST") or method not in ("GET", "POST"):
            raise HttpError(405, f"{method} is not allowed on {path}")
        model = self._model(m.group("name"), m.group("version"))
        if action == "/ready":
            return 200, {"name": model.name, "ready": True}
        if action is None:
            man = model.manifest
            return 200, {
                "name": model.name, "versions": [model.version],
                "platform": f"{man.format}_{model.runtime.details.get('runtime')}",
                "inputs": [tensor_meta(t) for t in man.inputs], "outputs": [tensor_meta(t) for t in man.outputs],
                "parameters": {"precision": man.precision, "target": man.target.get("name"),
                               "bundle_sha256": model.bundle_sha256}}
        return self._infer(model, headers, read_body())

    def _authorize(self, headers) -> None:
        if self.token:
            given = headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    def _model(self, name: str, version: str | None) -> Model:
        model = self.get_model()  # pinned for this request: a swap cannot change it midway
        if model is None:
            raise HttpError(503, "no model is loaded yet")
        if name != model.name:
            raise HttpError(404, f"unknown model {name!r}; this agent serves {model.name!r}")
        if version is not None and version != model.version:
            raise HttpError(404, f"model {name!r} has no version {version!r} (serving {model.version})")
        return model

    def _infer(self, model: Model, headers, body: bytes):
        try:
            req, arrays, wanted = decode_request(body, headers.get(HEADER_LEN))
            t0 = time.perf_counter()
            try:
                results = model.infer(arrays)
            except ModelClosed:  # swapped out between routing and running: use the new one
                model = self._model(model.name, None)
                results = model.infer(arrays)
            ms = (time.perf_counter() - t0) * 1000
            payload, extra = encode_response(model=model.name, version=model.version, req=req, results=results,
                                             requested=wanted)
        except EdgepackError as e:  # InferenceError and friends: the client's fault
            self.stats.record(None, ok=False)
            raise HttpError(400, str(e).split("\n")[0]) from None
        except Exception as e:  # a runtime failure on valid input: report it, keep serving
            self.stats.record(None, ok=False)
            log.exception("inference failed")
            raise HttpError(500, f"inference failed: {type(e).__name__}: {e}") from None
        self.stats.record(ms)
        return 200, payload, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    server_version = f"edgepack-agent/{__version__}"
    server_api: ApiServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK
        # add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args) -> None:  # route http.server's access log to our logger
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise HttpError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
            return b""
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {length!r}") from None
        if n > self.server_api.max_body:
            self._discard(n)
            raise HttpError(413, f"request body over the limit of {self.server_api.max_body} bytes")
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        """Read and drop a refused body (so the client gets to read our answer) unless it is
        absurdly large; either way the connection is not reused."""
        self.close_connection = True
        if n <= 4 * self.server_api.max_body:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 20))
                if not chunk:
                    break
                n -= len(chunk)

    def _handle(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        body_read = False

        def read_body() -> bytes:
            nonlocal body_read
            body_read = True
            return self._read_body()

        try:
            res = self.server_api.route(method, path, self.headers, read_body)
        except HttpError as e:
            res = (e.status, {"error": str(e)})
        except Exception as e:  # never let a request kill the server thread without an answer
            log.exception("request failed")
            res = (500, {"error": f"internal error: {type(e).__name__}"})
        if not body_read and self.headers.get("Content-Length") not in (None, "0"):
            self.close_connection = True  # unread body: do not reuse the connection
        status, payload = res[0], res[1]
        headers = res[2] if len(res) > 2 else {"Content-Type": "application/json"}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
