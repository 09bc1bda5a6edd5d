"""The v2 API with every connection slot taken: a new client reads the documented 503 (JSON body,
Connection: close) even while it is still sending a large body, and a flood of refused clients
holds one thread and a bounded number of sockets. A real ApiServer with one slot serves a tiny
ONNX bundle."""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest

from agents import wait_until
from tinybundles import infer_body, log_bundle

INFER = "/v2/models/logm/infer"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from device_agent.model import load_bundle

    d = tmp_path_factory.mktemp("overload")
    m = load_bundle(log_bundle(d / "src"), model_dir=d / "m", check_golden=False)
    yield m
    m.close()


@pytest.fixture
def full(model):
    """A server with max_connections=1, its slot held by a keep-alive client after one request."""
    from device_agent.server import ApiServer, ConnectionLimits
    from device_agent.stats import InferenceStats

    server = ApiServer(lambda: model, stats=InferenceStats(), port=0, limits=ConnectionLimits(max_connections=1))
    server.start()
    holder = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    holder.request("GET", "/v2/health/live")
    assert holder.getresponse().read() == b'{"live": true}'
    yield server, holder
    holder.close()
    server.stop()


def _request(port: int, method: str, path: str, body=None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def _assert_busy(status, resp, body) -> None:
    assert status == 503, (status, body[:200])
    assert resp.getheader("Connection") == "close" and resp.getheader("Retry-After") == "1"
    assert json.loads(body) == {"error": "too many connections; retry shortly"}


def _pieces(n: int, size: int):
    """A body sent piece by piece, slowly enough that the server answers in the middle of it."""
    for _ in range(n):
        yield b"x" * size
        time.sleep(0.002)


def test_a_client_sending_a_large_body_reads_the_503(full):
    """Closing at once reset the connection under the client's body: http.client's request()
    raised BrokenPipeError before the client could read the answer."""
    server, _ = full
    for _ in range(3):
        # raises BrokenPipeError / ConnectionResetError if the server closes under the body
        _assert_busy(*_request(server.port, "POST", INFER, body=_pieces(16, 1 << 16),
                               headers={"Content-Length": str(16 << 16), "Content-Type": "application/json"}))


def test_a_plain_get_reads_the_503(full):
    server, _ = full
    _assert_busy(*_request(server.port, "GET", "/v2/health/ready"))


def test_service_resumes_when_the_holder_leaves(full):
    server, holder = full
    _assert_busy(*_request(server.port, "POST", INFER, body=infer_body([1, 2, 3, 4])))
    holder.close()

    def served():
        status, _, body = _request(server.port, "POST", INFER, body=infer_body([1, 2, 3, 4]))
        return status == 200 and json.loads(body)["outputs"][0]["data"]

    assert wait_until(served, 5, what="a request served after the holder left")[0] == 0.0  # log(1)


def _lingering() -> int:
    return sum(t.name == "v2-api-linger" for t in threading.enumerate())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_flood_of_refused_clients_holds_one_thread_and_bounded_sockets(full, monkeypatch):
    """50 refused clients that send a request and stay connected: each reads its 503; one thread
    lingers on the first LINGER_MAX (the rest are closed at once), and ends when they leave."""
    from device_agent import linger

    monkeypatch.setattr(linger, "LINGER_S", 10.0)  # a slow test machine still sees them linger
    server, _ = full
    wait_until(lambda: _lingering() == 0, 5, what="no lingering refusals before the flood")
    threads, fds = threading.active_count(), _fds()
    clients = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(50)]
    try:
        for c in clients:
            c.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [c.recv(4096) for c in clients]  # the 503 is one small write: one recv reads it
        assert all(a.startswith(b"HTTP/1.1 503 ") and a.endswith(b"}") for a in answers), answers[:3]
        assert _lingering() == 1 and threading.active_count() <= threads + 1
        # the server's side: LINGER_MAX lingering sockets, plus the thread's selector and wake-up pair
        # (the accept thread closes the others just after their answer: wait for it)
        bound = len(clients) + linger.LINGER_MAX + 3
        wait_until(lambda: _fds() - fds <= bound, 5, what=f"at most {bound} more descriptors")
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: _lingering() == 0 and _fds() <= fds, 5, what="the lingering to end once the clients close")
    # and the bound was released: a refused large body is drained again
    _assert_busy(*_request(server.port, "POST", INFER, body=_pieces(16, 1 << 16),
                           headers={"Content-Length": str(16 << 16)}))


def test_lingering_is_bounded_in_time_and_bytes(full, monkeypatch):
    """A refused client that neither closes nor stops sending is cut off: after LINGER_S, or once
    it has sent LINGER_BYTES."""
    from device_agent import linger

    server, _ = full
    monkeypatch.setattr(linger, "LINGER_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
        idle.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 503 ")
        wait_until(lambda: _lingering() == 1, 3, what="the refusal to linger")
        wait_until(lambda: _lingering() == 0, 3, what="the linger to end after LINGER_S")  # idle is still open

    monkeypatch.setattr(linger, "LINGER_S", 10.0)
    monkeypatch.setattr(linger, "LINGER_BYTES", 1 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as flood:
        flood.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(256):  # 16 MiB: far past LINGER_BYTES
                flood.sendall(b"x" * (1 << 16))
    wait_until(lambda: _lingering() == 0, 3, what="the linger to end after LINGER_BYTES")
