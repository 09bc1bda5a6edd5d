"""Where the test suite's time goes: `make test-times` runs the suite with --durations=0 and the
fixture timer (tests/fixture_times.py), then this script sums the figures per module (setup, call,
teardown) and lists the slowest fixtures, as Markdown tables for docs/testing.md.

    python benchmarks/test_times.py test-artifacts/durations.txt test-artifacts/fixtures.jsonl [--top 25]

With xdist, the seconds are per worker: their sum is more than the wall time the run took."""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+?)(?:::(.*))?$")
END = re.compile(r"^=*\s*(\d+ (?:passed|failed).* in [\d.]+s.*?)\s*=*$")


def read_durations(path: Path) -> tuple[dict[str, dict], str]:
    """{module: {"tests": n, "setup": s, "call": s, "teardown": s}} and pytest's closing line."""
    mods: dict[str, dict] = defaultdict(lambda: {"tests": set(), "setup": 0.0, "call": 0.0, "teardown": 0.0})
    closing = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            secs, when, module, test = float(m[1]), m[2], m[3], m[4] or ""
            mods[module][when] += secs
            mods[module]["tests"].add(test)
        elif END.match(line):
            closing = END.match(line)[1]
    return {k: {**v, "tests": len(v["tests"])} for k, v in mods.items()}, closing


def read_fixtures(path: Path) -> dict[tuple[str, str], dict]:
    """{(fixture, scope): {"seconds": total, "count": setups, "module": first requester}}."""
    out: dict[tuple[str, str], dict] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        row = out.setdefault((r["fixture"], r["scope"]), {"seconds": 0.0, "count": 0, "module": r["module"]})
        row["seconds"] += r["seconds"]
        row["count"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("durations", type=Path)
    ap.add_argument("fixtures", type=Path, nargs="?")
    ap.add_argument("--top", type=int, default=25, help="fixtures to list")
    args = ap.parse_args()
    mods, closing = read_durations(args.durations)
    total = sum(m["setup"] + m["call"] + m["teardown"] for m in mods.values())
    print(f"pytest: {closing or '(no closing line)'}; summed test seconds {total:.0f}\n")
    print("| module | tests | setup s | call s | teardown s | total s | share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m in sorted(mods.items(), key=lambda kv: -(kv[1]["setup"] + kv[1]["call"] + kv[1]["teardown"])):
        t = m["setup"] + m["call"] + m["teardown"]
        print(f"| {name.removeprefix('tests/')} | {m['tests']} | {m['setup']:.1f} | {m['call']:.1f} | "
              f"{m['teardown']:.1f} | {t:.1f} | {100 * t / total if total else 0:.1f} % |")
    if args.fixtures:
        fx = read_fixtures(args.fixtures)
        print(f"\n| fixture | scope | setups | seconds | first asked by |")
        print("| --- | --- | ---: | ---: | --- |")
        for (name, scope), r in sorted(fx.items(), key=lambda kv: -kv[1]["seconds"])[:args.top]:
            print(f"| {name} | {scope} | {r['count']} | {r['seconds']:.1f} | {r['module'].removeprefix('tests/')} |")


if __name__ == "__main__":
    main()
