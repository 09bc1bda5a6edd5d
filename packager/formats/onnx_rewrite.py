"""ONNX graph rewrites for the ONNX -> TFLite bridge only (packager/formats/onnx_tflite.py): ops that
onnx2tf/TFLite would otherwise reach as TensorFlow ops the TFLite runtime lacks. They run on a copy of
the graph handed to onnx2tf; validation stays against the user's ONNX model in ONNX Runtime.

- The exact GELU every BERT uses, x * 0.5 * (1 + erf(x / sqrt 2)), reaches TFLite as `tf.Erf` (a Flex
  op). Fused into one ONNX `Gelu` node (opset 20; the graph is upgraded first), onnx2tf writes
  tf.nn.gelu, which the TFLite converter lowers to its GELU builtin.
- ReduceL2 (sentence-transformers' Normalize) becomes Sqrt(ReduceSum(x * x)) with the same axes and
  keepdims, in the form the graph's opset wants (axes as an input from opset 13 for ReduceSum)."""
from __future__ import annotations

import numpy as np

GELU_OPSET = 20
_SQRT2 = float(np.sqrt(2.0))


def for_tflite(model) -> tuple[object, dict]:
    """(the rewritten model, what was rewritten: {"gelu_fused": n, "reduce_l2_expanded": n, ...})."""
    done: dict = {}
    if _gelu_matches(model):
        upgraded, why = _upgrade(model, GELU_OPSET)
        if upgraded is None:
            done["gelu_not_fused"] = why
        else:
            model = upgraded
            done["gelu_fused"] = fuse_exact_gelu(model)
            done["opset"] = f"upgraded to {GELU_OPSET} for the Gelu op"
    n = expand_reduce_l2(model)
    if n:
        done["reduce_l2_expanded"] = n
    return model, done


def opset_of(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


HELD = 4096  # float initializers of this many elements or more, read as weights only, are held aside
# The inputs that hold weights whose values no shape inference reads (onnxslim's symbolic inference
# computes on the values of Add, Mul, Concat... initializers: those stay).
_WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
_AWAY = "edgepack-held-aside"


def weightless(infer, model):
    """`infer(model)`, a pass over the graph that copies the model (shape inference, the opset
    converter), run on a copy whose big weights are held aside as external data it never reads;
    what `infer` returns gets them back. MPNet's 440 MB made each of onnxslim's shape inferences
    14 s, most of it copying the weights. Only float initializers that every user reads as a weight
    (MatMul's B, Gather's table...) are held, and none in a graph with subgraphs. The caller's
    model is never touched: protobuf keeps a cleared field's bytes until the whole message goes, so
    clearing and setting its weights again would double what it holds."""
    from onnx import AttributeProto, TensorProto

    g = model.graph
    uses: dict[str, set] = {}
    for n in g.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in n.attribute):
            return infer(model)  # a subgraph may read an outer initializer by name
        for i, name in enumerate(n.input):
            uses.setdefault(name, set()).add(_WEIGHT_INPUTS.get(n.op_type) == i)
    held = {t.name: t for t in g.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and t.raw_data and np.prod(t.dims) >= HELD
            and uses.get(t.name) == {True}}
    if not held:
        return infer(model)
    out = infer(without(model, held))
    if out is not None:
        for t in out.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL and any(e.value == _AWAY for e in t.external_data):
                if t.name not in held:
                    raise ValueError(f"a pass renamed the held-aside weight {t.name!r}")
                del t.external_data[:]
                t.ClearField("data_location")
                t.raw_data = held[t.name].raw_data
    return out


def without(model, held: dict, *, marked: bool = True):
    """A copy of `model` whose initializers named in `held` carry no bytes, only an external-data
    marker (`marked`; else nothing) (built field by field: a whole copy would copy the weights)."""
    from onnx import TensorProto

    lite = type(model)()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set(lite, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set(lite.graph, field, value)
    for t in model.graph.initializer:
        new = lite.graph.initializer.add()
        if t.name not in held:
            new.CopyFrom(t)
            continue
        for field, value in t.ListFields():
            if field.name != "raw_data":
                _set(new, field, value)
        if marked:
            new.data_location = TensorProto.EXTERNAL
            new.external_data.add(key="location", value=_AWAY)
    return lite


def _set(msg, field, value) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(msg, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def _upgrade(model, version: int):
    """(the model at `version`, None) or (None, why): onnx's converter lacks adapters for some ops."""
    from onnx import version_converter

    if opset_of(model) >= version:
        return model, None
    try:
        return weightless(lambda m: version_converter.convert_version(m, version), model), None
    except Exception as e:  # onnx raises plain errors for ops it cannot adapt
        return None, f"the graph could not be upgraded to opset {version}: {str(e).splitlines()[0][:200]}"


class _Graph:
    """Constants, producers and consumers of one graph, for pattern matching."""

    def __init__(self, model):
        g = model.graph
        self.consts = {t.name: t for t in g.initializer}  # TensorProtos: read only when one is a scalar
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = n.attribute[0].t
        self.producer = {o: n for n in g.node for o in n.output}
        self.users: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def scalar(self, name: str) -> float | None:
        from onnx import numpy_helper

        c = self.consts.get(name)
        return float(numpy_helper.to_array(c).reshape(())) if c is not None and np.prod(c.dims) == 1 else None

    def only_user(self, name: str, op: str):
        """The single consumer of `name` when it is an `op` (and `name` is no graph output)."""
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in self.outputs else None

    def other(self, node, name: str) -> str | None:
        """The input of binary `node` that is not `name`."""
        ins = list(node.input)
        return ins[1 - ins.index(name)] if len(ins) == 2 and name in ins else None


def _near(v: float | None, want: float, tol: float = 1e-3) -> bool:
    return v is not None and abs(v - want) <= tol * max(1.0, abs(want))


def _gelu_at(g: _Graph, erf) -> tuple[str, str, list] | None:
    """(x, the GELU's output, the nodes it replaces) for the exact GELU around `erf`, else None."""
    scale = g.producer.get(erf.input[0])
    if scale is None or g.only_user(scale.output[0], "Erf") is None:
        return None
    if scale.op_type == "Div" and _near(g.scalar(scale.input[1]), _SQRT2):
        x = scale.input[0]
    elif scale.op_type == "Mul":
        x = next((i for i in scale.input if _near(g.scalar(g.other(scale, i)), 1 / _SQRT2)), None)
    else:
        return None
    add = g.only_user(erf.output[0], "Add")
    if x is None or add is None or not _near(g.scalar(g.other(add, erf.output[0])), 1.0):
        return None
    mul = g.only_user(add.output[0], "Mul")
    if mul is None:
        return None
    partner = g.other(mul, add.output[0])
    if partner == x:  # (x * (1 + erf)) * 0.5
        half = g.only_user(mul.output[0], "Mul")
        if half is None or not _near(g.scalar(g.other(half, mul.output[0])), 0.5):
            return None
        return x, half.output[0], [scale, erf, add, mul, half]
    pre = g.producer.get(partner)  # (x * 0.5) * (1 + erf)
    if (pre is not None and pre.op_type == "Mul" and x in pre.input and g.only_user(partner, "Mul") is mul
            and _near(g.scalar(g.other(pre, x)), 0.5)):
        return x, mul.output[0], [scale, erf, add, pre, mul]
    return None


def _gelu_matches(model) -> list[tuple[str, str, list]]:
    g = _Graph(model)
    found = (_gelu_at(g, n) for n in model.graph.node if n.op_type == "Erf")
    return [m for m in found if m is not None]


def fuse_exact_gelu(model) -> int:
    """Replace each exact GELU by one ONNX Gelu node (the model's opset must be 20+); returns how many."""
    from onnx import helper

    matches = _gelu_matches(model)
    if not matches:
        return 0
    replaced = {id(n): m for m in matches for n in m[2]}
    last = {id(m[2][-1]): m for m in matches}
    nodes = []
    for n in model.graph.node:
        if id(n) in last:
            x, y, group = last[id(n)]
            nodes.append(helper.make_node("Gelu", [x], [y], name=f"{group[1].name or y}_gelu"))
        elif id(n) not in replaced:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(matches)


def expand_reduce_l2(model) -> int:
    """ReduceL2(x) -> Sqrt(ReduceSum(x * x)), same axes and keepdims; returns how many."""
    from onnx import helper, numpy_helper

    opset, graph, nodes, count = opset_of(model), model.graph, [], 0
    for n in graph.node:
        if n.op_type != "ReduceL2" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        tag = f"edgepack_l2_{count}"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.pop("axes", None)
        inputs = [f"{tag}_sq"] + list(n.input[1:2])
        if opset >= 13 and axes is not None:  # ReduceSum takes its axes as an input from opset 13
            graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{tag}_axes"))
            inputs = [f"{tag}_sq", f"{tag}_axes"]
        elif axes is not None:
            attrs["axes"] = axes
        nodes += [helper.make_node("Mul", [n.input[0], n.input[0]], [f"{tag}_sq"], name=f"{tag}_mul"),
                  helper.make_node("ReduceSum", inputs, [f"{tag}_sum"], name=f"{tag}_sum", **attrs),
                  helper.make_node("Sqrt", [f"{tag}_sum"], list(n.output), name=f"{tag}_sqrt")]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count
