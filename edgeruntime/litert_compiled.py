"""A TFLite model with several signatures (a text bundle's length buckets) run through LiteRT's
CompiledModel with XNNPACK's in-memory weight cache. The Interpreter's XNNPACK delegate packs every
weight once per signature; the cache packs it once for all of them (MPNet arm-cpu, three buckets:
485 MB resident after each bucket ran once, 196 MB this way; the same latency).

The price: CompiledModel's run holds the GIL (the Interpreter's invoke releases it), so while a
request runs the agent's other threads wait for it (an MPNet 384-token run: ~150 ms on 2 x86 cores).
Single-signature models, where there is nothing to share, keep the Interpreter."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edgebundle.errors import InputError, RuntimeUnavailableError
from edgeruntime.base import Runtime, TensorInfo

IN_MEMORY = ":memory:"  # XNNPACK's weight cache in a memfd: nothing written to disk
# TensorBuffer takes these dtypes; others of the same width go through as raw bytes of one of them
_CARRIER = {1: np.dtype(np.uint8), 2: np.dtype(np.float16), 4: np.dtype(np.int32)}
_env_lock = threading.Lock()
_env = None


def available() -> bool:
    try:
        from ai_edge_litert import compiled_model, cpu_options, environment, options  # noqa: F401
    except ImportError:  # tflite_runtime, or ai-edge-litert before 2.0
        return False
    return True


def _environment():
    """One LiteRT environment per process, told where no vendor plugins are, so it does not look."""
    global _env
    from ai_edge_litert.environment import Environment, EnvironmentOptions

    with _env_lock:
        if _env is None:
            _env = Environment.create(options=EnvironmentOptions(compiler_plugin_path="/nonexistent",
                                                                 dispatch_library_path="/nonexistent"))
        return _env


def _carrier(dtype: np.dtype) -> tuple[np.dtype, int] | None:
    """The dtype a tensor's bytes cross TensorBuffer as, and how many of them per element."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        return None
    if dtype in (np.float32, np.float16, np.int32, np.int8, np.uint8):
        return dtype, 1
    if dtype.itemsize == 8:
        return _CARRIER[4], 2
    return (_CARRIER[dtype.itemsize], 1) if dtype.itemsize in _CARRIER else None


@dataclass
class _Port:
    info: TensorInfo
    buffer: object
    carrier: np.dtype
    count: int  # carrier elements

    @classmethod
    def make(cls, info: TensorInfo, buffer) -> "_Port":
        carrier, per = _carrier(info.dtype)
        return cls(info, buffer, carrier, int(np.prod(info.shape)) * per)


@dataclass
class CompiledRuntime(Runtime):
    _model: object = None
    _path: str = ""
    _key: str = ""
    _index: int = 0
    _ins: tuple = ()  # _Port per input, in the signature's order
    _outs: tuple = ()
    _buffers: tuple = ()  # (input buffers, output buffers), as run_by_index takes them
    _infos: dict = None  # signature -> (inputs, outputs) as TensorInfos

    @classmethod
    def load(cls, path: str, infos: dict, key: str, *, threads: int, details: dict) -> "CompiledRuntime":
        """`infos`: each signature's TensorInfos (read by the caller from the model's metadata)."""
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        opts = Options(hardware_accelerators=HardwareAccelerator.CPU,
                       cpu_options=CpuOptions(num_threads=threads or 0, xnnpack_weight_cache_path=IN_MEMORY))
        try:
            model = CompiledModel.from_file(path, environment=_environment(), options=opts)
        except (RuntimeError, ValueError) as e:
            raise RuntimeUnavailableError(f"LiteRT could not compile {path}: {e}") from None
        details = dict(details, api="compiled-model", weights="XNNPACK weight cache: packed once for "
                                                               f"{len(infos)} signatures")
        runtime = cls._for(model, path, infos, key, details)
        port = runtime._ins[0]  # LiteRT sets up the environment it writes through (and logs it) on first use
        port.buffer.write(np.zeros(port.count, port.carrier))
        return runtime

    @classmethod
    def _for(cls, model, path: str, infos: dict, key: str, details: dict) -> "CompiledRuntime":
        index = model.get_signature_index(key)
        names = model.get_signature_list()[key]
        ins, outs = infos[key]
        by_name = {i.name: i for i in ins + outs}
        ports_in = tuple(_Port.make(by_name[n], b) for n, b in zip(names["inputs"], model.create_input_buffers(index)))
        ports_out = tuple(_Port.make(by_name[n], b) for n, b in zip(names["outputs"], model.create_output_buffers(index)))
        return cls(inputs=ins, outputs=outs, details=details, _model=model, _path=path, _key=key, _index=index,
                   _ins=ports_in, _outs=ports_out, _infos=infos,
                   _buffers=([p.buffer for p in ports_in], [p.buffer for p in ports_out]))

    def signature(self, key: str) -> "CompiledRuntime":
        if key not in self._infos:
            raise RuntimeUnavailableError(f"the model has no signature {key!r} (it has {sorted(self._infos)})")
        return self._for(self._model, self._path, self._infos, key, dict(self.details, signature=key))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for p in self._ins:
            x = np.asarray(feeds[p.info.name])
            if x.shape != p.info.shape or x.dtype != p.info.dtype:
                raise InputError(f"input {p.info.name!r} is {x.dtype} {list(x.shape)}; the model takes "
                                 f"{p.info.dtype} {list(p.info.shape)}")
            p.buffer.write(np.ascontiguousarray(x).reshape(-1).view(p.carrier))
        self._model.run_by_index(self._index, *self._buffers)
        return {p.info.name: p.buffer.read(p.count, p.carrier).view(p.info.dtype).reshape(p.info.shape)
                for p in self._outs}

    def ops(self) -> list[str]:
        return [d["op_name"] for d in metadata_interpreter(self._path)._get_ops_details()]

    def close(self) -> None:
        self._model = self._ins = self._outs = self._buffers = None


def metadata_interpreter(path: str):
    """An interpreter that only describes the model: no delegate, no tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    return Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def runnable(infos: dict) -> bool:
    """Fixed shapes and dtypes TensorBuffer carries: what this path runs (else the Interpreter's)."""
    return all(ins and outs for ins, outs in infos.values()) and all(
        all(d > 0 for d in t.shape) and _carrier(np.dtype(t.dtype)) is not None
        for ins, outs in infos.values() for t in ins + outs)
