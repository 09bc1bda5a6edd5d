"""Size, host latency and accuracy of quantized bundles vs fp32, through `edgepack build`.

Models: the digits CNN (real data, labels) and Keras MobileNetV2 (weights=None, 224x224,
no real data here: calibration and agreement use random inputs, so its agreement figure
only shows how far int8 moves an untrained network's outputs).
Targets: arm-cpu int8 latency <= 0.75x fp32 and size <= 0.3x; digits int8 accuracy drop
<= 1.0 point; ONNX int8 latency on CPU <= 0.7x fp32.

    python benchmarks/quantization_quality.py [--skip-mobilenet]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rows(result) -> list[dict]:
    rows = []
    for r in result.results:
        if not r.ok:
            rows.append({"target": r.target, "error": r.error.splitlines()[0]})
            continue
        rep = r.report
        acc, lat = rep["accuracy"], rep["latency_ms"]
        rows.append({"target": r.target, "precision": rep["precision"], "size_ratio": rep["size_ratio"],
                     "model_kb": rep["size_bytes"]["model"] / 1024,
                     "fp32_ms": lat["a_ms"], "ms": lat["b_ms"], "lat_ratio": lat["ratio"]["median"],
                     "drop": acc["accuracy_drop_points"], "metric": acc["drop_metric"], "agree": acc["top1_agreement"]})
    return rows


def _print(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"  {'target':<11}{'prec':<7}{'model KB':>9}{'size':>7}{'fp32 ms':>9}{'ms':>9}{'lat':>7}"
          f"{'drop pt':>9}  metric")
    for r in rows:
        if "error" in r:
            print(f"  {r['target']:<11}FAILED {r['error']}")
            continue
        print(f"  {r['target']:<11}{r['precision']:<7}{r['model_kb']:>9.1f}{r['size_ratio']:>6.2f}x"
              f"{r['fp32_ms']:>9.3f}{r['ms']:>9.3f}{r['lat_ratio']:>6.2f}x{r['drop']:>9.2f}  {r['metric']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-mobilenet", action="store_true")
    args = ap.parse_args()
    from packager.build import BuildOptions, build
    from packager.examples.digits import train
    from targets import Precision

    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = train(tmp / "digits")
        # int8 on the CPU targets, timed against fp32 in the clean timing process (interleaved).
        res = build(BuildOptions(model=info["model"], targets=("arm-cpu", "x86-cpu"), out_dir=tmp / "b1",
                                 precision=Precision.INT8, calibration=str(tmp / "digits" / "calibration.npz"),
                                 validation=str(tmp / "digits" / "validation.npz"), bench_seconds=5))
        rows = _rows(res)
        _print(f"digits CNN (test accuracy fp32 {info['test_accuracy']:.4f}, 450 labelled test images)", rows)
        arm = next(r for r in rows if r["target"] == "arm-cpu")
        checks.append(("digits arm-cpu int8 accuracy drop <= 1.0 pt", arm.get("drop"), arm.get("drop", 99) <= 1.0))
        if not args.skip_mobilenet:
            import keras

            keras.utils.set_random_seed(0)
            mnet = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
            path = tmp / "mobilenetv2.keras"
            mnet.save(path)
            # Untrained weights and random inputs: agreement means nothing, so the gate is off here;
            # size and latency are the point.
            res = build(BuildOptions(model=path, targets=("arm-cpu", "x86-cpu"), out_dir=tmp / "b2",
                                     precision=Precision.INT8, calibration="random", calibration_samples=50,
                                     accuracy_gate=False, bench_seconds=10))
            rows = _rows(res)
            _print("MobileNetV2 (weights=None, 224x224; random calibration/validation inputs)", rows)
            by = {r["target"]: r for r in rows}
            a, o = by["arm-cpu"], by["x86-cpu"]
            checks.append(("MobileNetV2 arm-cpu int8 latency <= 0.75x fp32", a.get("lat_ratio"),
                           a.get("lat_ratio", 9) <= 0.75))
            checks.append(("MobileNetV2 arm-cpu int8 size <= 0.3x fp32", a.get("size_ratio"),
                           a.get("size_ratio", 9) <= 0.3))
            checks.append(("MobileNetV2 ONNX int8 (x86-cpu) latency <= 0.7x fp32", o.get("lat_ratio"),
                           o.get("lat_ratio", 9) <= 0.7))
    print("\ntargets:")
    for name, value, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}: {value}")


if __name__ == "__main__":
    main()
