"""Shared fixtures: small real models generated here (never committed), built once per session."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROCESS_MARKERS = ("broker", "agent")  # tests that start these processes are slow (tests/tiers.py)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before -m selects: the broker fixture implies the broker marker; broker and agent imply slow."""
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)
        if any(item.get_closest_marker(m) for m in PROCESS_MARKERS):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The test's markers, before any of its fixtures (module-scoped ones too) start a process."""
    import tiers

    tiers.enter(frozenset(m.name for m in item.iter_markers()))


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The example's CNN trained on scikit-learn's digits; model + calibration/validation npz."""
    from packager.examples.digits import train

    out = tmp_path_factory.mktemp("digits")
    info = train(out, epochs=15)
    return {"dir": out, "model": info["model"], "calibration": out / "calibration.npz",
            "validation": out / "validation.npz", "labels": out / "labels.txt", "accuracy": info["test_accuracy"]}


@pytest.fixture(scope="session")
def digits_build(digits, tmp_path_factory):
    """The digits model built for every built-in target (shared by many tests): int8 for the CPU
    and Coral targets, fp16 for jetson-gpu (symmetric int8 for TensorRT costs digits 1.1 points,
    over the gate). Fixed precisions, so the bundles' types do not depend on this host's timings;
    --quantize auto has its own tests."""
    from dataclasses import replace

    from packager.build import BuildOptions, BuildResult, build
    from targets import Precision

    out = tmp_path_factory.mktemp("digits-bundles")
    opts = BuildOptions(model=digits["model"], targets=("arm-cpu", "coral", "rpi5", "x86-cpu"), out_dir=out,
                        precision=Precision.INT8, calibration=str(digits["calibration"]),
                        validation=str(digits["validation"]), labels=digits["labels"], name="digits",
                        version="1.0.0", bench_seconds=0.5)
    a = build(opts)
    b = build(replace(opts, targets=("jetson-gpu",), precision=Precision.FP16))
    return BuildResult(model=a.model, source_format=a.source_format, results=a.results + b.results,
                       seconds=a.seconds + b.seconds, shared=a.shared)


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Small untrained Keras models for the conversion matrix and the lint checks."""
    import keras

    keras.utils.set_random_seed(1)
    d = tmp_path_factory.mktemp("models")
    L = keras.layers
    # Regression head (no softmax) so quantization error shows in the numbers.
    inp = keras.Input((16, 16, 3), name="image")
    h = L.Conv2D(8, 3, activation="relu")(inp)
    h = L.DepthwiseConv2D(3, activation="relu")(h)
    h = L.GlobalAveragePooling2D()(h)
    cnn = keras.Model(inp, L.Dense(4, name="score")(h))
    # Two inputs of different dtypes: float image + int64 scalar id.
    img = keras.Input((8, 8, 1), name="image")
    ids = keras.Input((), dtype="int64", name="sensor_id")
    f = L.Flatten()(L.Conv2D(4, 3, activation="relu")(img))
    e = L.Embedding(4, 8)(ids)
    multi = keras.Model([img, ids], L.Dense(3)(L.Concatenate()([f, e])))
    # Dynamic height/width.
    dyn_in = keras.Input((None, None, 3), name="image")
    dyn = keras.Model(dyn_in, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, activation="relu")(dyn_in))))
    return {"cnn": _save(cnn, d / "cnn.keras"), "multi": _save(multi, d / "multi.keras"),
            "dynamic": _save(dyn, d / "dynamic.keras"), "dir": d}


@pytest.fixture(scope="session")
def flex_savedmodel(tmp_path_factory):
    """A SavedModel whose ops (Cumprod, MatrixDeterminant) have no TFLite builtin."""
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.linalg.det(tf.reshape(x, (-1, 2, 2)))[:, None] + tf.math.cumprod(x, axis=-1)}

    d = tmp_path_factory.mktemp("flex") / "saved_model"
    m = M()
    tf.saved_model.save(m, str(d), signatures={"serving_default": m.serve})
    return d


@pytest.fixture(scope="session")
def tabular(tmp_path_factory):
    """The corpus' tabular MLP (Normalization layer in front of raw 0.05..4,000 features)."""
    from corpus_models import tabular as make

    out = tmp_path_factory.mktemp("tabular")
    model = make(out)
    return {"model": model, "calibration": out / "tab-calibration.npz", "validation": out / "tab-validation.npz"}


@pytest.fixture(scope="session")
def cnn_data(models):
    rng = np.random.default_rng(0)
    p = models["dir"] / "cnn_calib.npz"
    np.savez(p, image=rng.random((64, 16, 16, 3), dtype=np.float32))
    return p


@pytest.fixture(scope="session")
def digits_bundle(digits_build):
    """The digits arm-cpu (int8, float I/O) bundle."""
    return next(r.bundle for r in digits_build.results if r.target == "arm-cpu")


@pytest.fixture
def broker(tmp_path):
    from brokers import Broker

    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


# ---- OTA fixtures shared by the OTA, security and fault tests ----

@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from edgebundle.signing import generate_keys

    d = tmp_path_factory.mktemp("keys")
    generate_keys(d / "a.key", d / "a.pub")
    generate_keys(d / "b.key", d / "b.pub")
    return d


@pytest.fixture(scope="session")
def versions(digits, keys, tmp_path_factory):
    """digits arm-cpu bundles: 1.0.0, 1.1.0, 0.9.0 signed with key a; 1.1.0 signed with b; 1.1.0 unsigned."""
    from packager.build import BuildOptions, build

    out = tmp_path_factory.mktemp("versions")
    made = {}
    for tag, version, key in [("v1", "1.0.0", "a"), ("v2", "1.1.0", "a"), ("v09", "0.9.0", "a"),
                              ("v2b", "1.1.0", "b"), ("v2u", "1.1.0", None)]:
        res = build(BuildOptions(model=digits["model"], targets=("arm-cpu",), out_dir=out / tag, name="digits",
                                 version=version, calibration=str(digits["calibration"]),
                                 validation=str(digits["validation"]), bench_runs=5, bench_seconds=0.2,
                                 sign_key=keys / f"{key}.key" if key else None))
        assert res.ok, res.results[0].error
        made[tag] = res.results[0].bundle
    return made


@pytest.fixture(scope="session")
def sqrt_bundles(keys, tmp_path_factory):
    """'sq' 1.0.0 computes sqrt(|x|); 1.1.0 computes sqrt(x): healthy on the (positive) golden
    inputs, NaN on negative traffic; 1.2.0 computes sqrt(|x|) again (a healthy update)."""
    import keras

    from packager.build import BuildOptions, build
    from targets import Precision

    d = tmp_path_factory.mktemp("sq")
    rng = np.random.default_rng(0)
    np.savez(d / "val.npz", x=rng.random((20, 4), dtype=np.float32) + 0.1)
    made = {}
    healthy = lambda t: keras.ops.sqrt(keras.ops.abs(t))  # noqa: E731
    for version, fn in (("1.0.0", healthy), ("1.1.0", keras.ops.sqrt), ("1.2.0", healthy)):
        inp = keras.Input((4,), name="x")
        m = keras.Model(inp, keras.layers.Lambda(fn)(inp))
        path = d / f"sq{version}"  # a SavedModel: Keras refuses to reload Python lambdas (safe_mode)
        m.export(str(path), verbose=False)
        res = build(BuildOptions(model=path, targets=("arm-cpu",), out_dir=d / version, name="sq", version=version,
                                 precision=Precision.FP32, validation=str(d / "val.npz"), bench_runs=5,
                                 bench_seconds=0.2, sign_key=keys / "a.key"))
        assert res.ok, res.results[0].error
        made[version] = res.results[0].bundle
    return made


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only; skipped elsewhere): real ENOSPC, nothing simulated."""
    yield from _tmpfs(tmp_path / "small", "2m")


def _tmpfs(d, size: str):
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)
