"""onnx_rewrite.weightless: a pass over an ONNX graph (shape inference, the opset converter) runs with
the big weights held aside and gets them back, byte for byte, whatever the pass does."""
from __future__ import annotations

import numpy as np
import pytest


def _model():
    """x (32, 64) -> MatMul W (64 x 128) -> Add C (32 x 128); ids (32,) -> Gather T (100 x 64): W and T
    are weights (held), C is big too but an Add reads its values (kept), s is small (kept)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(64, 128)), "C": rng.normal(size=(32, 128)), "T": rng.normal(size=(100, 64)),
             "s": rng.normal(size=(128,))}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["y", "C"], ["z"]),
             helper.make_node("Mul", ["z", "s"], ["out"]), helper.make_node("Gather", ["T", "ids"], ["emb"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64]),
                     helper.make_tensor_value_info("ids", TensorProto.INT64, [32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _away(model) -> set[str]:
    from onnx import TensorProto

    return {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


def test_weights_held_aside_during_the_pass_and_given_back():
    from onnx import shape_inference

    from packager.formats.onnx_rewrite import weightless

    model = _model()
    before = model.SerializeToString()
    seen = []

    def infer(m):
        seen.append(_away(m))
        return shape_inference.infer_shapes(m)

    out = weightless(infer, model)
    assert seen == [{"W", "T"}], seen  # C: an Add reads its values; s: small
    assert model.SerializeToString() == before  # the caller's model as it was
    assert {t.name: t.raw_data for t in out.graph.initializer} == {t.name: t.raw_data for t in model.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert shapes["y"] == [32, 128] and shapes["z"] == [32, 128], shapes  # the pass saw every shape


def test_a_pass_that_fails_or_returns_nothing_leaves_the_model_whole():
    from packager.formats.onnx_rewrite import weightless

    model = _model()
    before = model.SerializeToString()

    def boom(m):
        assert _away(m) == {"W", "T"}
        raise RuntimeError("the pass failed")

    with pytest.raises(RuntimeError, match="the pass failed"):
        weightless(boom, model)
    assert model.SerializeToString() == before
    assert weightless(lambda m: None, model) is None and model.SerializeToString() == before
