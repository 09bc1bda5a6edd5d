"""What a profile job costs production traffic (target: 0 failed requests, bounded tail latency).

HTTP clients send digits requests to an agent serving the arm-cpu bundle for a steady-state
period; then `edgepack profile` measures a second bundle (MobileNetV2 int8 by default: heavier than
the served model, so its inferences are what a production request could wait behind) on the same
agent. Latencies are compared between steady state and the profile window, and the device figures
the job returned are printed with how long it paused for production traffic.

    python benchmarks/profile_overhead.py [--clients 2] [--steady 5] [--probe digits|mobilenet]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--steady", type=float, default=5.0)
    ap.add_argument("--probe", choices=("digits", "mobilenet"), default="mobilenet")
    args = ap.parse_args()
    from _bundles import digits_bundle, mobilenet_bundle
    from _procs import Load, agent, mosquitto, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.jobs import BenchSettings
    from fleet.profile import Timeouts, profile

    serving = digits_bundle()
    probe = mobilenet_bundle() if args.probe == "mobilenet" else digits_bundle(target="x86-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker, port = mosquitto(tmp)
        a, base = agent(tmp, serving, port)
        load = Load(base)
        try:
            load.start(args.clients)
            time.sleep(args.steady)
            t0 = time.time()
            [r] = profile([probe], BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), device="bench",
                          bench=BenchSettings(runs=200, warmup=5, max_seconds=10), timeouts=Timeouts(job_s=300))
            t1 = time.time()
            time.sleep(1.0)
        finally:
            load.stop()
            stop(a, broker)
    s = np.array(load.samples)
    steady, during = s[s[:, 0] < t0], s[(s[:, 0] >= t0) & (s[:, 0] <= t1)]
    failed = int(np.sum(s[:, 2] != 200))
    f = r.figures
    print(f"clients {args.clients}; requests {len(s)}; failed {failed} (target 0); probe {probe.name}")
    for name, part in (("steady state", steady), ("profile job", during)):
        ms = part[:, 1]
        print(f"  {name:<13} n={len(ms):>6}  {len(ms) / max(part[-1, 0] - part[0, 0], 1e-9):7.0f} req/s  "
              f"p50 {np.percentile(ms, 50):6.3f} ms  p99 {np.percentile(ms, 99):7.3f} ms  max {ms.max():8.3f} ms")
    lat = f["latency_ms"]
    print(f"device figures: p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms  p99 {lat['p99']:.2f} ms  "
          f"{f['throughput_ips']:.1f} inf/s  load {f['load_ms']:.0f} ms  RSS +{(f['rss_delta_bytes'] or 0) / 2**20:.1f} MB  "
          f"{f['provider']}  golden {'ok' if f['golden_ok'] else 'FAILED'}")
    print(f"job {t1 - t0:.1f} s in all; {f['runs']} timed runs ({f['timed_s']:.1f} s), paused {f['paused_s']:.1f} s for "
          f"production traffic{'; cut short' if f['cut_short'] else ''}")


if __name__ == "__main__":
    main()
