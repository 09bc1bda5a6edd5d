"""ONNX -> TFLite: onnx2tf turns the ONNX graph into a SavedModel, and the TFLite backend takes it
from there (fp32, fp16, dynamic, int8 with its one calibration pass, int16x8), exactly as for a
TensorFlow source. Validation stays against the ONNX model in ONNX Runtime (the source's reference).

The bundle keeps the ONNX model's interface: input and output names, shapes and layout (an NCHW
image input stays NCHW; the transposes to TFLite's NHWC live inside the model), so the app feeds
the device what it fed ONNX Runtime. The manifest's quantization section records the conversion.

onnx2tf pins an older TensorFlow and NumPy than edgepack's; it is installed without its
dependencies (`make install` does this) and runs in its own process (packager/formats/onnx2tf_worker.py),
since importing it changes process-wide settings."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError, InputError, UnsupportedOpError
from packager.formats import onnx_rewrite, served
from packager.registry import Bridge, ConvertContext, register_bridge
from targets import Format

TIMEOUT_S = 1800
WORKER = "packager.formats.onnx2tf_worker"
# What onnx2tf needs beyond edgepack's own packages (setup.cfg's onnx-tflite extra, plus
# requirements-onnx2tf.txt installed with --no-deps).
MODULES = ("onnx2tf", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "onnxslim")
# A SavedModel signature's input names (TensorFlow op names).
_TF_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
INSTALL = "make install (or: pip install -e '.[onnx-tflite]' && pip install --no-deps -r requirements-onnx2tf.txt)"


def _missing() -> list[str]:
    return [m for m in MODULES if importlib.util.find_spec(m) is None]


def converter_ops() -> frozenset[str]:
    """The ONNX op types onnx2tf has a converter for (one module per op in onnx2tf/ops)."""
    spec = importlib.util.find_spec("onnx2tf")  # finds the package without importing it
    ops = Path(next(iter(spec.submodule_search_locations))) / "ops"
    return frozenset(p.stem for p in ops.glob("*.py") if not p.stem.startswith("_"))


def graph_ops(model) -> dict[str, str]:
    """op type -> domain of every node, subgraphs (If, Loop, Scan bodies) included."""
    from onnx import AttributeProto

    out: dict[str, str] = {}
    todo = [model.graph]
    while todo:
        g = todo.pop()
        for n in g.node:
            out.setdefault(n.op_type, n.domain or "ai.onnx")
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    todo.append(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    todo.extend(a.graphs)
    return out


def unsupported_ops(model) -> list[str]:
    known = converter_ops()
    return sorted(f"{op}" if dom == "ai.onnx" else f"{dom}.{op}" for op, dom in graph_ops(model).items()
                  if op not in known or dom not in ("ai.onnx", ""))


@register_bridge
class OnnxToTFLite(Bridge):
    kind = "onnx"
    format = Format.TFLITE

    def check(self) -> None:
        missing = _missing()
        if missing:
            raise InputError(f"ONNX -> TFLite needs onnx2tf and its helpers, and {', '.join(missing)} "
                             "is not installed", hint=f"install them: {INSTALL}")

    def saved_model(self, ctx: ConvertContext) -> Path:
        key, cache = _key(ctx), ctx.cache.bridged
        if key not in cache:
            try:
                cache[key] = self._stored(ctx, ctx.cache.path(f"onnx2tf-{len(cache)}"))
            except ConversionError as e:
                cache[key] = e
        if isinstance(cache[key], ConversionError):
            raise cache[key]
        return cache[key][0]

    def details(self, ctx: ConvertContext) -> dict:
        done = ctx.cache.bridged.get(_key(ctx))
        info = done[1] if isinstance(done, tuple) else {}
        shapes = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in ctx.source.inputs)
        return {"converted_from": "onnx", "converter": f"onnx2tf {info.get('onnx2tf', '?')}",
                "io_layout": f"as the ONNX model ({shapes}); onnx2tf's NHWC transposes are inside the model",
                "outputs_transposed_back": info.get("transposed_outputs", []),
                "graph_rewrites": info.get("rewrites", {}),
                # onnx2tf converts first without its strict mode; with it only when those outputs disagreed
                "onnx2tf_strict_mode": bool(info.get("strict_mode"))}

    def _stored(self, ctx: ConvertContext, work: Path) -> tuple[Path, dict]:
        """The SavedModel from the build cache across builds (packager/store.py), else converted and
        kept there: onnx2tf is most of an ONNX model's TFLite conversion (a minute for MiniLM)."""
        store = ctx.cache.store
        if store is None:
            return self._convert(ctx, work)
        from packager.store import digest_samples

        key = store.key({"what": "onnx2tf", "weights": "variables", "model": ctx.cache.keyed.get("model") or ctx.source.sha256,
                         "inputs": [(s.name, list(s.shape), s.dtype) for s in ctx.source.inputs],
                         "sample": digest_samples([ctx.sample] if ctx.sample else None)})
        hit = store.get(key, work)
        if hit is not None:
            return hit.path, hit.info
        out, info = self._convert(ctx, work)
        store.put(key, out, info)
        return out, info

    def _convert(self, ctx: ConvertContext, work: Path) -> tuple[Path, dict]:
        self.check()
        src = ctx.source
        names = [s.name for s in src.inputs if not _TF_NAME.match(s.name)]
        if names:
            raise InputError(f"input name(s) {names} of {src.path.name} cannot be TFLite signature names",
                             hint="rename the inputs (letters, digits and _ . / - only; e.g. input_names=[...] "
                                  "in torch.onnx.export), or pick an ONNX target")
        work.mkdir(parents=True, exist_ok=True)
        bridged, rewrites = _bridge_onnx(ctx, work)
        sample = ctx.sample or {s.name: np.zeros(s.shape, s.dtype) for s in src.inputs}
        np.savez(work / "sample.npz", **{s.name: np.asarray(sample[s.name]).reshape(s.shape) for s in src.inputs})
        # absolute: the worker runs in another directory, and a MODEL given as a relative path must still resolve
        req = {"onnx": str(bridged.resolve()), "out": str(work / "saved_model"),
               "sample": str(work / "sample.npz"), "result": str(work / "result.json"),
               "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in src.inputs]}
        (work / "request.json").write_text(json.dumps(req))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        served.trim(collect=False)  # glibc's freed heap back first: the child comes on top of it
        code = served.ask(WORKER, work / "request.json", env, timeout_s=TIMEOUT_S)
        if code is None:  # the served child is busy with another thread's conversion
            with open(work / "onnx2tf.log", "wb") as log:
                try:
                    code = subprocess.run([sys.executable, "-m", WORKER, str(work / "request.json")], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=work, timeout=TIMEOUT_S).returncode
                except subprocess.TimeoutExpired:
                    code = "timeout"
        if code == "timeout":
            raise ConversionError(f"onnx2tf did not convert {src.path.name} within {TIMEOUT_S} s",
                                  hint="pick an ONNX target, or convert a smaller input shape")
        res_path = work / "result.json"
        if code != 0 or not res_path.is_file():
            raise ConversionError(f"the onnx2tf process ended with code {code} converting "
                                  f"{src.path.name}: {_last_error(work / 'onnx2tf.log')}",
                                  hint="it may have run out of memory")
        res = json.loads(res_path.read_text())
        if not res["ok"]:
            res["message"] = res["message"] or _last_error(work / "onnx2tf.log")
            raise _error(res, src.path.name)
        return Path(req["out"]), dict(res, rewrites=rewrites)


def _bridge_onnx(ctx: ConvertContext, work: Path) -> tuple[Path, dict]:
    """The graph onnx2tf converts, written once per source: every length bucket converts the same graph
    (its rewrite and write cost MPNet ~5 s a length)."""
    import onnx

    src = ctx.source
    if src.sha256 not in ctx.cache.bridge_onnx:
        model, rewrites = onnx_rewrite.for_tflite(src.model)  # a fresh read: rewritten in place
        bad = unsupported_ops(model)
        if bad:
            err = UnsupportedOpError(
                f"{src.path.name} uses ONNX ops that onnx2tf cannot convert to TFLite: {', '.join(bad)}",
                hint="pick an ONNX target (x86-cpu, jetson-gpu), or re-export the model without those ops "
                     "(e.g. a lower/higher opset, or the post-processing outside the model)")
            err.ops = bad
            raise err
        bridged = work / "bridge.onnx"  # what onnx2tf converts; ONNX Runtime validates against the source
        onnx.save(model, str(bridged))
        ctx.cache.bridge_onnx[src.sha256] = (bridged.resolve(), rewrites)
    return ctx.cache.bridge_onnx[src.sha256]


def _key(ctx: ConvertContext) -> tuple:
    return ("onnx2tf", ctx.source.sha256, tuple((s.name, s.shape) for s in ctx.source.inputs))


def _last_error(log: Path) -> str:
    """onnx2tf's last ERROR line (it logs, then exits), else the log's last line."""
    lines = [_ANSI.sub("", ln).strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln and "trace log" not in ln]
    return ((errors or lines or ["no output"])[-1])[:300]


def _error(res: dict, model: str) -> ConversionError:
    if res["kind"] == "op":
        where = f"node {res['node']!r} ({res['op']})" if res.get("op") else "the graph"
        err = UnsupportedOpError(f"onnx2tf cannot convert {where} of {model} to TFLite: {res['message']}",
                                 hint="pick an ONNX target (x86-cpu, jetson-gpu), or re-export the model so "
                                      f"that {res.get('op') or 'this node'} takes another form (another opset, "
                                      "static shapes, the post-processing outside the model)")
        err.ops = [res["op"]] if res.get("op") else []
        return err
    if res["kind"] == "shape":
        return ConversionError(f"onnx2tf changed the interface of {model}: {res['message']}",
                               hint="pick an ONNX target (x86-cpu, jetson-gpu)")
    return ConversionError(f"ONNX -> TFLite conversion of {model} failed: {res['message']}",
                           hint="pick an ONNX target (x86-cpu, jetson-gpu)")
