"""How fast the `edgepack` command answers what needs no model: --help, the target list, argument
and file errors (issue 24: under a second, with no framework log lines). Each command runs in a fresh
process, interleaved, N rounds; prints the median and worst wall time and any stderr line that is
not the command's own (absl, oneDNN, TensorFlow).

    python benchmarks/cli_latency.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "--help": ["--help"],
    "targets list": ["targets", "list"],
    "build (missing option)": ["build", "model.onnx"],
    "build (unknown flag)": ["build", "--bogus"],
    "build (missing model)": ["build", "missing.onnx", "-t", "arm-cpu"],
    "build (unknown target)": ["build", __file__, "-t", "arm-cpux"],
    "push --help": ["push", "--help"],
}
OWN = ("Usage:", "Error:", "error:", "  hint:", "Try ")  # what the command itself writes to stderr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    noise: dict[str, set[str]] = {k: set() for k in COMMANDS}
    for _ in range(args.rounds):
        for label, argv in COMMANDS.items():  # interleaved: a busy moment hits every command alike
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "edgepack.cli", *argv], capture_output=True, text=True)
            times[label].append(time.perf_counter() - t0)
            noise[label] |= {ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(OWN)}
    print(f"{'command':<26} {'median s':>9} {'worst s':>8}  framework lines on stderr")
    for label in COMMANDS:
        t = times[label]
        print(f"{label:<26} {statistics.median(t):>9.2f} {max(t):>8.2f}  {len(noise[label])}"
              + (f" (e.g. {sorted(noise[label])[0][:60]!r})" if noise[label] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
