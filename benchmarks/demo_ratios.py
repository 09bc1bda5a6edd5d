"""Do the build table's latency ratios mean something? Runs `edgepack demo` N times; after each,
for every bundle whose table shows a ratio against fp32, rebuilds that target at --quantize fp32
(checking it is the very fp32 model the build timed: same sha256 as the report's `fp32_sha256`)
and runs `edgepack bench BUNDLE --against FP32` in a fresh process. Target: every build-table
ratio within +-25 % of the bench ratio.

    python benchmarks/demo_ratios.py [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent / "edgepack"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from edgebundle.archive import open_bundle, sha256_file

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    worst, rows, unresolved = 0.0, [], 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="edgepack-demo-ratios-") as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            demo = subprocess.run([str(BIN), "demo", "--workdir", str(work)], capture_output=True, text=True, env=env)
            demo_s = time.perf_counter() - t0
            if demo.returncode != 0:
                sys.exit(f"demo failed:\n{demo.stdout[-2000:]}\n{demo.stderr[-2000:]}")
            print(f"run {run + 1}: demo took {demo_s:.1f} s")
            for bundle in sorted((work / "bundles").glob("digits-1.0.0-*.edgepack")):
                m = open_bundle(bundle).manifest
                lat = m.report.get("latency_ms") or {}
                if "ratio" not in lat:
                    print(f"  {m.target['name']:<10} {m.precision:<6} no ratio in the table "
                          f"({'fp32 itself' if lat.get('baseline') else 'not timed here'})")
                    continue
                target = m.target["name"]
                ref_dir = work / "fp32" / target
                subprocess.run([str(BIN), "build", str(work / "v1" / "digits.keras"), "-t", target, "--quantize",
                                "fp32", "--validation", str(work / "v1" / "validation.npz"), "--name", "digits",
                                "-o", str(ref_dir)], capture_output=True, text=True, env=env, check=True)
                ref = next(ref_dir.glob("*.edgepack"))
                rm = open_bundle(ref)
                with tempfile.TemporaryDirectory() as x:
                    same = sha256_file(open_bundle(ref).extract(x, [rm.manifest.model_file])[rm.manifest.model_file])
                same = same == m.report.get("fp32_sha256")
                out = subprocess.run([str(BIN), "bench", str(bundle), "--against", str(ref), "--json",
                                      "--max-seconds", "3"], capture_output=True, text=True, env=env, check=True)
                bench = json.loads(out.stdout)["ratio"]
                build_r = lat["ratio"]["median"]
                if not lat["ratio"].get("resolved", True) or not bench.get("resolved", True):
                    # the build table shows no figure for an unresolved ratio: nothing to compare
                    unresolved += 1

                    def fig(r: dict) -> str:
                        med = "unresolved" if not r.get("resolved", True) else f"{r['median']:.2f}x"
                        return f"{med} ({r['q1']:.2f}-{r['q3']:.2f})"

                    print(f"  {target:<10} {m.precision:<6} build {fig(lat['ratio'])}  bench {fig(bench)}  not compared")
                    continue
                dev = build_r / bench["median"] - 1
                worst = max(worst, abs(dev))
                rows.append(dev)
                print(f"  {target:<10} {m.precision:<6} build {build_r:.2f}x ({lat['ratio']['q1']:.2f}-"
                      f"{lat['ratio']['q3']:.2f})  bench {bench['median']:.2f}x ({bench['q1']:.2f}-{bench['q3']:.2f})"
                      f"  {dev:+.0%}  same fp32 file: {'yes' if same else 'NO'}")
    print(f"\n{len(rows)} resolved ratios over {args.runs} demo runs; largest deviation of build from bench: "
          f"{worst:.0%} (target <= 25 %); {unresolved} unresolved (no figure in the table, or bench could not time it)")


if __name__ == "__main__":
    main()
