"""1,000 simulated devices through a full staged rollout on one box, with loopback mosquitto.

Two runs, each on a fresh broker and a fresh simulated fleet (`edgepack fleet simulate`, one
process), driven by `edgepack rollout start` (another process, default waves 1,10%,50%,100%):
  good: a healthy 1 MB bundle goes through every wave;
  slow: every device runs 2x slower on the new bundle: the canary wave must stop it, the canary
        must be back on the old version and no other device may ever switch.
Prints per-wave times, broker messages/s (mosquitto $SYS counters), the controller's peak RSS and
CPU time (wait4 rusage), the simulator's, and how long `edgepack fleet status` takes over the fleet.

mosquitto needs, for a fleet this size (see docs/ota.md): `max_queued_messages` raised (default
100 per client: a controller subscribed to every device's status/events/telemetry would have
messages dropped in a burst), enough file descriptors (one per device; the limit is raised here).

    .venv/bin/python benchmarks/fleet_scale.py [--devices 1000] [--soak 30]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from brokers import Broker  # noqa: E402

EDGEPACK = str(Path(sys.executable).with_name("edgepack"))
BROKER_LINES = ("max_queued_messages 100000", "max_inflight_messages 100", "sys_interval 1", "max_connections -1")


class SysCounters:
    """mosquitto's $SYS message counters, as they arrive (every sys_interval)."""

    def __init__(self, url: str):
        from edgeproto.broker import BrokerConfig
        from fleet.conn import Collector

        self.values: dict[str, float] = {}
        self.conn = Collector(BrokerConfig(url=url), ["$SYS/broker/messages/received", "$SYS/broker/messages/sent",
                                                      "$SYS/broker/bytes/received", "$SYS/broker/bytes/sent"],
                              name="bench-sys", on_message=self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            self.values[topic.rsplit("/", 2)[-2] + "_" + topic.rsplit("/", 1)[-1]] = float(payload)
        except ValueError:
            pass

    def snapshot(self) -> tuple[float, dict]:
        time.sleep(1.2)  # a fresh reading
        return time.monotonic(), dict(self.values)


class SimProc:
    def __init__(self, url: str, bundle: Path, devices: int, extra: list[str], telemetry_s: float, rate: float):
        cmd = [EDGEPACK, "fleet", "simulate", "--devices", str(devices), "--bundle", str(bundle), "--broker", url,
               "--group", "fleet", "--id-prefix", "dev", "--telemetry-interval", str(telemetry_s),
               "--rate", str(rate), "--report-every", "5", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[dict] = []
        self.ready = threading.Event()
        self.peak_rss = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            self.lines.append(doc)
            if doc.get("event") == "ready":
                self.ready.set()

    def proc_stats(self) -> dict:
        st = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = next(int(x.split()[1]) for x in st.splitlines() if x.startswith("VmHWM:"))
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return {"peak_rss_mb": round(hwm / 1024, 1), "cpu_s": round((int(fields[11]) + int(fields[12])) / tick, 1),
                "threads": int(fields[17])}

    def summary(self, wait_s: float = 6.0) -> dict:
        n = len(self.lines)
        deadline = time.monotonic() + wait_s
        while len(self.lines) == n and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.lines[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_controller(args: list[str]) -> tuple[int, str, dict]:
    p = subprocess.Popen([EDGEPACK, "rollout", "start", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(p.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()), daemon=True)
    t_out.start(), t_err.start()
    _pid, status, ru = os.wait4(p.pid, 0)
    t_out.join(5), t_err.join(5)
    p.returncode = os.waitstatus_to_exitcode(status)
    usage = {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1)}
    sys.stderr.write("".join(err_chunks))
    return p.returncode, "".join(out_chunks), usage


def fleet_status_time(url: str, listen: float) -> tuple[float, int]:
    t0 = time.monotonic()
    out = subprocess.run([EDGEPACK, "fleet", "status", "--broker", url, "--listen", str(listen), "--json"],
                         capture_output=True, text=True, timeout=120)
    return round(time.monotonic() - t0, 2), len(json.loads(out.stdout or "[]"))


def _rate(c0, c1, key: str) -> float:
    return round((c1[1].get(key, 0) - c0[1].get(key, 0)) / (c1[0] - c0[0]), 1)


def one_run(kind: str, a, work: Path, v1: Path, v2: Path) -> dict:
    broker = Broker(work / f"broker-{kind}", extra=BROKER_LINES).start()
    sim = SimProc(broker.url, v1, a.devices, ["--slow", "1.0"] if kind == "slow" else [], a.telemetry, a.rate)
    try:
        t0 = time.monotonic()
        if not sim.ready.wait(300):
            raise SystemExit("the simulated fleet did not connect within 300 s")
        connect_s = round(time.monotonic() - t0, 1)
        counters = SysCounters(broker.url)
        c0 = counters.snapshot()
        rid = f"bench-{kind}"
        t1 = time.monotonic()
        rc, out, usage = run_controller([str(v2), "--group", "fleet", "--broker", broker.url, "--id", rid,
                                         "--previous", str(v1), "--soak", str(a.soak),
                                         "--baseline-seconds", str(a.baseline), "--wave-timeout", "900",
                                         "--probation-seconds", str(a.probation), "--probation-requests", "100000",
                                         "--json"])
        took = round(time.monotonic() - t1, 1)
        c1 = counters.snapshot()
        counters.conn.stop()
        rec = json.loads(subprocess.run([EDGEPACK, "rollout", "status", rid, "--broker", broker.url, "--json"],
                                        capture_output=True, text=True, timeout=60).stdout)[0]
        rates = {"received_msgs_per_s": _rate(c0, c1, "messages_received"),
                 "sent_msgs_per_s": _rate(c0, c1, "messages_sent"),
                 "sent_mb_per_s": round(_rate(c0, c1, "bytes_sent") / 1e6, 1)}
        status_times = {f"listen_{ls}s": fleet_status_time(broker.url, ls) for ls in (2.0, 0.5)}
        summ = sim.summary()
        return {"kind": kind, "devices": a.devices, "connect_s": connect_s, "controller_rc": rc, "rollout_s": took,
                "status": rec["status"], "reason": rec.get("reason"),
                "waves": [{"devices": len(w["devices"]), "state": w["state"], **w.get("times", {})}
                          for w in rec["waves"]],
                "broker": rates, "controller": usage, "simulator": sim.proc_stats(), "fleet_status": status_times,
                "versions": summ.get("versions"), "updates": summ.get("updates"),
                "ever_switched": summ.get("ever_switched"), "ever_switched_count": summ.get("ever_switched_count"),
                "canary": rec["waves"][0]["devices"]}
    finally:
        sim.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1_000_000, help="model bytes in the bundle")
    ap.add_argument("--soak", type=float, default=30.0)
    ap.add_argument("--baseline", type=float, default=20.0)
    ap.add_argument("--probation", type=float, default=10.0)
    ap.add_argument("--telemetry", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--runs", default="good,slow")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children (broker, simulator) inherit it
    from edgepack.sim.simulator import synthetic_bundle

    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        work = Path(tmp)
        v1 = synthetic_bundle(work / "v1.edgepack", version="1.0.0", size=a.size)
        v2 = synthetic_bundle(work / "v2.edgepack", version="1.1.0", size=a.size)
        print(f"bundles: {v1.stat().st_size} and {v2.stat().st_size} bytes; {os.cpu_count()} cores; "
              f"soak {a.soak:g} s, baseline {a.baseline:g} s, probation {a.probation:g} s, "
              f"telemetry every {a.telemetry:g} s, {a.rate:g} req/s per device", flush=True)
        for kind in a.runs.split(","):
            res = one_run(kind, a, work, v1, v2)
            print(json.dumps(res, indent=1), flush=True)
            print(f"== {kind}: {res['status']} in {res['rollout_s']} s; waves "
                  + ", ".join(f"{w['devices']} dev {w['state']} (update {w.get('update_s')} s, soak {w.get('soak_s')} s"
                              + (f", rollback {w['rollback_s']} s" if 'rollback_s' in w else "") + ")"
                              for w in res["waves"])
                  + f"; broker {res['broker']}; controller {res['controller']}; simulator {res['simulator']}; "
                  f"fleet status {res['fleet_status']}", flush=True)


if __name__ == "__main__":
    main()
