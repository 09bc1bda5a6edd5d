"""Bad data is caught before any conversion, with a one-line reason and exit 2 (issue 24, finding 4):
NaN or infinite values, labels outside the model's classes, --labels with the wrong number of names,
an .npz whose arrays name no input, a truncated .npz, a text file named .npz; and a validation set
too small for the gate to mean much is said in the report. The model is a 10-class ONNX classifier
made here with onnx.helper (no TensorFlow); each refused build writes nothing."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.cli import main

pytestmark = pytest.mark.slow  # builds (ONNX Runtime only: a few seconds each)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("clf")
    w = np.random.default_rng(0).normal(0, 1, (16, 10)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["image", "w"], ["logits"]),
                               helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)], "clf",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "clf.onnx")
    x = np.random.default_rng(1).normal(0, 1, (400, 16)).astype(np.float32)
    y = (x @ w).argmax(1)
    np.savez(d / "valid.npz", image=x, y=y)
    return d


def _build(clf, tmp_path, *args):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["build", str(clf / "clf.onnx"), "-t", "x86-cpu", "-o", str(out), "--no-html",
                                    "--quantize", "fp32", "--no-speed-gate", *map(str, args)])
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    return res.exit_code, res.output, out


def _refused(clf, tmp_path, *args) -> str:
    code, text, out = _build(clf, tmp_path, *args)
    assert code == 2, text
    assert not out.exists() or not any(out.iterdir())  # a refused build writes nothing
    return text


def test_nan_and_infinite_values_are_refused_with_the_count(clf, tmp_path):
    x = np.random.default_rng(2).normal(0, 1, (50, 16)).astype(np.float32)
    x[3, 0], x[7] = np.nan, np.inf
    np.savez(tmp_path / "nan.npz", image=x)
    text = _refused(clf, tmp_path, "--validation", tmp_path / "nan.npz")
    assert "nan.npz: 2 of 50 samples of input 'image' hold NaN or infinite values" in text, text
    np.savez(tmp_path / "allnan.npz", image=np.full((50, 16), np.nan, np.float32))
    assert "50 of 50 samples" in _refused(clf, tmp_path, "--validation", clf / "valid.npz",
                                          "--calibration", tmp_path / "allnan.npz")


def test_labels_outside_the_models_classes_are_refused(clf, tmp_path):
    with np.load(clf / "valid.npz") as z:
        np.savez(tmp_path / "v.npz", image=z["image"], y=z["y"] + 20)
    text = _refused(clf, tmp_path, "--validation", tmp_path / "v.npz")
    assert "labels run from 20 to 29, but the model's output 'probs' has 10 classes (0-9)" in text, text


def test_labels_file_must_name_every_class(clf, tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    text = _refused(clf, tmp_path, "--validation", clf / "valid.npz", "--labels", tmp_path / "labels.txt")
    assert "--labels labels.txt has 3 names for the 10 classes of output 'probs'" in text, text


def test_npz_arrays_must_name_the_inputs(clf, tmp_path):
    with np.load(clf / "valid.npz") as z:
        np.savez(tmp_path / "p.npz", pixels=z["image"])
    text = _refused(clf, tmp_path, "--validation", tmp_path / "p.npz")
    assert "p.npz has arrays ['pixels'] but the model's inputs are ['image']" in text, text


def test_truncated_and_foreign_npz_files_are_named(clf, tmp_path):
    data = (clf / "valid.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert "cut.npz is not" in _refused(clf, tmp_path, "--validation", tmp_path / "cut.npz")
    (tmp_path / "notes.npz").write_text("these are my notes\n")
    text = _refused(clf, tmp_path, "--validation", tmp_path / "notes.npz")
    assert "notes.npz is not a .npz archive (a ZIP of .npy arrays); it starts with b'these are my not'" in text, text
    assert "pickled" not in text


def test_a_small_validation_set_says_what_one_sample_is_worth(clf, tmp_path):
    with np.load(clf / "valid.npz") as z:
        np.savez(tmp_path / "ten.npz", image=z["image"][:10], y=z["y"][:10])
    code, text, out = _build(clf, tmp_path, "--validation", tmp_path / "ten.npz")
    assert code == 0, text
    assert "validation on 10 labelled samples: one sample is worth 10.0 points of accuracy" in text, text
    code, text, _ = _build(clf, tmp_path, "--validation", tmp_path / "ten.npz", "--max-accuracy-drop", "0",
                           "--overwrite")
    assert code == 0 and "one sample is worth" not in text, text  # a zero-point gate: nothing to divide by


def test_labels_that_are_no_class_indices_are_refused(clf, tmp_path):
    with np.load(clf / "valid.npz") as z:
        np.savez(tmp_path / "s.npz", image=z["image"], y=np.asarray(["cat"] * len(z["y"])))
    assert "labels 'y' are <U3 values; they must be class indices" in _refused(clf, tmp_path, "--validation",
                                                                                  tmp_path / "s.npz")


def test_a_bundle_of_the_same_version_is_not_overwritten_without_a_word(clf, tmp_path):
    code, text, out = _build(clf, tmp_path, "--validation", clf / "valid.npz", "--name", "clf")
    assert code == 0, text
    bundle = out / "clf-1.0.0-x86-cpu.edgepack"
    before = bundle.read_bytes()
    code, text, _ = _build(clf, tmp_path, "--validation", clf / "valid.npz", "--name", "clf")
    assert code == 2 and f"{out} already holds clf-1.0.0-x86-cpu.edgepack" in text and "--overwrite" in text, text
    assert bundle.read_bytes() == before
    code, text, _ = _build(clf, tmp_path, "--validation", clf / "valid.npz", "--name", "clf", "--overwrite")
    assert code == 0, text
