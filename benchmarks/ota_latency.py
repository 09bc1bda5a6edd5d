"""Push to active over MQTT chunks vs moving the same bytes raw through the same broker.

For the digits bundle and a MobileNetV2 fp32 bundle (~14 MB), with a loopback mosquitto:
- edgepack: `push` (chunks published retained, desired record) until the agent has the
  verified file (transfer), then staging (load, warm-up, golden check) until it serves it;
- raw: `mosquitto_sub -C 1` receiving one message that `mosquitto_pub -f BUNDLE` sends.
Target: transfer time <= 2x the raw transfer, plus the model's load time.

    python benchmarks/ota_latency.py [--chunk-size BYTES]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def raw_transfer(bundle: Path, port: int, out: Path) -> float:
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", "raw/bundle", "-C", "1", "-N"],
                           stdout=open(out, "wb"))
    time.sleep(0.5)  # let it subscribe
    t0 = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-p", str(port), "-t", "raw/bundle", "-q", "1", "-f", str(bundle)], check=True)
    sub.wait(120)
    dt = time.perf_counter() - t0
    assert out.stat().st_size == bundle.stat().st_size, "raw transfer lost bytes"
    return dt


def ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["ts"]).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--timeline", action="store_true", help="print each update event's time")
    args = ap.parse_args()
    from _bundles import digits_bundle, mobilenet_bundle
    from _procs import agent, mosquitto, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation
    import fleet

    import paho.mqtt.client  # noqa: F401  once per process (8 ms here), outside the timed pushes

    start = digits_bundle(version="0.1.0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker, port = mosquitto(tmp)
        a, base = agent(tmp, start, port)
        try:
            rows = []
            for bundle in (digits_bundle(), mobilenet_bundle(precision="fp32")):
                raw = min(raw_transfer(bundle, port, tmp / "raw.out") for _ in range(3))
                events: list[dict] = []
                t0 = time.time()
                res = fleet.push(bundle, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), fleet.PushOptions(
                    device="bench", transfer=fleet.TransferSpec(chunk_size=args.chunk_size),
                    terms=fleet.Terms(probation=Probation(seconds=1, requests=10)),
                    follow=fleet.Follow(timeout=300, progress=lambda d, e: events.append(e))))
                assert res.ok, res.devices
                first = {}
                for e in events:
                    first.setdefault(e["state"], ts(e))
                landed = max(ts(e) for e in events if (e.get("progress") or {}).get("percent") == 100.0)
                transfer = landed - t0  # push start (hashing, publishing) -> every byte on the device
                device_dl = landed - first["downloading"]  # the device's own download time
                verify = first["staging"] - first["verifying"]
                load = first["switching"] - first["staging"]
                active = first["probation"] - t0
                rows.append((bundle.name, bundle.stat().st_size, raw, transfer, device_dl, verify, load, active))
                if args.timeline:
                    for e in events:
                        prog = e.get("progress") or {}
                        print(f"  +{ts(e) - t0:7.3f} s  {e['state']:<12} {prog.get('percent', '')}")
        finally:
            stop(a, broker)
    print(f"{'bundle':<38}{'MB':>6}{'raw s':>8}{'transfer s':>11}{'ratio':>7}{'device dl s':>12}{'verify s':>9}"
          f"{'load s':>8}{'push->active s':>16}")
    for name, size, raw, transfer, device_dl, verify, load, active in rows:
        print(f"{name:<38}{size / 1e6:>6.2f}{raw:>8.3f}{transfer:>11.3f}{transfer / raw:>7.2f}{device_dl:>12.3f}"
              f"{verify:>9.3f}{load:>8.3f}{active:>16.3f}")
    print(f"raw = mosquitto_pub -f -> mosquitto_sub, best of 3; transfer = push start until every byte is on "
          f"the device ({args.chunk_size}-byte chunks); target ratio <= 2")
    print("paho is imported before timing (once per process, ~8 ms); the raw figure includes exec'ing the "
          "mosquitto_pub binary")
    print("device dl = the agent's download (first to last chunk); verify = hashes + signature + anti-rollback; load = staging (load, warm-up, golden check); "
          "push->active = push start until the new model serves")


if __name__ == "__main__":
    main()
