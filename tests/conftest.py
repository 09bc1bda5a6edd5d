"""Shared fixtures: small real models generated here (never committed), built once per session."""
from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import subprocess
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROCESS_MARKERS = ("broker", "agent")  # tests that start these processes are slow (tests/tiers.py)

# The longest modules as measured (`make test-times`, docs/testing.md), in the order xdist hands them
# out (--dist loadfile): longest first, so no long module is left running alone at the end, and the
# ones that convert (CPU-bound: TensorFlow, onnx2tf, ONNX Runtime) alternate with the ones that mostly
# wait (agents, brokers, timers), so that while one worker waits the other has work for both cores.
CONVERTING = ("test_corpus_mpnet.py", "test_corpus_gguf.py", "test_corpus_text.py", "test_corpus.py", "test_build.py", "test_onnx_tflite.py", "test_text_tflite.py",
              "test_keras_transformer.py", "test_demo.py", "test_text_buckets.py", "test_text_models.py",
              "test_hf_export.py", "test_report_page.py", "test_cli.py", "test_tflite_layout.py", "test_llm_build.py",
              "test_llm_lora.py")
WAITING = ("test_rollout.py", "test_ota.py", "test_faults.py", "test_delta.py", "test_security.py", "test_fleet_sim.py",
           "test_multi_model.py", "test_shadow.py", "test_agent_mqtt.py", "test_update_robustness.py",
           "test_fleet_models.py", "test_profile.py", "test_fleet_page.py", "test_llm_serve.py", "test_llm_fleet.py")
SLOW_FIRST = CONVERTING[:3] + tuple(m for pair in zip_longest(WAITING, CONVERTING[3:]) for m in pair if m)


def pytest_configure(config):
    from edgeruntime.quiet import quiet_native_exit

    quiet_native_exit()  # as the CLIs do: LiteRT's exit-time log lines stay out of the run's output
    if os.environ.get("EDGEPACK_FIXTURE_TIMES"):  # make test-times
        import fixture_times

        config.pluginmanager.register(fixture_times, "fixture_times")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before -m selects: the broker fixture implies the broker marker; broker and agent imply slow.
    Then the slowest modules move to the front."""
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)
        if any(item.get_closest_marker(m) for m in PROCESS_MARKERS):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order



@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The test's markers, before any of its fixtures (module-scoped ones too) start a process."""
    import tiers

    tiers.enter(frozenset(m.name for m in item.iter_markers()))


def shared(tmp_path_factory, name: str, make: Callable[[Path], object]):
    """A session fixture's value made once per run: `make(folder)` fills a folder and returns a
    picklable value. Under pytest-xdist the first worker to ask makes it in the run's shared temp dir
    (under a lock) and the others read it, so a model trained or a bundle built here is the same file
    in every worker (and signed with the same keys)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    done, out = root / f"{name}.pickle", root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(out, ignore_errors=True)  # left by a worker whose make() failed
        out.mkdir()
        value = make(out)
        done.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session", autouse=True)
def build_cache(tmp_path_factory) -> Path:
    """One build cache (packager/store.py) for the run, every xdist worker and child process: a model
    that several tests build is converted once. Tests that inject converter faults switch it off."""
    from packager.store import ENV

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    os.environ[ENV] = str(root / "build-cache")
    # the in-process loader's extraction cache (device_agent/extracted.py): this worker's, not the user's
    os.environ["EDGEPACK_EXTRACT_DIR"] = str(tmp_path_factory.getbasetemp() / "extracted")
    return root / "build-cache"


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The example's CNN trained on scikit-learn's digits; model + calibration/validation npz."""
    return shared(tmp_path_factory, "digits", _train_digits)


def _train_digits(out: Path) -> dict:
    from packager.examples.digits import train

    info = train(out, epochs=15)
    return {"dir": out, "model": info["model"], "calibration": out / "calibration.npz",
            "validation": out / "validation.npz", "labels": out / "labels.txt", "accuracy": info["test_accuracy"]}


@pytest.fixture(scope="session")
def digits_build(digits, tmp_path_factory):
    """The digits model built for every built-in target (shared by many tests): int8 for the CPU
    and Coral targets, fp16 for jetson-gpu (symmetric int8 for TensorRT costs digits 1.1 points,
    over the gate). Fixed precisions, so the bundles' types do not depend on this host's timings;
    --quantize auto has its own tests."""
    return shared(tmp_path_factory, "digits-bundles", lambda out: _build_digits(digits, out))


def _build_digits(digits, out: Path):
    from dataclasses import replace

    from packager.build import BuildOptions, BuildResult, build
    from targets import Precision

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
    def make(out: Path) -> dict:
        from corpus_models import tabular

        model = tabular(out)
        return {"model": model, "calibration": out / "tab-calibration.npz", "validation": out / "tab-validation.npz"}

    return shared(tmp_path_factory, "tabular", make)


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
    def make(d: Path) -> Path:
        from edgebundle.signing import generate_keys

        generate_keys(d / "a.key", d / "a.pub")
        generate_keys(d / "b.key", d / "b.pub")
        return d

    return shared(tmp_path_factory, "keys", make)


@pytest.fixture(scope="session")
def versions(digits, keys, tmp_path_factory):
    """digits arm-cpu bundles: 1.0.0, 1.1.0, 0.9.0 signed with key a; 1.1.0 signed with b; 1.1.0 unsigned.
    int8, not auto: under load auto once chose fp16 for 1.0.0 and int8 for 1.1.0 (a host timing), and the
    delta tests, which expect the same model in both, fetched the whole bundle."""
    return shared(tmp_path_factory, "versions", lambda out: _build_versions(digits, keys, out))


def _build_versions(digits, keys, out: Path) -> dict:
    from packager.build import BuildOptions, build
    from targets import Precision

    made = {}
    for tag, version, key in [("v1", "1.0.0", "a"), ("v2", "1.1.0", "a"), ("v09", "0.9.0", "a"),
                              ("v2b", "1.1.0", "b"), ("v2u", "1.1.0", None)]:
        res = build(BuildOptions(model=digits["model"], targets=("arm-cpu",), out_dir=out / tag, name="digits",
                                 version=version, calibration=str(digits["calibration"]), precision=Precision.INT8,
                                 validation=str(digits["validation"]), bench_runs=5, bench_seconds=0.2, speed_gate=False,
                                 sign_key=keys / f"{key}.key" if key else None))
        assert res.ok, res.results[0].error
        made[tag] = res.results[0].bundle
    return made


@pytest.fixture(scope="session")
def sqrt_bundles(keys, tmp_path_factory):
    """'sq' 1.0.0 computes sqrt(|x|); 1.1.0 computes sqrt(x): healthy on the (positive) golden
    inputs, NaN on negative traffic; 1.2.0 computes sqrt(|x|) again (a healthy update)."""
    return shared(tmp_path_factory, "sq", lambda d: _build_sqrt(keys, d))


def _build_sqrt(keys, d: Path) -> dict:
    import keras

    from packager.build import BuildOptions, build
    from targets import Precision

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
                                 bench_seconds=0.2, speed_gate=False, sign_key=keys / "a.key"))
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


# ---- small generative LLMs (tests/llmkit.py) ----

@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-layer Llama-style causal-LM folder, trained a few seconds on docstrings, with its tokenizer."""
    from llmkit import tiny_decoder

    return shared(tmp_path_factory, "tiny_llm", lambda d: tiny_decoder(d / "llama"))


@pytest.fixture(scope="session")
def llm_bundles(tiny_llm, keys, tmp_path_factory) -> dict:
    """Generative x86-cpu bundles of tiny_llm signed with key a: int4 1.0.0 and int4 1.1.0 (the same weights:
    what a delta update of a rebuilt model moves)."""
    def make(out: Path) -> dict:
        from functools import partial

        from edgebundle.signing import load_private_key, sign as signature
        from llmkit import write_genai
        from packager.llm.export import Recipe, export

        sign = partial(signature, private_key=load_private_key(keys / "a.key"))
        ex = export(tiny_llm, out / "int4", Recipe("int4", block_size=32), context_length=256)  # one export, two versions
        return {"v1": write_genai(ex, out / "v1", version="1.0.0", signer=sign),
                "v2": write_genai(ex, out / "v2", version="1.1.0", signer=sign)}

    return shared(tmp_path_factory, "llm_bundles", make)
