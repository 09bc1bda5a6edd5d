"""Two models in one agent against two one-model agents: memory, start-to-ready, and one model's
update under load on both (issue 17).

A = the digits CNN (arm-cpu int8), B = MobileNetV2 (arm-cpu int8, 224x224). Figures:
- RSS after each agent is ready and has served 20 requests per model, for A alone, B alone and
  A+B in one agent (target: RSS(A+B) <= RSS(A) + RSS(B) - 30 MB), and each one's start-to-ready;
- then `--clients` clients on each model of the A+B agent: A's and B's p50/p99 in steady state and
  while B is updated to 1.1.0 over MQTT (from the push until B commits), failed requests on both
  (target: 0, and A's p99 during B's update within 1.25x of its steady p99). B's clients send the
  binary tensor extension (as tritonclient does for images): 600 KB of JSON floats per request would
  be parsed under the GIL and measure the JSON decoder, not the update.

    python benchmarks/multi_model.py [--clients 4] [--steady 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1 << 20


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _warm(base: str, bodies: dict[str, tuple[bytes, dict]], n: int = 20) -> None:
    for model, (body, headers) in bodies.items():
        for _ in range(n):
            req = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=body, headers=headers)
            urllib.request.urlopen(req, timeout=30).read()


def _footprint(tmp: Path, bundles: list[Path], bodies: dict[str, tuple[bytes, dict]], tag: str) -> tuple[int, float]:
    from _procs import agent, stop

    t0 = time.perf_counter()
    p, base = agent(tmp / tag, bundles, None, device=tag)
    ready = time.perf_counter() - t0
    try:
        _warm(base, bodies)
        time.sleep(0.5)
        return _rss(p.pid), ready
    finally:
        stop(p)


def _pct(samples: np.ndarray) -> str:
    if not len(samples):
        return "no samples"
    ok = samples[samples[:, 2] == 200][:, 1]
    return f"p50 {np.percentile(ok, 50):7.2f} ms  p99 {np.percentile(ok, 99):7.2f} ms  ({len(samples)} requests)"


def _phases(events: list[dict], t_push: float, t_done: float) -> dict[str, tuple[float, float]]:
    """Each update state's span (wall clock) from the device's events."""
    from datetime import datetime

    marks, seen = [], set()
    for e in events:
        if e.get("state") not in seen and e.get("ts"):  # (push --wait may add a status-derived one, no ts)
            seen.add(e["state"])
            marks.append((e["state"], datetime.fromisoformat(e["ts"]).timestamp()))
    marks.sort(key=lambda x: x[1])
    spans = {}
    for (name, t0), nxt in zip(marks, marks[1:] + [("end", t_done)]):
        spans[name] = (max(t0, t_push), nxt[1])
    return {k: v for k, v in spans.items() if k not in ("committed", "end")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady", type=float, default=8.0)
    args = ap.parse_args()
    from _bundles import digits_bundle, mobilenet_bundle
    from _procs import Load, agent, binary_body, mosquitto, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation
    import fleet

    a, b1, b2 = digits_bundle(), mobilenet_bundle(), mobilenet_bundle(version="1.1.0")
    body_a = Load.BODY
    body_b, head_b = binary_body("image", np.full((1, 224, 224, 3), 0.5, np.float32))  # as tritonclient sends images
    bodies = {"digits": body_a, "mobilenetv2": body_b}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = {"digits": (body_a, {}), "mobilenetv2": (body_b, head_b)}
        rss_a, ready_a = _footprint(tmp, [a], {"digits": warm["digits"]}, "a")
        rss_b, ready_b = _footprint(tmp, [b1], {"mobilenetv2": warm["mobilenetv2"]}, "b")
        rss_ab, ready_ab = _footprint(tmp, [b1, a], warm, "ab")
        print("RSS after ready + 20 requests per model (start-to-ready):")
        print(f"  A digits alone      {rss_a / MB:7.1f} MB  ({ready_a:.2f} s)")
        print(f"  B mobilenetv2 alone {rss_b / MB:7.1f} MB  ({ready_b:.2f} s)")
        print(f"  A + B, one agent    {rss_ab / MB:7.1f} MB  ({ready_ab:.2f} s)")
        print(f"  two agents          {(rss_a + rss_b) / MB:7.1f} MB; saved {(rss_a + rss_b - rss_ab) / MB:.1f} MB "
              f"(target >= 30 MB)")

        broker, port = mosquitto(tmp)
        # B first: the device's first model, so its update reaches it from any pusher (model or device topic)
        p, base = agent(tmp / "load", [b1, a], port)
        loads = {m: Load(base, model=m, body=bodies[m], headers=head_b if m == "mobilenetv2" else None)
                 for m in bodies}
        try:
            for ld in loads.values():
                ld.start(args.clients)
            time.sleep(args.steady)
            t_push = time.time()
            events = []
            res = fleet.push(b2, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), fleet.PushOptions(
                device="bench", terms=fleet.Terms(probation=Probation(seconds=3, requests=10 ** 6)),
                follow=fleet.Follow(timeout=300, progress=lambda d, e: events.append(e))))
            t_done = time.time()
            time.sleep(1.0)
        finally:
            for ld in loads.values():
                ld.stop()
            stop(p, broker)
    assert res.ok, res.devices
    print(f"\n{args.clients} clients per model; B (mobilenetv2) updated 1.0.0 -> 1.1.0 over MQTT "
          f"in {t_done - t_push:.1f} s")
    for m, ld in loads.items():
        s = np.array(ld.samples)
        steady, update = s[s[:, 0] < t_push], s[(s[:, 0] >= t_push) & (s[:, 0] <= t_done)]
        failed = int(np.sum(s[:, 2] != 200))
        print(f"  {m:12s} failed {failed} (target 0)")
        print(f"    steady state   {_pct(steady)}")
        print(f"    B's update     {_pct(update)}")
        if m == "digits" and len(update) and len(steady):
            ratio = np.percentile(update[update[:, 2] == 200][:, 1], 99) / np.percentile(
                steady[steady[:, 2] == 200][:, 1], 99)
            print(f"    A's p99 during B's update / steady: {ratio:.2f}x (target <= 1.25x)")
            for name, (t0, t1) in _phases(events, t_push, t_done).items():
                part = s[(s[:, 0] >= t0) & (s[:, 0] < t1)]
                print(f"      {name:12s} {t1 - t0:5.1f} s  {_pct(part)}")


if __name__ == "__main__":
    main()
