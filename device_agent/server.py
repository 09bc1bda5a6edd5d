"""Local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1.

Built on the standard library's ThreadingHTTPServer (a maintained HTTP stack with a thread per
connection and keep-alive): it costs ~12 MB less RSS than an asyncio framework on a 1-4 GB
board, and inference is serialised on the model anyway. Bound to 127.0.0.1 by default. Every
error answers in the protocol's format ({"error": "..."}) with a 4xx/5xx status; nothing a
client sends can crash the agent."""
from __future__ import annotations

import errno
import hmac
import json
import logging
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from device_agent import __version__
from device_agent.kserve import (HEADER_LEN, TEXT_META, decode_request, encode_response, model_config,
                                  model_stats, tensor_meta)
from device_agent.linger import Lingering
from device_agent.model import Model, ModelClosed
from device_agent.openai_api import LlmApi, Streamed
from device_agent.stats import InferenceStats, ModelCounters, Phases, has_nonfinite
from edgebundle.errors import EdgepackError

log = logging.getLogger("edgepack.agent.api")

_AGENT_VIEWS = ("/metrics", "/status", "/stats")
_REPO = re.compile(r"^/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)/?$")
_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                    r"(?P<action>/ready|/infer|/config|/stats|/generate|/generate_stream)?/?$")
_POSTS = ("/infer", "/generate", "/generate_stream")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ConnectionLimits:
    """At most `max_connections` connections are served at once (one thread each); more get a
    prompt 503 and are closed. A connection idle for `idle_timeout_s` (between requests, or
    between bytes of one) is closed, and a request must arrive whole within `request_timeout_s`
    (a client trickling its headers cannot hold a thread)."""

    max_connections: int = 64
    idle_timeout_s: float = 15.0
    request_timeout_s: float = 60.0


@dataclass(frozen=True)
class Views:
    """What the agent shows besides the model API; a bare server (tests, benchmarks) has none."""

    metrics: Callable[[], str] | None = None  # Prometheus text exposition (GET /metrics)
    status: Callable[[], dict] | None = None  # the status document, as retained on MQTT (GET /status)
    state: Callable[[], str] | None = None  # "loading model", "building engine", "serving", ... (readiness)


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

_BUSY = json.dumps({"error": "too many connections; retry shortly"}).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bounded number of handler threads and request deadlines."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of clients is queued, not dropped (SYN retries take 1 s)

    def __init__(self, address, handler, limits: ConnectionLimits):
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._lingering = Lingering()
        self._deadlines: dict[socket.socket, float | None] = {}
        self._deadlines_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection (%s); backing off", e)
                time.sleep(0.1)  # out of descriptors: wait instead of spinning on a readable listener
            raise

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the handler thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._deadlines_lock:
                self._deadlines.pop(request, None)
            self._slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        """Full: answer 503 without a handler thread, half-close, and linger (device_agent.linger);
        past its bound, read what the client already sent and close at once."""
        try:
            sock.setblocking(False)
            sock.send(_BUSY_RESPONSE)
            sock.shutdown(socket.SHUT_WR)
            if self._lingering.add(sock):
                return
            sock.recv(1 << 16)
        except OSError:
            pass
        self.close_request(sock)

    def deadline(self, sock: socket.socket, seconds: float | None) -> None:
        with self._deadlines_lock:
            self._deadlines[sock] = None if seconds is None else time.monotonic() + seconds

    def service_actions(self) -> None:
        """Called by serve_forever at least every poll interval: cut requests past their deadline."""
        now = time.monotonic()
        with self._deadlines_lock:
            late = [s for s, t in self._deadlines.items() if t is not None and now > t]
            for s in late:
                self._deadlines[s] = None
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ValueError)):  # the client went away, timed out, or was cut off
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("connection from %s failed", client_address)


class OneModel:
    """The repository of a bare server (tests, benchmarks): one model, from a callable."""

    def __init__(self, get_model: Callable[[], Model | None]):
        self.get_model = get_model

    def model(self, name: str):
        m = self.get_model()
        return (name, m) if m is None or m.name == name else None

    def names(self) -> list[str]:
        m = self.get_model()
        return [m.name] if m else []

    def ready(self) -> bool:
        return self.get_model() is not None

    def index(self) -> list[dict]:
        m = self.get_model()
        return [{"name": m.name, "version": m.version, "state": "READY", "reason": ""}] if m else []

    def load(self, name: str) -> None:
        raise HttpError(400, "this server cannot load models")

    unload = load


class ApiServer:
    """`repository` (device_agent.repository.AgentRepository; a callable: one model) gives the model
    serving under a name right now (it may change between requests: a request keeps the model it
    started with, so a swap never breaks one in flight)."""

    def __init__(self, repository, *, stats: InferenceStats, host: str = "127.0.0.1",
                 port: int = 8080, token: str | None = None, max_body_bytes: int = 16 << 20,
                 limits: ConnectionLimits = ConnectionLimits(), views: Views = Views()):
        self.repo = OneModel(repository) if callable(repository) else repository
        self.stats, self.token, self.max_body = stats, token, max_body_bytes
        self.views = views
        self.llm = LlmApi(self.repo, stats)  # text generation: OpenAI's /v1 and the v2 generate extension
        api = self

        class Handler(_Handler):
            server_api = api
            timeout = limits.idle_timeout_s  # StreamRequestHandler: socket timeout per recv/send

        self.httpd = _Server((host, port), Handler, limits)
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

    def alive(self) -> bool:
        """For the agent's watchdog: False once the serving thread has ended (not before it starts)."""
        return self._thread is None or self._thread.is_alive()

    # ---- routes: (status, JSON-able body) or raw (status, bytes, headers) ----
    def route(self, method: str, path: str, headers, read_body: Callable[[], bytes],
              cancelled: Callable[[], bool] = lambda: False):
        """`cancelled`: whether the client has gone (a generation stops when it has)."""
        if path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/"):
            if method != "GET":
                raise HttpError(405, f"{method} is not allowed on {path}")
            if path == "/v2/health/live":
                return 200, {"live": True}
            if path == "/v2/health/ready":
                ok = self.repo.ready()
                body = {"ready": ok}
                if self.views.state:
                    body["state"] = self.views.state()
                return (200 if ok else 503), body
            return 200, {"name": "edgepack-agent", "version": __version__,
                         "extensions": ["binary_tensor_data", "generate"]}
        if path in _AGENT_VIEWS:
            return self._agent_view(method, path, headers)
        if path.startswith("/v2/repository/"):
            return self._repository(method, path, headers, read_body)
        if path == "/v1" or path.startswith("/v1/"):
            self._authorize(headers)
            return self.llm.route(method, path, read_body, cancelled)
        if path.rstrip("/") == "/v2/models/stats" and self.repo.model("stats") is None:  # every model's (Triton)
            if method != "GET":
                raise HttpError(405, f"{method} is not allowed on {path}")
            self._authorize(headers)
            return 200, model_stats(self.stats.per_model())
        m = _MODEL.match(path)
        if not m:
            raise HttpError(404, f"no such endpoint {path}")
        self._authorize(headers)
        action = m.group("action")
        if (action in _POSTS) != (method == "POST") or method not in ("GET", "POST"):
            raise HttpError(405, f"{method} is not allowed on {path}")
        slot, model = self._model(m.group("name"), m.group("version"))
        if action == "/ready":
            return 200, {"name": model.name, "ready": True}
        if action == "/config":
            return 200, model_config(model)
        if action == "/stats":
            rows = [r for r in self.stats.per_model() if r[0] == (model.name, model.version)]
            return 200, model_stats(rows or [((model.name, model.version), ModelCounters())])
        if action is None:
            man = model.manifest
            return 200, {
                "name": model.name, "versions": [model.version],
                "platform": f"{man.format}_{model.runtime.details.get('runtime')}",
                "inputs": [tensor_meta(t, model.api_dtypes.get(t.name)) for t in man.inputs]
                + ([TEXT_META] if man.text else []),
                "outputs": [tensor_meta(t, model.api_dtypes.get(t.name)) for t in man.outputs],
                "parameters": {"precision": man.precision, "target": man.target.get("name"),
                               "bundle_sha256": model.bundle_sha256}}
        if action in ("/generate", "/generate_stream"):
            return self.llm.generate(slot, model, read_body(), stream=action == "/generate_stream", cancelled=cancelled)
        return self._infer(slot, model, headers, read_body())

    def _repository(self, method: str, path: str, headers, read_body: Callable[[], bytes]):
        """Triton's model repository extension: POST /v2/repository/index lists the models;
        /v2/repository/models/NAME/load and /unload need the API token (they stop a model serving)."""
        if method != "POST":
            raise HttpError(405, f"{method} is not allowed on {path}")
        self._authorize(headers)
        body = read_body()
        if path == "/v2/repository/index":
            try:
                want_ready = bool(json.loads(body or b"{}").get("ready", False))
            except (ValueError, AttributeError):
                raise HttpError(400, "the index request body must be a JSON object") from None
            return 200, [e for e in self.repo.index() if not want_ready or e["state"] == "READY"]
        m = _REPO.match(path)
        if not m:
            raise HttpError(404, f"no such endpoint {path}")
        if not self.token:
            raise HttpError(403, "loading and unloading models needs an API token (--api-token)")
        try:
            (self.repo.load if m.group("action") == "load" else self.repo.unload)(m.group("name"))
        except LookupError:
            raise HttpError(404, f"unknown model {m.group('name')!r}; this agent serves {self.repo.names()}") from None
        except EdgepackError as e:
            raise HttpError(409, str(e).split("\n")[0]) from None
        return 200, {}

    def _agent_view(self, method: str, path: str, headers):
        """/metrics (Prometheus), /status (the retained status document), /stats (the current
        telemetry window, not reset). Behind the bearer token when one is set, like the models."""
        if method != "GET":
            raise HttpError(405, f"{method} is not allowed on {path}")
        self._authorize(headers)
        if path == "/metrics":
            if self.views.metrics is None:
                raise HttpError(404, "this server exports no metrics")
            return 200, self.views.metrics().encode(), {"Content-Type": PROMETHEUS_TEXT}
        if path == "/status":
            if self.views.status is None:
                raise HttpError(404, "this server has no status document")
            return 200, self.views.status()
        return 200, {"window": self.stats.window(reset=False), "totals": self.stats.totals()}

    def _authorize(self, headers) -> None:
        if self.token:
            given = headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    def _model(self, name: str, version: str | None) -> tuple[str, Model]:
        found = self.repo.model(name)  # the model is pinned for this request: a swap cannot change it midway
        if found is None:
            names = self.repo.names()
            if not names:
                raise HttpError(503, "no model is loaded yet")
            raise HttpError(404, f"unknown model {name!r}; this agent serves {', '.join(map(repr, names))}")
        slot, model = found
        if model is None:
            raise HttpError(503, f"model {name!r} is not loaded (yet)")
        if version is not None and version != model.version:
            raise HttpError(404, f"model {name!r} has no version {version!r} (serving {model.version})")
        return slot, model

    def _infer(self, slot: str, model: Model, headers, body: bytes):
        t_start = time.perf_counter()
        stamps: list[float] = []  # input checked, lock taken, run done (Model.infer)
        try:
            req, arrays, wanted = decode_request(body, headers.get(HEADER_LEN))
            t0 = time.perf_counter()
            try:
                results = model.infer(arrays, stamps=stamps)
            except ModelClosed:  # swapped out between routing and running: use the new one
                _, model = self._model(slot, None)
                stamps.clear()
                results = model.infer(arrays, stamps=stamps)
            ms = (time.perf_counter() - t0) * 1000
            nonfinite = has_nonfinite(results.values())
            payload, extra = encode_response(model=model.name, version=model.version, req=req, results=results,
                                             requested=wanted)
        except EdgepackError as e:  # InferenceError and friends: the request's fault, refused before the model ran
            self.stats.record(None, ok=False, rejected=True, model=(model.name, model.version), slot=slot)
            raise HttpError(400, str(e).split("\n")[0]) from None
        except Exception as e:  # a runtime failure on valid input: report it, keep serving
            self.stats.record(None, ok=False, model=(model.name, model.version), slot=slot)
            log.exception("inference failed")
            raise HttpError(500, f"inference failed: {type(e).__name__}: {e}") from None
        t_end = time.perf_counter()
        phases = None
        if len(stamps) == 3:
            checked, locked, ran = stamps
            phases = Phases(input_s=checked - t_start, queue_s=locked - checked, infer_s=ran - locked,
                            output_s=t_end - ran)
        self.stats.record(ms, nonfinite=nonfinite, model=(model.name, model.version), phases=phases,
                          batch=_batch(model, arrays), slot=slot)
        return 200, payload, extra


def _batch(model: Model, arrays: dict) -> int:
    """Inferences in one request (Triton's nv_inference_count): the leading dimension of the first
    input when the model declares it dynamic, else 1."""
    first = model.manifest.inputs[0]
    sig = first.shape_signature or first.shape
    x = arrays.get(first.name)
    if sig and sig[0] in (-1, None) and x is not None and getattr(x, "ndim", 0):
        return int(x.shape[0])
    return 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    server_version = f"edgepack-agent/{__version__}"
    server_api: ApiServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK
        # add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        # the wait for the next request plus the request itself must fit the request deadline
        self.server.deadline(self.connection, self.server.limits.request_timeout_s)
        super().handle_one_request()

    def log_error(self, fmt, *args) -> None:  # timeouts and bad request lines: not worth a warning
        log.debug("%s " + fmt, self.address_string(), *args)

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
        if not (length.isascii() and length.strip().isdigit()):  # "-1" would read to EOF, past the limit
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length {length[:40]!r}: a non-negative number of bytes")
        n = int(length)
        if n > self.server_api.max_body:
            self._discard(n)
            raise HttpError(413, f"request body over the limit of {self.server_api.max_body} bytes")
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise HttpError(400, f"the body ended after {len(body)} of {n} bytes")
        return body

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
            body = self._read_body()
            self.server.deadline(self.connection, None)  # the request is in: inference time is not counted
            return body

        link = ClientLink(self.connection)
        try:
            res = self.server_api.route(method, path, self.headers, read_body, link.gone)
        except HttpError as e:
            res = (e.status, {"error": str(e)})
        except Exception as e:  # never let a request kill the server thread without an answer
            log.exception("request failed")
            res = (500, {"error": f"internal error: {type(e).__name__}"})
        self.server.deadline(self.connection, None)
        if not body_read and self.headers.get("Content-Length") not in (None, "0"):
            self.close_connection = True  # unread body: do not reuse the connection
        if isinstance(res, Streamed):
            self._stream(res, link)
            return
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

    def _stream(self, res: Streamed, link: "ClientLink") -> None:
        """Write a response as it is made: chunked (HTTP/1.1, the connection stays open) or up to the
        connection's close (HTTP/1.0). A failed write means the client has gone: the response is
        closed there, which stops its generation."""
        chunked = self.request_version != "HTTP/1.0"
        try:
            self.send_response(res.status)
            for k, v in res.headers.items():
                self.send_header(k, v)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            for chunk in res.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError as e:  # the client went away (reset, broken pipe) or stopped reading (timeout)
            link.broken = True
            self.close_connection = True
            log.debug("stream to %s ended: %s", self.address_string(), e)
        finally:
            res.close()


class ClientLink:
    """Whether the client of a request has gone: a write to it failed, or it closed its side (the
    socket reads as ended). Checked between generated tokens, at most every `every_s`."""

    def __init__(self, sock: socket.socket, every_s: float = 0.05):
        self.sock, self.every_s = sock, every_s
        self.broken = False
        self._next = 0.0

    def gone(self) -> bool:
        if self.broken:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and not self.sock.recv(1, socket.MSG_PEEK):  # EOF; pipelined bytes are not an end
                self.broken = True
        except (OSError, ValueError):  # reset, or already closed
            self.broken = True
        return self.broken
