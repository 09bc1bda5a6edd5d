"""Bundles the agent benchmarks run on, built once into benchmarks/.cache (git-ignored):
the digits CNN (arm-cpu int8) and Keras MobileNetV2 (weights=None, 224x224, arm-cpu int8,
random calibration: no real images or weights can be had here)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"


def digits_bundle(target: str = "arm-cpu", version: str = "1.0.0") -> Path:
    out = CACHE / f"digits-{version}-{target}.edgepack"
    if not out.exists():
        from packager.examples.digits import train

        from packager.build import BuildOptions, build
        from targets import Precision

        info = train(CACHE / "digits", epochs=20)
        res = build(BuildOptions(model=info["model"], targets=(target,), out_dir=CACHE, name="digits",
                                 version=version, calibration=str(CACHE / "digits" / "calibration.npz"),
                                 validation=str(CACHE / "digits" / "validation.npz"), precision=Precision.INT8))
        assert res.ok, res.results[0].error
    return out


def mobilenet_bundle(target: str = "arm-cpu", precision: str = "int8", version: str = "1.0.0") -> Path:
    out = CACHE / precision / f"mobilenetv2-{version}-{target}.edgepack"
    if not out.exists():
        import keras

        from packager.build import BuildOptions, build
        from targets import Precision

        keras.utils.set_random_seed(0)
        path = CACHE / "mobilenetv2.keras"
        image = keras.Input((224, 224, 3), name="image")  # one name for every version: the same interface
        keras.applications.MobileNetV2(weights=None, input_tensor=image).save(path)
        res = build(BuildOptions(model=path, targets=(target,), out_dir=CACHE / precision, name="mobilenetv2",
                                 version=version,
                                 precision=Precision(precision), calibration="random", calibration_samples=50,
                                 accuracy_gate=False))  # untrained weights, random inputs: nothing to judge
        assert res.ok, res.results[0].error
    return out
