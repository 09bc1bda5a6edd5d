"""What a shadow phase costs live requests (issue 18; target: p99 within 1.15x of no shadow).

One agent serves `--model` (digits CNN, or MobileNetV2, both arm-cpu int8) to `--clients` clients.
Live latency is measured with no shadow (before the push), then during the shadow phase of an
update to 1.1.0 pushed with `--shadow SECONDS --shadow-rate RATE` (from the `shadow` event to the
`switching` one); the shadow worker's own figures (compared, dropped, CPU share) come from the
update's events.

    python benchmarks/shadow_overhead.py [--model digits|mobilenetv2] [--clients 4] [--steady 10]
                                         [--shadow 15] [--rate 0.1]
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


def _pct(s: np.ndarray) -> tuple[float, float, int]:
    ok = s[s[:, 2] == 200][:, 1] if len(s) else np.array([])
    if not len(ok):
        return float("nan"), float("nan"), len(s)
    return float(np.percentile(ok, 50)), float(np.percentile(ok, 99)), len(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("digits", "mobilenetv2"), default="digits")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady", type=float, default=10.0)
    ap.add_argument("--shadow", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=0.1)
    args = ap.parse_args()
    from _bundles import digits_bundle, mobilenet_bundle
    from _procs import Load, agent, binary_body, mosquitto, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation, Shadow
    import fleet

    if args.model == "digits":
        v1, v2, body, headers = digits_bundle(), digits_bundle(version="1.1.0"), None, None
    else:
        v1, v2 = mobilenet_bundle(), mobilenet_bundle(version="1.1.0")
        body, headers = binary_body("image", np.full((1, 224, 224, 3), 0.5, np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker, port = mosquitto(tmp)
        p, base = agent(tmp, v1, port)
        load = Load(base, model=args.model, body=body, headers=headers)
        events = []
        try:
            load.start(args.clients)
            time.sleep(args.steady)
            t_push = time.time()
            res = fleet.push(v2, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), fleet.PushOptions(
                device="bench", terms=fleet.Terms(
                    probation=Probation(seconds=2, requests=10 ** 6),
                    shadow=Shadow(seconds=args.shadow, rate=args.rate, min_agreement=0.9, min_samples=1)),
                follow=fleet.Follow(timeout=300, progress=lambda d, e: events.append(e))))
        finally:
            load.stop()
            stop(p, broker)
    ev = res.devices["bench"]
    assert ev["state"] == "committed", ev
    when = {e["state"]: datetime.fromisoformat(e["ts"]).timestamp() for e in reversed(events) if e.get("ts")}
    s = np.array(load.samples)
    steady = s[(s[:, 0] >= t_push - args.steady + 1) & (s[:, 0] < t_push)]
    shadow = s[(s[:, 0] >= when["shadow"]) & (s[:, 0] < when["switching"])]
    (p50a, p99a, na), (p50b, p99b, nb) = _pct(steady), _pct(shadow)
    fig = next((e["shadow"] for e in reversed(events) if e.get("shadow")), None) or ev.get("shadow") or {}
    print(f"{args.model}: {args.clients} clients; shadow {args.shadow:.0f} s at rate {args.rate}; "
          f"failed requests {int(np.sum(s[:, 2] != 200))}")
    print(f"  no shadow   p50 {p50a:7.2f} ms  p99 {p99a:7.2f} ms  ({na} requests)")
    print(f"  shadow      p50 {p50b:7.2f} ms  p99 {p99b:7.2f} ms  ({nb} requests)")
    print(f"  p99 shadow / no shadow: {p99b / p99a:.2f}x (target <= 1.15x); p50 {p50b / p50a:.2f}x")
    print(f"  shadow worker: sampled {fig.get('sampled')}, compared {fig.get('compared')}, dropped "
          f"{fig.get('dropped')}, agreement {fig.get('agreement')}, CPU {100 * (fig.get('cpu_share') or 0):.1f} % "
          f"of one core, candidate p50 {fig.get('candidate_p50_ms')} ms")


if __name__ == "__main__":
    main()
