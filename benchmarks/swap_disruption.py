"""Failed requests and tail latency while the agent swaps models (target: 0 failed).

4 HTTP clients send digits requests to an agent serving 1.0.0 for a steady-state period, then
1.1.0 is pushed; latencies are compared between steady state and the update window (from the
first update event until commit).

    python benchmarks/swap_disruption.py [--clients 4] [--steady 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady", type=float, default=5.0)
    args = ap.parse_args()
    from _bundles import digits_bundle
    from _procs import Load, agent, mosquitto, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation
    import fleet

    v1, v2 = digits_bundle(version="1.0.0"), digits_bundle(version="1.1.0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker, port = mosquitto(tmp)
        a, base = agent(tmp, v1, port)
        load = Load(base)
        try:
            load.start(args.clients)
            time.sleep(args.steady)
            t_push = time.time()
            events = []
            res = fleet.push(v2, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), fleet.PushOptions(
                device="bench", terms=fleet.Terms(probation=Probation(seconds=3, requests=10**6)),
                follow=fleet.Follow(timeout=120, progress=lambda d, e: events.append(e))))
            time.sleep(1.0)
        finally:
            load.stop()
            stop(a, broker)
    assert res.ok, res.devices
    when = {e["state"]: datetime.fromisoformat(e["ts"]).timestamp() for e in reversed(events)}
    s = np.array(load.samples)
    steady = s[s[:, 0] < t_push]
    window = s[(s[:, 0] >= when["switching"] - 0.5) & (s[:, 0] <= when["switching"] + 0.5)]
    update = s[(s[:, 0] >= t_push) & (s[:, 0] <= when["committed"])]
    failed = int(np.sum(s[:, 2] != 200))
    print(f"clients {args.clients}; requests {len(s)}; failed {failed} (target 0)")
    for name, part in (("steady state", steady), ("whole update", update), ("switch +-0.5 s", window)):
        ms = part[:, 1]
        print(f"  {name:<15} n={len(ms):>6}  p50 {np.percentile(ms, 50):6.3f} ms  p99 {np.percentile(ms, 99):6.3f} ms"
              f"  max {ms.max():7.3f} ms")
    print(f"  p99 during the switch / steady p99 = {np.percentile(window[:, 1], 99) / np.percentile(steady[:, 1], 99):.2f}")


if __name__ == "__main__":
    main()
