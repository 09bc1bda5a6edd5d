"""Memory and start-up of the agent with the MobileNetV2 int8 bundle.

- RSS of a running agent (after warm-up and 50 requests), target <= 80 MB, and how much of it is
  the runtime itself (a bare Python process holding the same model in LiteRT);
- start to ready (process start until /v2/health/ready answers 200), target <= 1.5 s;
- `import device_agent`, target <= 0.3 s (and the modules `run` imports, for reference).

    python benchmarks/agent_footprint.py
    python benchmarks/agent_footprint.py --text BUNDLE   # a text bundle with length buckets

--text: the agent's RSS once a text of each bucket's length ran (target: 1.5x the model's bytes + 150 MB,
issue 27), beside LiteRT alone holding the model both ways: the Interpreter (XNNPACK packs the weights
per signature) and CompiledModel with XNNPACK's weight cache (packed once; what the agent uses).
"""
from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_to_ready(cmd: list[str], port: int) -> tuple[subprocess.Popen, float]:
    """Start the agent; seconds until /v2/health/ready answers 200."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < 60:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return proc, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.01)  # after a 503 too: the API answers while the model loads; a busy poll would slow it
    proc.kill()
    raise TimeoutError("agent not ready within 60 s")


def py_time(code: str, runs: int = 5) -> float:
    vals = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", f"import time; t=time.perf_counter(); {code}; "
                              "print(time.perf_counter()-t)"], capture_output=True, text=True, check=True)
        vals.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(vals)


def runtime_only_rss(model_file: Path) -> tuple[float, float]:
    code = ("import numpy as np, time, sys; from ai_edge_litert.interpreter import Interpreter;"
            "base=open('/proc/self/status').read();"
            f"it=Interpreter(model_path={str(model_file)!r}); it.allocate_tensors(); it.invoke();"
            "rss=[l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1];"
            "b=[l for l in base.splitlines() if l.startswith('VmRSS')][0].split()[1];"
            "print(int(b)/1024, int(rss)/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.strip().splitlines()[-1].split())
    return before, after


_BOTH_WAYS = """
import sys, numpy as np
def rss(): return [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
path, way = sys.argv[1], sys.argv[2]
base = rss()
if way == 'interpreter':
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path)
    for key in it.get_signature_list():
        r = it.get_signature_runner(key)
        r(**{n: np.ones(d['shape'], d['dtype']) for n, d in r.get_input_details().items()})
else:
    sys.path.insert(0, sys.argv[3])
    from edgeruntime.litert import LiteRTRuntime
    from edgeruntime.litert_compiled import metadata_interpreter
    rt = LiteRTRuntime.load(path)
    for key in metadata_interpreter(path).get_signature_list():
        s = rt.signature(key)
        s.run(s.sample_inputs())
print(base, rss())
"""


def text_footprint(bundle: Path) -> None:
    """The agent serving a text bundle, every bucket run once; LiteRT alone both ways beside it."""
    import zipfile

    from _procs import free_port

    root = Path(__file__).resolve().parent.parent
    with zipfile.ZipFile(bundle) as z:
        manifest = json.loads(z.read("manifest.json"))
        model_bytes = z.getinfo(manifest["model_file"]).file_size
        buckets = manifest["text"]["settings"]["buckets"] or [manifest["text"]["settings"]["max_length"]]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cmd = [sys.executable, "-m", "device_agent.cli", "run", "--data-dir", f"{tmp}/d", "--api-port", str(port),
               "--telemetry-interval", "600", "--log-format", "text", "--bundle", str(bundle)]
        proc, ready = start_to_ready(cmd, port)
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for length in buckets:  # about that many tokens: each bucket's model runs
                text = " ".join(["word"] * max(1, length - 4))
                body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
                c.request("POST", f"/v2/models/{manifest['name']}/infer", body=body.encode())
                r = c.getresponse()
                assert r.status == 200, r.read()[:300]
                r.read()
            agent = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(15)
        model_file = next(Path(tmp, "d", "models").rglob(manifest["model_file"]))
        ways = {}
        for way in ("interpreter", "compiled"):
            out = subprocess.run([sys.executable, "-c", _BOTH_WAYS, str(model_file), way, str(root)],
                                 capture_output=True, text=True, check=True)
            before, after = map(float, out.stdout.strip().splitlines()[-1].split())
            ways[way] = after - before
    goal = 1.5 * model_bytes / 1e6 + 150
    print(f"bundle: {bundle.name} ({bundle.stat().st_size / 1e6:.1f} MB; model {model_bytes / 1e6:.1f} MB; "
          f"buckets {buckets}); ready in {ready:.1f} s")
    print(f"agent RSS after a text of each bucket's length: {agent:.1f} MB (target <= 1.5x model + 150 = {goal:.0f} MB)")
    print(f"  LiteRT alone, every signature run once: Interpreter +{ways['interpreter']:.1f} MB, "
          f"CompiledModel with XNNPACK's weight cache +{ways['compiled']:.1f} MB")


def main() -> None:
    if sys.argv[1:2] == ["--text"]:
        return text_footprint(Path(sys.argv[2]))
    from _bundles import mobilenet_bundle
    from _procs import free_port

    bundle = mobilenet_bundle()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        agent_cmd = [sys.executable, "-m", "device_agent.cli", "run", "--data-dir", f"{tmp}/d", "--api-port",
                     str(port), "--telemetry-interval", "600", "--log-format", "text"]
        proc, ready = start_to_ready(agent_cmd + ["--bundle", str(bundle)], port)
        first_start = ready
        # binary tensor extension, as tritonclient sends by default
        blob = bytes(224 * 224 * 3 * 4)
        head = json.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(blob)}}]}).encode()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(50):
            c.request("POST", "/v2/models/mobilenetv2/infer", body=head + blob,
                      headers={"Inference-Header-Content-Length": str(len(head))})
            r = c.getresponse()
            assert r.status == 200, r.read()[:300]
            r.read()
        agent_rss = rss_mb(proc.pid)
        # plain JSON tensors (150k numbers per request) cost more transient memory
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "FP32",
                                       "data": [0.5] * (224 * 224 * 3)}]}).encode()
        for _ in range(10):
            c.request("POST", "/v2/models/mobilenetv2/infer", body=body)
            r = c.getresponse()
            assert r.status == 200, r.read()[:300]
            r.read()
        json_rss = rss_mb(proc.pid)
        proc.terminate()
        proc.wait(15)
        # second start: the model is already extracted and verified in the data dir
        proc, ready = start_to_ready(agent_cmd, port)
        proc.terminate()
        proc.wait(15)
        model_file = next(Path(tmp, "d", "models").rglob("*.tflite"))
        py_base, rt_rss = runtime_only_rss(model_file)
    imp = py_time("import device_agent")
    imp_run = py_time("import device_agent.service, device_agent.server, edgeproto.mqtt, edgeruntime.litert")
    print(f"bundle: {bundle.name} ({bundle.stat().st_size / 1e6:.1f} MB)")
    print(f"agent RSS after 50 binary-tensor requests: {agent_rss:.1f} MB (target <= 80 MB); "
          f"after 10 more plain-JSON requests: {json_rss:.1f} MB")
    print(f"  bare Python + numpy: {py_base:.1f} MB; + LiteRT with this model loaded: {rt_rss:.1f} MB "
          f"(runtime and model: {rt_rss - py_base:.1f} MB; agent on top: {agent_rss - rt_rss:.1f} MB)")
    print(f"start to ready: first start {first_start:.2f} s (copy + verify + extract), "
          f"restart {ready:.2f} s (target <= 1.5 s)")
    print(f"import device_agent: {imp * 1000:.0f} ms (target <= 300 ms); "
          f"modules `run` needs: {imp_run * 1000:.0f} ms")


if __name__ == "__main__":
    main()
