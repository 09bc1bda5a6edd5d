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
child that stays up between steps (`--serve`), so a build's second TensorFlow step, and the next
build's in the same process, skips the import. Each step still writes its own log; a step that kills
the child fails that candidate only, and the next step starts a new child. The child leaves after
IDLE_S without a request, or when this process goes (its stdin closes). A probe (LiteRT alone, its
import cheap) keeps a child of its own: it is the step that aborts on a bad model."""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError

TIMEOUT_S = 1800
IDLE_S = 300
MAX_STEPS = 25  # steps per served child: what the converter keeps between steps is let go now and then
FAULT_ENV = "EDGEPACK_TEST_WORKER_FAULT"
SERVED = frozenset({"calibrate", "int8", "int16x8"})  # the steps that import TensorFlow
_VOLATILE = ("PYTEST_CURRENT_TEST", "TF_CPP_MIN_LOG_LEVEL")  # changes between calls; no new child for it


def run(step: str, work: Path, *, samples: list[dict], what: str, **req) -> Path:
    """Run `step` in a child; the model file it wrote (none for a probe). Raises ConversionError when the child failed
    (its error text as `text`), crashed or ran out of time."""
    work = work.resolve()  # the child runs in `work`: every path it is given is absolute
    req = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in req.items()}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / f"{step}-samples.npz", **{f"{i}:{k}": np.asarray(v) for i, s in enumerate(samples)
                                              for k, v in s.items()})
    req = dict(req, step=step, samples=str(work / f"{step}-samples.npz"), out=str(work / f"{step}.tflite"),
               result=str(work / f"{step}.json"))
    (work / f"{step}-request.json").write_text(json.dumps(req))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    code = _served(work / f"{step}-request.json", env) if step in SERVED else None
    if code is None:  # a probe, or the served child is busy with another thread's step
        cmd = [sys.executable, "-m", "packager.formats.tflite_worker", str(work / f"{step}-request.json")]
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


class _Server:
    """The child that keeps TensorFlow imported: one request at a time, a path in on its stdin, a line
    back on its stdout when the step is done."""

    def __init__(self, env: dict):
        self.key, self.steps = _env_key(env), 0
        self.proc = subprocess.Popen([sys.executable, "-m", "packager.formats.tflite_worker", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, cwd=Path.home() if Path.home().is_dir() else "/")

    def ask(self, request: Path):
        """0 when the step is done, the child's exit code when it died in the step, "timeout" when it ran
        out of time; None when it was not there to take the request (it had left, idle)."""
        try:
            self.proc.stdin.write(f"{request}\n".encode())
            self.proc.stdin.flush()
        except OSError:  # it had died (idle, or killed)
            return None
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
            if not ready:
                self.close(kill=True)
                return "timeout"
            if self.proc.stdout.readline():
                return 0
        except BaseException:  # interrupted between request and reply: a later reply would be this one's
            self.close(kill=True)
            raise
        code = self.proc.wait()
        return None if code == 0 else code  # 0: it was leaving (idle) as the request came, and never read it

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.proc.stdin.close()  # it leaves at end of input
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_server: _Server | None = None
_lock = threading.Lock()


def _env_key(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k not in _VOLATILE))


def _served(request: Path, env: dict):
    """Run a request in the served child (started, or restarted for a changed environment, as needed);
    None when another thread is using it."""
    global _server
    if not _lock.acquire(blocking=False):
        return None
    try:
        for _ in range(2):  # a child that left while idle is started again once
            if (_server is None or _server.key != _env_key(env) or _server.proc.poll() is not None
                    or _server.steps >= MAX_STEPS):
                if _server is not None:
                    _server.close()
                _server = _Server(env)
            code = _server.ask(request)
            _server.steps += 1
            if code is None:
                _server = None
                continue
            if code != 0:
                _server = None  # it died (or was killed): the next step starts a fresh one
            return code
        return None
    finally:
        _lock.release()


@atexit.register
def _close_server() -> None:
    if _server is not None:
        _server.close()


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


STEPS = {"calibrate": calibrate, "int8": int8, "int16x8": int16x8, "probe": probe}


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


def serve() -> int:
    """Requests from stdin until it closes or stays quiet for IDLE_S; each step's output (Python's and
    the native libraries', through fds 1 and 2) goes to that step's log beside its request."""
    reply = os.fdopen(os.dup(1), "w")
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], IDLE_S)
        line = sys.stdin.readline() if ready else ""
        if not line:
            return 0
        path = Path(line.strip())
        sys.stdout.flush()
        sys.stderr.flush()
        step = json.loads(path.read_text())["step"]
        with open(path.parent / f"{step}.log", "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        os.chdir(path.parent)
        handle(path)
        os.chdir("/")  # not holding the build's folder, which goes when the build ends
        sys.stdout.flush()
        sys.stderr.flush()
        reply.write("done\n")
        reply.flush()


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return serve()
    handle(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
