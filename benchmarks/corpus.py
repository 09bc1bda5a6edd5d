"""Every corpus model (tests/corpus_models.py) built with --quantize auto for every target it
fits: chosen precision, size ratio, latency ratio with its spread, accuracy or similarity,
candidates tried and build time. Targets that must refuse a model are checked to refuse it.

    make corpus && python benchmarks/corpus.py [--models NAME ...] [--search thorough] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def row(model: str, r) -> dict:
    if not r.ok:
        return {"model": model, "target": r.target, "ok": False, "error_kind": r.error_kind,
                "error": r.error.splitlines()[0][:160], "tried": [c["candidate"] for c in r.report.get("candidates", [])]}
    rep = r.report
    lat, acc = rep["latency_ms"], rep["accuracy"] or {}
    ratio = (lat or {}).get("ratio")
    return {"model": model, "target": r.target, "ok": True, "chosen": rep["candidate"], "size_ratio": rep["size_ratio"],
            "latency": None if not ratio else [ratio["median"], ratio["q1"], ratio["q3"]],
            "drop": acc.get("accuracy_drop_points"), "metric": acc.get("drop_metric"),
            "cosine": min((m["cosine_similarity"] for m in acc.get("outputs", {}).values()), default=None),
            "tried": [f"{c['candidate']}:{c['verdict']}" for c in rep["candidates"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--search", default="first", choices=("first", "thorough"))
    ap.add_argument("--precision", default="auto", help="a fixed precision instead of auto (for cost comparisons)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from corpus_models import prepared
    from edgebundle.errors import EdgepackError
    from packager.build import BuildOptions, build
    from packager.candidates import Search
    from targets import Precision

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-corpus-") as tmp:
        for cm, out, model, calib, valid in prepared(Path(tmp), args.models):
            for target in cm.targets:  # one build per target: its own build time
                t0 = time.perf_counter()
                res = build(BuildOptions(model=model, targets=(target,), out_dir=out / "dist",
                                         precision=Precision(args.precision), search=Search(args.search),
                                         calibration=str(calib), validation=str(valid), name=cm.name))
                d = dict(row(cm.name, res.results[0]), build_s=round(time.perf_counter() - t0, 1))
                rows.append(d)
                print(json.dumps(d), flush=True)
            for target in cm.refused:  # must refuse, before any conversion
                try:
                    build(BuildOptions(model=model, targets=(target,), out_dir=out / "refused",
                                       calibration=str(calib), validation=str(valid)))
                    refused = "NOT REFUSED"
                except EdgepackError as e:
                    refused = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
                print(f"{cm.name} {target}: {refused}", flush=True)
    print(f"\n{'model':<20}{'target':<12}{'chosen':<12}{'size':>6}  {'latency (IQR)':<20}{'accuracy':<26}{'build':>7}"
          "  tried")
    for d in rows:
        if not d["ok"]:
            print(f"{d['model']:<20}{d['target']:<12}{'-':<12}{'':>6}  {'':<20}{d['error_kind']:<26}{d['build_s']:>6.1f}s"
                  f"  {d['error'][:70]}")
            continue
        lat = "-" if not d["latency"] else f"{d['latency'][0]:.2f}x ({d['latency'][1]:.2f}-{d['latency'][2]:.2f})"
        acc = (f"drop {d['drop']:.2f} pt ({d['metric']})" if d["drop"] is not None else f"cosine {d['cosine']:.4f}")
        print(f"{d['model']:<20}{d['target']:<12}{d['chosen']:<12}{d['size_ratio']:>5.2f}x  {lat:<20}{acc:<26}"
              f"{d['build_s']:>6.1f}s  {' '.join(d['tried'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
