"""Fuzzing the v2 request path (JSON and the binary tensor extension) end to end in process:
decode -> a real ONNX Runtime model -> encode. Any request gets 200 with strict JSON or a 4xx with
a message; never a 500 (a 500 means an exception the parser let through)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, JSON, TRIED, report

pytestmark = pytest.mark.fuzz
DTYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A real model (ONNX Runtime: y = x * 2 + 1 on [1, 4] floats) behind the real ApiServer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from device_agent.model import load_bundle
    from device_agent.server import ApiServer
    from device_agent.stats import InferenceStats
    from edgebundle.archive import write_bundle
    from edgebundle.manifest import Manifest, TensorSpec

    d = tmp_path_factory.mktemp("fuzz-api")
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])], "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1.0), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
    m = Manifest(name="affine", version="1.0.0", target={"name": "x86-cpu"}, format="onnx", precision="fp32",
                 model_file="model.onnx", inputs=(TensorSpec("x", (1, 4), "float32"),),
                 outputs=(TensorSpec("y", (1, 4), "float32"),),
                 runtime={"name": "onnxruntime", "providers": ["CPUExecutionProvider"]})
    write_bundle(d / "affine.edgepack", m, {"model.onnx": d / "model.onnx"})
    model = load_bundle(d / "affine.edgepack", model_dir=d / "m", check_golden=False)
    server = ApiServer(lambda: model, stats=InferenceStats(), port=0)
    yield server, model
    server.httpd.server_close()
    model.close()


def _no_constants(name):
    raise AssertionError(f"bare {name} in a response")


def _check(api, body: bytes, header: str | None, name: str) -> None:
    from device_agent.server import HttpError

    server, model = api
    TRIED[name] += 1
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    try:
        res = server._infer(model.name, model, headers, body)
    except HttpError as e:
        assert 400 <= e.status < 500, (e.status, str(e))
        assert str(e)
        return
    status, payload, extra = res
    assert status == 200
    n = int(extra.get("Inference-Header-Content-Length", len(payload)))
    doc = json.loads(payload[:n], parse_constant=_no_constants)
    assert doc["outputs"] and doc["model_name"] == "affine"


numbers = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-300, 2 ** 65)
tensor = st.fixed_dictionaries(
    {"name": st.just("x") | JSON, "shape": st.just([1, 4]) | st.lists(st.integers(-2, 2 ** 40), max_size=5) | JSON,
     "datatype": st.sampled_from(DTYPES + ["FP99"]) | JSON},
    optional={"data": st.lists(numbers, max_size=8) | st.lists(st.lists(numbers, max_size=4), max_size=2) | JSON,
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-8, 40) | JSON})
              | JSON})
request = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, min_size=1, max_size=3) | JSON},
    optional={"outputs": st.lists(st.fixed_dictionaries(
        {"name": st.just("y") | JSON}, optional={"parameters": st.fixed_dictionaries(
            {}, optional={"binary_data": st.booleans() | JSON}) | JSON}), max_size=2) | JSON,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans() | JSON}) | JSON,
        "id": st.text(max_size=5) | JSON})


def test_fuzz_v2_raw_bytes(api):
    name = "v2 request: raw bytes"

    @FUZZ
    @given(body=st.binary(max_size=3000), header=st.none() | st.text(max_size=12))
    def run(body, header):
        _check(api, body, header, name)

    run()
    report(name)


def test_fuzz_v2_structured(api):
    name = "v2 request: JSON + binary extension"

    @FUZZ
    @given(req=request, blob=st.binary(max_size=64), binary=st.booleans(), data=st.data())
    def run(req, blob, binary, data):
        head = json.dumps(req).encode()
        if binary:
            header = data.draw(st.just(str(len(head))) | st.text(max_size=6) | st.integers(-5, 5000).map(str))
            _check(api, head + blob, header, name)
        else:
            _check(api, head, None, name)

    run()
    report(name)


def test_fuzz_v2_mutated_valid_request(api):
    name = "v2 request: mutated valid request"

    @FUZZ
    @given(flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6),
           binary=st.booleans())
    def run(flips, binary):
        _mutated(api, flips, binary, name)

    run()
    report(name)


def _mutated(api, flips, binary, name):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    if binary:
        head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 16}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
        body, header = bytearray(head + x.tobytes()), str(len(head))
    else:
        body, header = bytearray(json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                         "data": x.reshape(-1).tolist()}]}).encode()), None
    for pos, val in flips:
        body[pos % len(body)] = val
    _check(api, bytes(body), header, name)
