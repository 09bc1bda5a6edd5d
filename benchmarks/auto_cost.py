"""What `--quantize auto` costs against one fixed precision (the profile's default), per corpus
model and target: build seconds of each, one target per build, same data. Target: median
ratio <= 2x, worst <= 4x.

    make corpus && python benchmarks/auto_cost.py [--models NAME ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    import numpy as np

    from corpus_models import prepared
    from edgebundle.errors import EdgepackError
    from packager.build import BuildOptions, build
    from targets import Precision, load_profile

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-autocost-") as tmp:
        for cm, out, model, calib, valid in prepared(Path(tmp), args.models):
            for target in cm.targets:
                fixed = load_profile(target).default_precision
                if model.suffix == ".tflite":  # auto packages a ready .tflite as it is: nothing to compare
                    print(f"{cm.name:<20}{target:<12}skipped: a .tflite source is packaged as it is", flush=True)
                    continue
                secs = {}
                for label, prec in (("fixed", fixed), ("auto", Precision.AUTO)):
                    t0 = time.perf_counter()
                    try:
                        res = build(BuildOptions(model=model, targets=(target,), out_dir=out / label, precision=prec,
                                                 calibration=str(calib), validation=str(valid), name=cm.name))
                    except EdgepackError as e:  # refused before building (e.g. the precision does not apply)
                        print(f"{cm.name:<20}{target:<12}{label} {prec.value}: refused: {str(e).splitlines()[0]}")
                        break
                    secs[label] = time.perf_counter() - t0
                    r = res.results[0]
                    secs[label + "_what"] = r.report.get("candidate") if r.ok else f"FAILED {r.error_kind}"
                    if label == "auto":
                        secs["tried"] = len(r.report.get("candidates", []))
                if "auto" not in secs:
                    continue
                rows.append(dict(model=cm.name, target=target, fixed_precision=fixed.value, **secs))
                d = rows[-1]
                print(f"{d['model']:<20}{d['target']:<12}fixed {d['fixed_precision']:<6}{d['fixed']:7.1f} s "
                      f"({d['fixed_what']})   auto {d['auto']:7.1f} s ({d['auto_what']}, {d['tried']} tried)   "
                      f"{d['auto'] / d['fixed']:.2f}x", flush=True)
    ratios = np.array([d["auto"] / d["fixed"] for d in rows])
    print(f"\n{len(rows)} model x target pairs: auto / fixed build time median {np.median(ratios):.2f}x, "
          f"worst {ratios.max():.2f}x ({rows[int(ratios.argmax())]['model']} {rows[int(ratios.argmax())]['target']})")


if __name__ == "__main__":
    main()
