"""Keras 3 transformers (issue 16): MultiHeadAttention, LayerNormalization, exact and approximate
GELU build for every target. tf2onnx writes the exact GELU's `Erfc`, which is no ONNX op, as
1 - Erf; any other op it leaves is refused by name; Coral refuses token-id inputs up front."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from edgebundle.errors import UnsupportedOpError
from edgepack.cli import exit_code
from packager.formats import onnx_graph

TARGETS = ("arm-cpu", "rpi5", "x86-cpu", "jetson-gpu")


def _graph(op: str, *, opset: int = 17, elem: int = 1):
    """x through one `op` node, then through another: two rewrites in one graph. elem: an ONNX
    TensorProto element type (1: float32)."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node(op, ["x"], ["h"]), helper.make_node(op, ["h"], ["y"], name=f"{op}_2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [5])],
                              [helper.make_tensor_value_info("y", elem, [5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=onnx.IR_VERSION)


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_erfc_is_rewritten_as_one_minus_erf_and_runs_in_onnx_runtime():
    import onnx
    from onnx import TensorProto
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph

    model = _graph("Erfc")
    assert onnx_graph.unknown_ops(model) == ["Erfc"]
    with pytest.raises((InvalidGraph, Fail)):
        _session(model)
    assert onnx_graph.rewrite_erfc(model) == 2
    onnx.checker.check_model(model, full_check=True)
    assert onnx_graph.unknown_ops(model) == [] and "Erfc" not in {n.op_type for n in model.graph.node}
    assert Counter(n.op_type for n in model.graph.node) == {"Erf": 2, "Sub": 2}
    x = np.array([-3.0, -0.7, 0.0, 0.4, 2.5], np.float32)
    [y] = _session(model).run(["y"], {"x": x})
    np.testing.assert_allclose(y, [math.erfc(math.erfc(v)) for v in x], atol=1e-6)
    # the constant 1 takes the input's type (ORT's CPU Erf is float32 only, so checked, not run)
    double = _graph("Erfc", elem=TensorProto.DOUBLE)
    onnx_graph.rewrite_erfc(double)
    onnx.checker.check_model(double, full_check=True)
    assert {t.data_type for t in double.graph.initializer} == {TensorProto.DOUBLE}
    assert onnx_graph.rewrite_erfc(model) == 0  # nothing left to rewrite


def test_an_op_onnx_does_not_define_is_refused_by_name_with_exit_3():
    model = _graph("Lgamma")
    with pytest.raises(UnsupportedOpError) as err:
        onnx_graph.refuse_unknown_ops(model)
    assert "Lgamma" in str(err.value) and "opset 17" in str(err.value) and exit_code(err.value) == 3
    # checked at the model's opset: Gelu is an ONNX op from opset 20 on
    assert onnx_graph.unknown_ops(_graph("Gelu", opset=17)) == ["Gelu"]
    assert onnx_graph.unknown_ops(_graph("Gelu", opset=20)) == []
    onnx_graph.refuse_unknown_ops(_graph("Erf"))  # ONNX ops pass


def test_coral_refuses_integer_token_ids_up_front():
    from packager.registry import backend_for
    from packager.sources import InputSpec
    from targets import load_profile

    coral = load_profile("coral")
    for dtype in ("int32", "int64"):
        src = type("Src", (), {"inputs": [InputSpec("tokens", (1, 24), dtype, shape=(1, 24))], "text": None})()
        [f] = backend_for(coral).lint_source(src, coral)
        assert f.level.value == "error" and "'tokens'" in f.message and dtype in f.message
        assert "token ids above 255 cannot be 8-bit" in f.message
    half = type("Src", (), {"inputs": [InputSpec("x", (1, 4), "float16", shape=(1, 4))], "text": None})()
    assert [f.level.value for f in backend_for(coral).lint_source(half, coral)] == ["warning"]
