"""The whole fault matrix of tests/test_faults.py, with figures: SIGKILL in every update state x
--seeds, the broker restarted mid-transfer and killed mid-probation, the disk full at every state,
the wall clock jumping. Per kind: runs, devices back serving a verified model, models lost.

    python benchmarks/fault_matrix.py [--seeds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "faults.jsonl", Path(tmp) / "junit.xml"
        env = dict(os.environ, EDGEPACK_FAULT_SEEDS=str(args.seeds), EDGEPACK_FAULT_REPORT=str(report))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
                        f"--junitxml={junit}"], cwd=ROOT, env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        cases = ET.parse(junit).getroot().iter("testcase")
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    by = defaultdict(list)
    for r in rows:
        by[r["kind"]].append(r)
    print(f"{'fault':<16}{'runs':>6}{'serving a verified model':>26}{'models lost':>13}  "
          "outcomes (state the record was in when the fault hit -> how the update ended)")
    total = serving = lost = 0
    for kind, rs in by.items():
        outcomes = defaultdict(int)
        for r in rs:
            outcomes[f"{r.get('killed_in', r['state'])}->{r['final']}"] += 1
        ok = sum(r["serving_verified"] for r in rs)
        ml = sum(r["models_lost"] for r in rs)
        total, serving, lost = total + len(rs), serving + ok, lost + ml
        print(f"{kind:<16}{len(rs):>6}{ok:>19} ({100 * ok / len(rs):.0f} %){ml:>13}  "
              + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))
    print(f"{'total':<16}{total + len(failed):>6}{serving:>19} ({100 * serving / max(total + len(failed), 1):.0f} %)"
          f"{lost:>13}")
    if failed:
        print("FAILED runs (not back serving a verified model, or another assertion):", ", ".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
