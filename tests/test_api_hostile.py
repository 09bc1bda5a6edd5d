"""The v2 HTTP API against hostile clients: malformed requests, lying lengths, idle and slow
connections. A real agent process serves the digits bundle."""
from __future__ import annotations

import json
import math
import os
import resource
import socket
import time
import urllib.request

import pytest

from agents import AgentProc, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.agent]
PATH = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def agent(digits_bundle, tmp_path_factory):
    a = AgentProc(tmp_path_factory.mktemp("hostile") / "data", bundle=digits_bundle, interval=60,
                  extra=("--log-format", "text")).start()
    yield a
    assert a.stop() == 0


def _post(agent, body: bytes, headers: dict | None = None):
    r = urllib.request.Request(agent.base + PATH, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(r, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _inp(**over):
    t = {"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.5] * 64}
    t.update(over)
    return t


def _j(doc) -> bytes:
    return json.dumps(doc).encode()


def _binary(shape, size_param, payload: bytes):
    head = _j({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                           "parameters": {"binary_data_size": size_param}}]})
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


MALFORMED = {
    # the seven that answered 500 with a traceback (finding 5)
    "huge shape": (_j({"inputs": [_inp(shape=[2 ** 32, 2 ** 32], data=[])]}), None),
    "binary size not a number": _binary([1, 8, 8, 1], "abc", b"\0" * 256),
    "binary size not a multiple of the element size": _binary([1, 8, 8, 1], 255, b"\0" * 255),
    "JSON nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, None),
    "list as input name": (_j({"inputs": [_inp(name=["image"])]}), None),
    "number as parameters": (_j({"inputs": [_inp(parameters=5)]}), None),
    "list as output parameters": (_j({"inputs": [_inp()], "outputs": [{"name": "output_0", "parameters": [1]}]}),
                                  None),
    # and more of the same family
    "shape as a string": (_j({"inputs": [_inp(shape="14", data=[0.5] * 4)]}), None),
    "boolean in shape": (_j({"inputs": [_inp(shape=[True, 8, 8, 1])]}), None),
    "negative binary size": _binary([1, 8, 8, 1], -4, b"\0" * 256),
    "float binary size": _binary([1, 8, 8, 1], 256.0, b"\0" * 256),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "999"}),
    "request parameters a list": (_j({"inputs": [_inp()], "parameters": [1]}), None),
    "outputs not a list": (_j({"inputs": [_inp()], "outputs": "output_0"}), None),
    "data ragged": (_j({"inputs": [_inp(data=[[0.5], [0.5, 0.5]])]}), None),
    "data of objects": (_j({"inputs": [_inp(data=[{"a": 1}] * 64)]}), None),
    "unknown output": (_j({"inputs": [_inp()], "outputs": [{"name": "nope"}]}), None),
    "binary_data_output a string": (_j({"inputs": [_inp()], "parameters": {"binary_data_output": "yes"}}), None),
    "not UTF-8": (b"\xff\xfe{", None),
    "duplicate input": (_j({"inputs": [_inp(), _inp()]}), None),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_4xx_with_a_message(agent, case):
    body, headers = MALFORMED[case]
    code, raw = _post(agent, body, headers)
    assert 400 <= code < 500, (code, raw[:300])
    msg = json.loads(raw)["error"]
    assert msg and "internal error" not in msg and "Traceback" not in msg, msg
    assert "Traceback" not in agent.log.read_text()[-20000:]


def test_outputs_are_strict_json(agent, tmp_path):
    """Bare NaN is not JSON: a non-finite output is null (numpy and tritonclient read it as NaN)."""
    from device_agent.kserve import encode_response
    import numpy as np

    body, _ = encode_response(model="m", version="1", req={}, requested=[],
                              results={"y": np.array([[1.0, np.nan, np.inf, -np.inf]], np.float32)})

    def no_constants(name):
        raise ValueError(f"bare {name} in the response")

    doc = json.loads(body, parse_constant=no_constants)
    assert doc["outputs"][0]["data"] == [1.0, None, None, None]
    assert np.isnan(np.asarray(doc["outputs"][0]["data"], np.float32)[1:]).all()
    # through the server, a NaN input (Python clients send bare NaN) or one beyond float32 is refused
    # with its reason (issue 24, finding 7), the error in strict JSON too
    code, raw = _post(agent, _j({"inputs": [_inp(data=[math.nan] * 64)]}))
    assert code == 400 and "holds 64 NaN or infinite value(s)" in json.loads(raw, parse_constant=no_constants)["error"]
    code, raw = _post(agent, _j({"inputs": [_inp(data=[1e39] + [0.0] * 63, datatype="FP64")]}))
    assert code == 400 and "holds 1e+39, beyond what float32 holds" in json.loads(raw)["error"], raw
    code, raw = _post(agent, _j({"inputs": [_inp(data=[1e39] + [0.0] * 63)]}))  # as FP32: not cast to inf
    assert code == 400 and "holds 1e+39, beyond what FP32 holds" in json.loads(raw)["error"], raw
    assert "RuntimeWarning" not in agent.log.read_text()[-20000:]


def _raw(port: int, data: bytes, *, timeout: float = 10.0, shut: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"}" in out:
                    break
        except socket.timeout:
            pass
        return out


def test_negative_content_length_is_refused(agent):
    """Finding 6: Content-Length -1 made the server read to EOF, past the 16 MiB limit (a 17 MiB
    body was accepted). Now it answers 400 at once, without reading a body."""
    head = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: -1\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
        s.sendall(head + b"x" * (1 << 16))  # the start of a long body: the answer must not wait for the rest
        out = b""
        try:
            while b"}" not in out and (chunk := s.recv(65536)):
                out += chunk
        except socket.timeout:
            pass
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"bad Content-Length" in out, out[:300]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # a small device's budget, scaled down


def test_idle_connections_cannot_starve_the_api(digits_bundle, tmp_path):
    """Finding 7: idle sockets past the fd limit left new clients unanswered and the accept loop
    spinning. Now: a connection cap (excess gets a prompt 503), an idle timeout, no busy loop."""
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, interval=60,
                  extra=("--api-max-connections", "16", "--api-idle-timeout", "2"))
    a.preexec = _limit_fds
    a.start()
    socks = []
    try:
        for _ in range(300):  # more than the agent's fd limit
            try:
                socks.append(socket.create_connection(("127.0.0.1", a.port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        cpu0 = _cpu_s(a.proc.pid)
        t0 = time.monotonic()
        # a new client gets a prompt answer: served, or 503 while full (within the 2 s the assert allows: on
        # a loaded CI host the answer took over _get's usual 1 s, run 52)
        code = a._get("/v2/health/live", timeout=2)
        assert code in (200, 503) and time.monotonic() - t0 < 2, code
        assert _threads(a.proc.pid) < 16 + 20
        time.sleep(1.0)
        assert _cpu_s(a.proc.pid) - cpu0 < 0.5  # not spinning
        # the idle connections are closed by the server after the idle timeout; then service is normal
        wait_until(lambda: a._get("/v2/health/ready") == 200, 10, what="service after the idle timeout")
        closed = 0
        for s in socks[:16]:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == min(16, len(socks))
        assert a.proc.poll() is None
    finally:
        for s in socks:
            s.close()
        a.stop()


def test_slow_request_is_cut_off(digits_bundle, tmp_path):
    """Slowloris: a client trickling its headers keeps a thread only until the request deadline."""
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, interval=60,
                  extra=("--api-idle-timeout", "1", "--api-request-timeout", "2")).start()
    try:
        s = socket.create_connection(("127.0.0.1", a.port), timeout=0.2)
        t0 = time.monotonic()
        closed_after = None
        data = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\n" + "X-Pad: " + "a" * 200).encode()
        for ch in data:  # one byte every 0.2 s: never a complete request
            if time.monotonic() - t0 > 8:
                break
            try:
                s.sendall(bytes([ch]))
                s.recv(1024)  # EOF or an answer (408): the server gave up on us
                closed_after = time.monotonic() - t0
                break
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - t0
                break
        s.close()
        assert closed_after is not None and closed_after < 6, closed_after
        assert a._get("/v2/health/live") == 200
    finally:
        a.stop()
