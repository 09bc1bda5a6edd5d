"""The canonical .tflite layout (packager/formats/tflite_layout.py) on the digits CNN (fp32 and int8)
and a tiny attention encoder over token ids (dynamic-range int8), converted in a child: outputs
bit-identical to the converter's file, the same bytes whatever order the converter wrote the buffers
in, and a retrained layer changing only its own bytes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# In a child: the digits CNN (one epoch) converted to fp32 and full int8, as the converter writes them.
CONVERT = r"""
import sys, numpy as np, tensorflow as tf
from pathlib import Path
from packager.examples.digits import train
out = Path(sys.argv[1])
info = train(out / "digits", epochs=1)
model = tf.keras.models.load_model(info["model"])
calib = np.load(out / "digits" / "calibration.npz")["image"][:50]
for name in ("fp32", "int8"):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if name == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x[None]] for x in calib)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int8
    (out / f"{name}.tflite").write_bytes(conv.convert())
tf.keras.utils.set_random_seed(0)
ids = tf.keras.Input((16,), dtype="int32", name="input_ids")
h = tf.keras.layers.Embedding(100, 64)(ids)
h = tf.keras.layers.LayerNormalization()(h + tf.keras.layers.MultiHeadAttention(2, 32)(h, h))
text = tf.keras.Model(ids, tf.keras.layers.Dense(8)(tf.keras.layers.GlobalAveragePooling1D()(h)))
conv = tf.lite.TFLiteConverter.from_keras_model(text)
conv.optimizations = [tf.lite.Optimize.DEFAULT]
(out / "text.tflite").write_bytes(conv.convert())
"""

# In a child that never imported TensorFlow: each model's outputs on the same inputs, as raw bytes.
RUN = r"""
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
for path in sys.argv[1:]:
    interp = Interpreter(model_path=path); interp.allocate_tensors()
    d = interp.get_input_details()[0]
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(4):
        x = rng.integers(-128, 128, d["shape"]) if d["dtype"] == np.int8 else rng.random(d["shape"])
        x = rng.integers(0, 100, d["shape"]) if d["dtype"] == np.int32 else x
        interp.set_tensor(d["index"], x.astype(d["dtype"])); interp.invoke()
        outs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).tobytes().hex())
    print(path, ",".join(outs))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    import os

    out = tmp_path_factory.mktemp("layout")
    # A module imported earlier in this process (onnx2tf) may have set TF_USE_LEGACY_KERAS: tf.keras
    # would then be tf_keras, which cannot load the digits model Keras 3 saved.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    res = subprocess.run([sys.executable, "-c", CONVERT, str(out)], timeout=420, capture_output=True, text=True,
                         env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    return {name: (out / f"{name}.tflite").read_bytes() for name in ("fp32", "int8", "text")}


def _outputs(tmp_path, models: dict[str, bytes]) -> dict[str, str]:
    paths = []
    for name, data in models.items():
        (tmp_path / f"{name}.tflite").write_bytes(data)
        paths.append(str(tmp_path / f"{name}.tflite"))
    res = subprocess.run([sys.executable, "-c", RUN, *paths], check=True, timeout=120, capture_output=True, text=True)
    return {line.split()[0].rsplit("/", 1)[1][:-len(".tflite")]: line.split()[1] for line in res.stdout.splitlines()}


@pytest.mark.parametrize("precision", ["fp32", "int8", "text"])
def test_outputs_bit_identical_and_layout_deterministic(models, tmp_path, precision):
    from packager.formats.tflite_layout import canonical

    raw = models[precision]
    out, why = canonical(raw)
    assert why is None and out != raw
    assert canonical(raw)[0] == out and canonical(out)[0] == out  # deterministic, and a fixed point
    got = _outputs(tmp_path, {"converted": raw, "canonical": out})
    assert got["converted"] == got["canonical"]


def _permuted(data: bytes) -> bytes:
    """The same model with its buffers (but 0) in reverse order, every index remapped: as a converter
    that walked the graph another way would write it."""
    from tensorflow.lite.tools.flatbuffer_utils import convert_object_to_bytearray

    from packager.tflite_fb import read_model

    model = read_model(data)
    n = len(model.buffers)
    new = {old: (n - old if old else 0) for old in range(n)}
    model.buffers = [model.buffers[0]] + model.buffers[:0:-1]
    for t in model.subgraphs[0].tensors:
        t.buffer = new[t.buffer]
    for m in model.metadata or []:
        m.buffer = new[m.buffer]
    return convert_object_to_bytearray(model)


@pytest.mark.parametrize("precision", ["fp32", "int8", "text"])
def test_same_bytes_whatever_the_converters_buffer_order(models, precision):
    from packager.formats.tflite_layout import canonical

    raw = models[precision]
    shuffled = _permuted(raw)
    assert shuffled != raw
    assert canonical(shuffled)[0] == canonical(raw)[0]


def test_a_retrained_layer_changes_only_its_own_bytes(models):
    """New weights of the same shape (the last layer retrained): every byte outside them stays put."""
    from tensorflow.lite.tools.flatbuffer_utils import convert_object_to_bytearray

    from packager.formats.tflite_layout import canonical
    from packager.tflite_fb import op_names, read_model

    model = read_model(models["int8"])
    names = op_names()
    dense = [op for op in model.subgraphs[0].operators
             if names[model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode] == "FULLY_CONNECTED"]
    head = dense[-1].inputs[1]  # the last FULLY_CONNECTED's weights
    buf = model.buffers[model.subgraphs[0].tensors[head].buffer]
    old = bytes(buf.data)
    buf.data = np.frombuffer(bytes(255 - b for b in old), np.uint8)
    a, b = canonical(models["int8"])[0], canonical(convert_object_to_bytearray(model))[0]
    assert len(a) == len(b)
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    start = b.find(bytes(255 - x for x in old))
    assert start > 0 and len(diff) and diff.min() >= start and diff.max() < start + len(old), (start, diff)


def test_custom_ops_and_edgetpu_keep_the_converters_file(models, tmp_path):
    from tensorflow.lite.tools.flatbuffer_utils import convert_object_to_bytearray

    from packager.formats.edgetpu import EdgeTPUBackend
    from packager.formats.tflite import TFLiteBackend
    from packager.formats.tflite_layout import canonical
    from packager.tflite_fb import read_model, schema

    model = read_model(models["fp32"])
    model.operatorCodes[0].builtinCode = model.operatorCodes[0].deprecatedBuiltinCode = schema().BuiltinOperator.CUSTOM
    model.operatorCodes[0].customCode = b"MyOp"
    custom = convert_object_to_bytearray(model)
    assert canonical(custom) == (custom, "it has custom ops (MyOp)")
    for backend, want in ((TFLiteBackend(), canonical(models["int8"])[0]), (EdgeTPUBackend(), models["int8"])):
        backend._write(tmp_path / "m.tflite", models["int8"])
        assert (tmp_path / "m.tflite").read_bytes() == want, type(backend).__name__
