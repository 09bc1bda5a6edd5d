"""The TFLite steps that can abort the process, run in a child (`python -m packager.formats.tflite_worker
REQUEST`): calibration, the int8 and int16x8 quantizers, and a first load and run of every converted
model in the interpreter (a model whose kernels abort in `allocate_tensors`, as full int8 BERTs do
under BUILTIN_WITHOUT_DEFAULT_DELEGATES, would otherwise take the whole build down with it). `run`, the
parent's side (called by packager/formats/tflite.py), turns a child killed by a signal into a ConversionError:
one failed candidate.

The request (JSON) names the step, its files and a samples file (.npz); the result is written to
`out` (a model) and `result` (JSON: ok, or the error's text for the parent to classify).

EDGEPACK_TEST_WORKER_FAULT=<step> makes the worker abort at that step: for the tests alone, which
need a child that really dies of SIGABRT.

The steps that import TensorFlow (calibration and the quantizers: 5-10 s of import each) run in one
child that stays up between steps (served.py), so a build's second TensorFlow step, and the next
build's in the same process, skips the import. Each step still writes its own log; a step that kills
the child fails that candidate only, and the next step starts a new child. A probe (LiteRT alone, its
import cheap) keeps a child of its own: it is the step that aborts on a bad model. So does `convert`
(fp32, fp16 or dynamic range of a big SavedModel, tflite_converter.py): its child exits when it is
done, and the converter's memory goes with it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError
from packager.formats import served

TIMEOUT_S = 1800
FAULT_ENV = "EDGEPACK_TEST_WORKER_FAULT"
SERVED = frozenset({"calibrate", "int8", "int16x8"})  # TensorFlow steps that share one child (not `convert`)
MODULE = "packager.formats.tflite_worker"


def run(step: str, work: Path, *, samples: list[dict], what: str, **req) -> Path:
    """Run `step` in a child; the model file it wrote (none for a probe). Raises ConversionError when the child failed
    (its error text as `text`), crashed or ran out of time."""
    served.trim(collect=False)  # glibc's freed heap back first: the child comes on top of it
    work = work.resolve()  # the child runs in `work`: every path it is given is absolute
    req = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in req.items()}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / f"{step}-samples.npz", **{f"{i}:{k}": np.asarray(v) for i, s in enumerate(samples)
                                              for k, v in s.items()})
    req = dict(req, step=step, samples=str(work / f"{step}-samples.npz"), out=str(work / f"{step}.tflite"),
               result=str(work / f"{step}.json"))
    for stale in (req["result"], req["out"]):  # an earlier step of this name in this folder must not answer
        Path(stale).unlink(missing_ok=True)
    (work / f"{step}-request.json").write_text(json.dumps(req))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    code = served.ask(MODULE, work / f"{step}-request.json", env, timeout_s=TIMEOUT_S) if step in SERVED else None
    if code is None:  # a probe, or the served child is busy with another thread's step
        cmd = [sys.executable, "-m", MODULE, str(work / f"{step}-request.json")]
        with open(work / f"{step}.log", "wb") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                      timeout=TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
    if code == "timeout":
        raise ConversionError(f"the TFLite {_tool(step)} did not finish {what} within {TIMEOUT_S} s",
                              hint="try another --quantize mode (dynamic, fp16 or fp32)")
    if code < 0:
        sig = signal.Signals(-code).name
        raise ConversionError(f"the TFLite {_tool(step)} crashed ({sig}) on {what}",
                              hint="try another --quantize mode (dynamic, fp16 or fp32), or an ONNX target")
    res = json.loads(Path(req["result"]).read_text()) if Path(req["result"]).is_file() else {}
    if not res.get("ok"):
        err = ConversionError(f"the TFLite {_tool(step)} failed on {what}: "
                              f"{(res.get('message') or _tail(work / f'{step}.log')).splitlines()[-1][:300]}")
        err.text = res.get("message") or _tail(work / f"{step}.log")
        raise err
    return Path(req["out"])


def _tool(step: str) -> str:
    return "interpreter" if step == "probe" else "converter"


def _tail(log: Path) -> str:
    if not log.is_file():
        return "no output"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-20:]) or "no output"


# ---- in the child ----

def _samples(path: str) -> list[dict]:
    rows: dict[int, dict] = {}
    with np.load(path) as z:
        for key in z.files:
            i, name = key.split(":", 1)
            rows.setdefault(int(i), {})[name] = z[key]
    return [rows[i] for i in sorted(rows)]


def _converter(req: dict, samples: list[dict]):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(req["saved_model"])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: (dict(s) for s in samples)
    return conv


def convert(req: dict, samples: list[dict]) -> bytes:
    """fp32, fp16 or dynamic range, for a SavedModel big enough that its converter's memory must go
    when the conversion is done (tflite_converter.py): never served, so the child exits after it."""
    from packager.formats import tflite_converter

    return tflite_converter.converter(req["saved_model"], req["mode"], allow_flex=req["allow_flex"],
                                      lean_import=req["lean_import"]).convert()


def calibrate(req: dict, samples: list[dict]) -> bytes:
    """The float model with calibration statistics (what QuantizationDebugger starts from too)."""
    import tensorflow as tf

    conv = _converter(req, samples)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.target_spec.supported_ops = ops + ([tf.lite.OpsSet.SELECT_TF_OPS] if req["allow_flex"] else [])
    conv._experimental_calibrate_only = True
    return conv.convert()


def int8(req: dict, samples: list[dict]) -> bytes:
    """Quantized from the calibrated model by the MLIR quantizer, `keep` nodes left in float."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import deduplicate_readonly_buffers, mlir_quantize

    io = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[req["io"]]
    data = mlir_quantize(Path(req["calibrated"]).read_bytes(), input_data_type=io, output_data_type=io,
                         denylisted_nodes=req["keep"] or None)
    return deduplicate_readonly_buffers(data)


def int16x8(req: dict, samples: list[dict]) -> bytes:
    import tensorflow as tf

    conv = _converter(req, samples)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return conv.convert()


def probe(req: dict, samples: list[dict]) -> None:
    """Load and run the model once, as the device does (`device`: the default delegates) or as the
    sensitivity analysis does (`analysis`: every tensor kept, no delegate). What the interpreter
    raises is not this step's business (the build's validation reports it); only an abort is."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {} if req["mode"] == "device" else {
        "experimental_preserve_all_tensors": True,
        "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    try:
        interp = Interpreter(model_path=req["model"], **kwargs)
        interp.allocate_tensors()
        sig = next(iter((interp._get_full_signature_list() or {}).values()), {"inputs": {}})
        feeds = {sig["inputs"][k]: v for k, v in (samples[0] if samples else {}).items() if k in sig["inputs"]}
        for d in interp.get_input_details():
            x = feeds.get(d["index"])
            ok = x is not None and x.dtype == d["dtype"] and x.size == np.prod(d["shape"])
            interp.set_tensor(d["index"], x.reshape(d["shape"]) if ok else np.zeros(d["shape"], d["dtype"]))
        interp.invoke()
    except (RuntimeError, ValueError) as e:
        print(f"the interpreter raised (reported by the build's validation): {e}")


STEPS = {"convert": convert, "calibrate": calibrate, "int8": int8, "int16x8": int16x8, "probe": probe}


def handle(path: Path) -> None:
    """One request: the step's model and result files written (an error is a result, not a raise)."""
    req = json.loads(path.read_text())
    if os.environ.get(FAULT_ENV) == req["step"]:
        os.abort()  # test-only: a child that really dies of SIGABRT
    try:
        with warnings.catch_warnings():  # the converter's calibrator uses the deprecated tf.lite.Interpreter
            warnings.filterwarnings("ignore", message=r"[\s\S]*tf.lite.Interpreter is deprecated")
            data = STEPS[req["step"]](req, _samples(req["samples"]))
        if data is not None:
            Path(req["out"]).write_bytes(data)
        res = {"ok": True}
    except Exception as e:  # ConverterError, MLIR/RuntimeErrors, ValueErrors: the parent classifies the text
        res = {"ok": False, "message": str(e) or type(e).__name__}
    Path(req["result"]).write_text(json.dumps(res))


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return served.loop(handle, lambda request: request.parent / f"{json.loads(request.read_text())['step']}.log")
    handle(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
