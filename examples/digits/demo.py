"""The main job on embedded defaults: train the digits CNN on real data, build bundles
for every built-in target, verify them and print the comparison.

    python examples/digits/demo.py [--out examples/digits/work]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work")
    args = ap.parse_args()

    from train import train

    from edgebundle.archive import verify_bundle
    from packager.build import BuildOptions, build
    from packager.report import build_table
    from targets import builtin_names

    info = train(args.out)
    print(f"== trained {info['model'].name}: test accuracy {info['test_accuracy']:.4f}")
    opts = BuildOptions(model=info["model"], targets=tuple(builtin_names()), out_dir=args.out / "bundles",
                        calibration=str(args.out / "calibration.npz"), validation=str(args.out / "validation.npz"),
                        labels=args.out / "labels.txt", name="digits", version="1.0.0", max_accuracy_drop=1.0)
    result = build(opts, progress=lambda m: print(f"   {m}", flush=True))
    print("\n== bundles\n" + build_table(result.to_dict()))
    for r in result.results:
        if r.ok:
            verify_bundle(r.bundle)
    print(f"\n== {sum(r.ok for r in result.results)}/{len(result.results)} bundles built and verified in "
          f"{args.out / 'bundles'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
