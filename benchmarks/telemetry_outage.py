"""Telemetry under a broker outage: an agent under inference load emits telemetry every
--interval seconds; the broker (loopback mosquitto) goes down for --outage seconds and the agent is
SIGKILLed and restarted halfway through; then the broker comes back and the buffer drains.

Figures: messages produced (from the `seq` numbers: every message gets one when it is made),
delivered (distinct seq received), dropped (produced - delivered), and the drops the agent counted
(`buffer.dropped_total` + `buffer.write_errors`). Run twice: with the default buffer bound (nothing
may be dropped) and with a bound smaller than the outage (drops = the excess, all counted).

    python benchmarks/telemetry_outage.py [--outage 60] [--interval 0.2] [--small-bound 100]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def start_agent(workdir: Path, bundle: Path, broker_port: int, api_port: int, interval: float, bound: int | None):
    from _procs import api_ready, wait_for

    env = dict(os.environ)
    if bound:
        env["EDGEPACK_AGENT_BUFFER_MAX_MESSAGES"] = str(bound)
    p = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--device-id", "outage", "--data-dir",
                          str(workdir / "agent"), "--bundle", str(bundle), "--api-port", str(api_port),
                          "--broker", f"mqtt://127.0.0.1:{broker_port}", "--telemetry-interval", str(interval),
                          "--log-format", "text"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for(lambda: api_ready(f"http://127.0.0.1:{api_port}"), 30, "agent ready")
    return p


class Subscriber:
    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.got: list[dict] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.c.on_message = lambda cl, ud, m: self.got.append(json.loads(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("edgepack/v1/devices/outage/telemetry", qos=1)
        self.c.loop_start()

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


def load(base: str, stop: threading.Event, counter: list) -> None:
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()
    while not stop.is_set():
        try:
            urllib.request.urlopen(urllib.request.Request(base + "/v2/models/digits/infer", data=body), timeout=2)
            counter[0] += 1
        except OSError:
            time.sleep(0.05)


def run(bundle: Path, *, outage: float, interval: float, bound: int | None) -> dict:
    from _procs import free_port, wait_for

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        conf = tmp / "mosquitto.conf"
        port, api = free_port(), free_port()
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))

        def broker():
            from _procs import port_open

            b = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: port_open(port), 10, "mosquitto")
            return b

        b = broker()
        sub = Subscriber(port)
        agent = start_agent(tmp, bundle, port, api, interval, bound)
        stop, served = threading.Event(), [0]
        threads = [threading.Thread(target=load, args=(f"http://127.0.0.1:{api}", stop, served)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(5)
        sub.stop()
        b.send_signal(signal.SIGTERM)
        b.wait(10)
        time.sleep(outage / 2)
        agent.kill()  # power loss halfway through the outage
        agent.wait(10)
        agent = start_agent(tmp, bundle, port, api, interval, bound)
        time.sleep(outage / 2)
        b = broker()
        sub2 = Subscriber(port)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (sub2.got and sub2.got[-1]["buffer"]["queued"] <= 1):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        sub2.stop()
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        b.send_signal(signal.SIGTERM)
        b.wait(10)
    got = sub.got + sub2.got
    seqs = [m["seq"] for m in got]
    last = got[-1]["buffer"]
    produced = max(seqs) - min(seqs) + 1
    delivered = len(set(seqs))
    return {"bound": bound or 10000, "produced": produced, "delivered": delivered, "dropped": produced - delivered,
            "counted": last["dropped_total"] + last["write_errors"], "duplicates": len(seqs) - delivered,
            "in_order": seqs == sorted(seqs), "requests": served[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--small-bound", type=int, default=100)
    args = ap.parse_args()
    from _bundles import digits_bundle

    bundle = digits_bundle()
    rows = [run(bundle, outage=args.outage, interval=args.interval, bound=None),
            run(bundle, outage=args.outage, interval=args.interval, bound=args.small_bound)]
    print(f"broker down {args.outage:.0f} s, agent SIGKILLed and restarted at {args.outage / 2:.0f} s, "
          f"telemetry every {args.interval} s, 2 clients sending requests")
    print(f"{'buffer bound':>12}{'produced':>10}{'delivered':>11}{'dropped':>9}{'counted':>9}{'duplicates':>12}"
          f"{'in order':>10}{'requests served':>17}")
    for r in rows:
        print(f"{r['bound']:>12}{r['produced']:>10}{r['delivered']:>11}{r['dropped']:>9}{r['counted']:>9}"
              f"{r['duplicates']:>12}{str(r['in_order']):>10}{r['requests']:>17}")
    ok = all(r["dropped"] == r["counted"] for r in rows) and rows[0]["dropped"] == 0
    print("every drop counted, none below the bound" if ok else "UNCOUNTED LOSS")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
