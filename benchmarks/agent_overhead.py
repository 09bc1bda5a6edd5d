"""What the agent adds on top of the runtime, on the digits and MobileNetV2 int8 bundles.

- in-process API (`Model.infer`) vs a raw LiteRT interpreter loop (set_tensor/invoke/get_tensor):
  throughput ratio, target >= 0.97;
- HTTP KServe v2 (binary tensor extension, one keep-alive client) p50 minus raw invoke p50,
  target <= 1 ms;
- throughput with 4 concurrent HTTP clients.

    python benchmarks/agent_overhead.py [--seconds 3]
"""
from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _loop(fn, seconds: float) -> np.ndarray:
    for _ in range(20):
        fn()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(times) < 1_000_000:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times) * 1000


def _http_request(x: np.ndarray, inp: str, out: str) -> tuple[bytes, dict]:
    blob = x.tobytes()
    head = json.dumps({"inputs": [{"name": inp, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": out, "parameters": {"binary_data": True}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def _http_client(port: int, m, x: np.ndarray, seconds: float, out: list) -> None:
    model = m.name
    body, headers = _http_request(x, m.inputs[0].name, m.outputs[0].name)
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def once():
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data[:300]

    out.append(_loop(once, seconds))
    conn.close()


def bench(bundle: Path, seconds: float) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from device_agent import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        model = load_bundle(bundle, model_dir=tmp)
        m = model.manifest
        spec = m.inputs[0]
        x = np.random.default_rng(0).random(spec.shape, dtype=np.float32)
        it = Interpreter(model_path=str(Path(tmp) / m.model_file), num_threads=m.runtime.threads or None)
        it.allocate_tensors()
        i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

        def raw():
            it.set_tensor(i, x)
            it.invoke()
            return it.get_tensor(o)

        feeds = {spec.name: x}
        raws, apis = [], []
        for _ in range(4):  # interleave short rounds so drift (thermal, other load) hits both alike
            raws.append(_loop(raw, seconds / 4))
            apis.append(_loop(lambda: model.infer(feeds), seconds / 4))
        raw_ms, api_ms = np.concatenate(raws), np.concatenate(apis)
        model.close()
        # HTTP through a real agent process
        from _procs import free_port

        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--data-dir", f"{tmp}/agent",
                                 "--bundle", str(bundle), "--api-port", str(port), "--telemetry-interval", "600",
                                 "--log-format", "text"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(port)
            one: list = []
            _http_client(port, m, x, seconds, one)
            many: list = []
            threads = [threading.Thread(target=_http_client, args=(port, m, x, seconds, many)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 30)
        finally:
            proc.terminate()
            proc.wait(15)
    tput = lambda a: len(a) / (a.sum() / 1000)  # noqa: E731
    return {"bundle": bundle.name, "raw_p50_ms": float(np.median(raw_ms)), "raw_ips": tput(raw_ms),
            "api_p50_ms": float(np.median(api_ms)), "api_ips": tput(api_ms),
            "api_ratio": tput(api_ms) / tput(raw_ms),
            "api_overhead_us": (float(np.mean(api_ms)) - float(np.mean(raw_ms))) * 1000,
            "http_p50_ms": float(np.median(one[0])), "http_p99_ms": float(np.percentile(one[0], 99)),
            "http_minus_raw_ms": float(np.median(one[0]) - np.median(raw_ms)),
            "http4_ips": sum(len(a) for a in many) / seconds}


def _wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("agent not ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    from _bundles import digits_bundle, mobilenet_bundle

    for b in (digits_bundle(), mobilenet_bundle()):
        r = bench(b, args.seconds)
        print(f"\n{r['bundle']}")
        print(f"  raw LiteRT loop      p50 {r['raw_p50_ms']:.4f} ms  {r['raw_ips']:9.0f} inf/s")
        print(f"  in-process API       p50 {r['api_p50_ms']:.4f} ms  {r['api_ips']:9.0f} inf/s  "
              f"ratio {r['api_ratio']:.3f} (target >= 0.97), +{r['api_overhead_us']:.1f} us/call")
        print(f"  HTTP v2, 1 client    p50 {r['http_p50_ms']:.4f} ms  p99 {r['http_p99_ms']:.4f} ms  "
              f"p50 - raw = {r['http_minus_raw_ms']:.4f} ms (target <= 1 ms)")
        print(f"  HTTP v2, 4 clients   {r['http4_ips']:9.0f} inf/s")


if __name__ == "__main__":
    main()
