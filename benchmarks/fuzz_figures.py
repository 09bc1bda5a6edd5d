"""The fuzzers of tests/test_fuzz_*.py with many more examples than the normal test run, and the
figures: examples tried and crashes per fuzzer (a crash = the fuzzer failed; its falsifying example
is printed by pytest above the table).

    python benchmarks/fuzz_figures.py [--examples 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZERS = ["v2 request: raw bytes", "v2 request: JSON + binary extension", "v2 request: mutated valid request",
           "desired record: any bytes", "desired record: mutated valid record",
           "desired record: changed after signing", "chunk messages", "download log on disk",
           "update record on disk", "bundle archives"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.jsonl"
        env = dict(os.environ, EDGEPACK_FUZZ_EXAMPLES=str(args.examples), EDGEPACK_FUZZ_REPORT=str(report))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fuzz",
                        "tests/test_fuzz_api.py", "tests/test_fuzz_ota.py"], cwd=ROOT, env=env)
        done = {r["fuzzer"]: r for r in map(json.loads, report.read_text().splitlines())} if report.exists() else {}
    print(f"{'fuzzer':<42}{'examples':>10}{'crashes':>9}")
    crashes = 0
    for name in FUZZERS:
        r = done.get(name)
        crashes += r is None
        print(f"{name:<42}{(r['examples'] if r else '-'):>10}{(0 if r else 'FOUND'):>9}")
    print(f"{'total':<42}{sum(r['examples'] for r in done.values()):>10}{crashes:>9}")
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
