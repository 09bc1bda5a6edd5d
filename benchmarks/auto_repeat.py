"""Does `--quantize auto` choose the same for the same inputs on a loaded host? (issue 24, finding 5)
Trains the demo's digits CNN once, then builds it N times for every built-in target with the demo's
data and gate (`edgepack build` processes at the CLI's timing defaults, the build cache on: conversions repeat, the timings that decide
do not), optionally beside CPU burners. Prints each run's chosen precision per target and the speed
verdicts behind it, then whether every run chose alike (a tie, said in the report, counts as agreeing
only when the same candidate shipped).

    python benchmarks/auto_repeat.py [--runs 2] [--burn 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent / "edgepack"


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--burn", type=int, default=1, help="CPU-burning processes beside the builds")
    args = ap.parse_args()
    from packager.examples.digits import train

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.burn)]
    with tempfile.TemporaryDirectory(prefix="edgepack-auto-repeat-") as tmp:
        work = Path(tmp)
        info = train(work / "digits", epochs=15)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", EDGEPACK_CACHE_DIR=str(work / "cache"))
        for b in burners:
            b.start()
        runs = []
        try:
            for i in range(args.runs):
                out = subprocess.run(
                    [str(BIN), "build", str(info["model"]), "-o", str(work / f"run{i}"), "--json", "--no-html",
                     *[a for t in ("arm-cpu", "coral", "rpi5", "x86-cpu", "jetson-gpu") for a in ("-t", t)],
                     "--calibration", str(work / "digits" / "calibration.npz"),
                     "--validation", str(work / "digits" / "validation.npz"), "--max-accuracy-drop", "1.0"],
                    capture_output=True, text=True, env=env)
                report = json.loads(out.stdout[out.stdout.index("{"):])
                runs.append({t["target"]: t for t in report["targets"]})
        finally:
            stop.set()
            for b in burners:
                b.join(timeout=5)
    print(f"{args.runs} builds of the digits CNN beside {args.burn} CPU burner(s) on {os.cpu_count()} cores")
    agree = True
    for target in runs[0]:
        chosen = [r[target].get("precision") for r in runs]
        why = []
        for r in runs:
            rows = [c for c in r[target].get("candidates", []) if (c.get("latency") or {}).get("ratio")]
            why.append("; ".join(f"{c['candidate']} {c['latency']['ratio']['verdict']} "
                                 f"{c['latency']['ratio']['median']:.2f}x" for c in rows) or "untimed")
        agree &= len(set(chosen)) == 1
        print(f"{target:<11} {' | '.join(map(str, chosen)):<24} {' | '.join(why)}")
    print("every run chose alike" if agree else "THE RUNS CHOSE DIFFERENTLY")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
