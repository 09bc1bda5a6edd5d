"""What the build cache (packager/store.py) saves: the same model built cold (empty cache), again
(warm: a new --version), and for one more target, side by side in one run, each in its own process
so that no TensorFlow state carries over.

    python benchmarks/build_cache.py [--model PATH --calibration NPZ --validation NPZ] [--quantize auto]

Without --model it trains the digits example (packager.examples.digits) first."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent


def _build(model, calib, valid, targets, out, cache, version, quantize) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "edgepack.cli", "build", str(model), "-o", str(out), "--calibration", str(calib),
           "--validation", str(valid), "--quantize", quantize, "--version", version, "--cache-dir", str(cache),
           "--json", "--no-html", "--name", "bench"]
    for t in targets:
        cmd += ["-t", t]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"build failed ({res.returncode}): {res.stderr[-2000:]}")
    return secs, json.loads(res.stdout[res.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--calibration")
    ap.add_argument("--validation")
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--targets", nargs="+", default=["arm-cpu", "x86-cpu"])
    ap.add_argument("--more", default="rpi5", help="the target added in the third build")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepack-cache-bench-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model, calib, valid = args.model, args.calibration, args.validation
        else:
            sys.path.insert(0, str(ROOT))
            from packager.examples.digits import train

            info = train(tmp / "digits", epochs=5)
            model, calib, valid = info["model"], tmp / "digits" / "calibration.npz", tmp / "digits" / "validation.npz"
        cache = tmp / "cache"
        rows = []
        for what, targets, version in (("cold (empty cache)", args.targets, "1.0.0"),
                                       ("warm (new --version)", args.targets, "1.0.1"),
                                       (f"warm + {args.more}", args.targets + [args.more], "1.0.2")):
            secs, rep = _build(model, calib, valid, targets, tmp / f"out-{version}", cache, version, args.quantize)
            cands = [c for t in rep["targets"] for c in t.get("candidates", [])]
            rows.append((what, " ".join(targets), secs, sum(bool(c.get("cached")) for c in cands), len(cands)))
        cold = rows[0][2]
        print(f"model {model}, --quantize {args.quantize}; each build in its own `edgepack build` process\n")
        print("| build | targets | seconds | vs cold | candidates from the cache |")
        print("| --- | --- | ---: | ---: | ---: |")
        for what, targets, secs, hits, n in rows:
            print(f"| {what} | {targets} | {secs:.1f} | {secs / cold:.2f}x | {hits}/{n} |")


if __name__ == "__main__":
    main()
