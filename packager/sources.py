"""Source models: detect the format, load once, expose inputs, a float reference and
the artifacts converters start from (a SavedModel directory, an ONNX graph read again when asked,
TFLite bytes)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from edgebundle.errors import CalibrationError, ConversionError, InputError
from edgebundle.manifest import TensorSpec
from edgeruntime.text import STANDARD_INPUTS, TextEncoder, TextSettings, text_settings
from packager.store import digest_path

Feeds = dict[str, np.ndarray]


class ReferenceFailed(InputError):
    """The float model itself fails on the given data (a bad value for an id, a shape the graph
    cannot take): the data, not the conversion, is what to fix."""

    def __init__(self, message: str):
        super().__init__(message, hint="check the validation/calibration data against what the model expects "
                                       "(values of integer inputs, shapes of dynamic dimensions)")


class SourceKind(str, Enum):
    SAVED_MODEL = "savedmodel"
    KERAS = "keras"
    ONNX = "onnx"
    TFLITE = "tflite"
    HF = "hf"  # a Hugging Face folder: exported to ONNX first (packager/hf_export.py)

    @property
    def converts_as(self) -> "SourceKind":
        """The kind the converters see: a Hugging Face folder reaches them as its ONNX export."""
        return SourceKind.ONNX if self is SourceKind.HF else self


def detect_kind(path: Path) -> SourceKind:
    if not path.exists():
        raise InputError(f"model {str(path)!r} does not exist",
                         hint="pass a SavedModel directory, a Hugging Face folder, a .keras/.h5 file, an .onnx file or a .tflite file")
    if path.is_dir():
        from packager.hf_export import is_hf_folder

        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return SourceKind.SAVED_MODEL
        if is_hf_folder(path):
            return SourceKind.HF
        raise InputError(f"directory {str(path)!r} is neither a TensorFlow SavedModel (no saved_model.pb in it) nor a "
                         "Hugging Face model folder (config.json and model.safetensors or pytorch_model.bin)")
    suffix = path.suffix.lower()
    kinds = {".keras": SourceKind.KERAS, ".h5": SourceKind.KERAS, ".hdf5": SourceKind.KERAS,
             ".onnx": SourceKind.ONNX, ".tflite": SourceKind.TFLITE}
    if suffix not in kinds:
        raise InputError(f"cannot tell the format of {path.name!r} (suffix {suffix or 'none'!r})",
                         hint="supported: SavedModel directory, .keras, .h5, .onnx, .tflite")
    return kinds[suffix]


def parse_input_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """`NAME:D1,D2,...` (repeatable) -> {name: shape}."""
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            shape = None
        if not sep or not name or shape is None or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape {item!r} is not NAME:D1,D2,... with positive sizes",
                             hint="e.g. --input-shape image:1,224,224,3")
        shapes[name] = shape
    return shapes


@dataclass
class InputSpec:
    name: str
    signature: tuple[int | None, ...]  # None = dynamic
    dtype: str
    shape: tuple[int, ...] = ()  # resolved concrete shape

    @property
    def dynamic(self) -> bool:
        return any(d is None for d in self.signature)


def resolve_shapes(specs: list[InputSpec], given: dict[str, tuple[int, ...]], *,
                   data: dict[str, tuple[int, ...]] | None = None, batch: int = 1) -> None:
    """Fill each spec's concrete shape: --input-shape first, then the shape of the samples in
    the validation/calibration data (with or without a batch axis), then a dynamic batch axis
    (position 0) as `batch`; any other dynamic dimension is a clear request for data or the flag."""
    names = {s.name for s in specs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InputError(f"--input-shape names unknown input(s) {unknown}", hint=f"the model's inputs: {sorted(names)}")
    data = data or {}
    for s in specs:
        if s.name in given:
            s.shape = _checked(s, tuple(given[s.name]), f"--input-shape {s.name}:{','.join(map(str, given[s.name]))} "
                               "does not fit", hint="keep the fixed dimensions as they are")
            continue
        if s.name in data:
            sample = shape = tuple(data[s.name])
            if len(shape) + 1 == len(s.signature) and s.signature[0] in (None, batch):
                shape = (batch,) + shape  # samples given without their batch axis
            s.shape = _checked(s, shape, f"the data's samples for input {s.name!r} have shape {sample}",
                               hint="the first axis of each array counts samples; each sample must match the "
                                    "input with or without its batch axis", error=CalibrationError)
            continue
        dims = list(s.signature)
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            example = ",".join(str(d) if d is not None else "N" for d in dims)
            raise InputError(f"input {s.name!r} has dynamic dimensions {_fmt(s.signature)}",
                             hint=f"give --validation (or --calibration) data, whose shapes fix them, or "
                                  f"--input-shape {s.name}:{example} (N = the size to use)")
        s.shape = tuple(dims)


def _checked(s: InputSpec, shape: tuple[int, ...], what: str, *, hint: str, error=InputError) -> tuple[int, ...]:
    ok = len(shape) == len(s.signature) and all(d is None or d == g for d, g in zip(s.signature, shape))
    if not ok or any(d <= 0 for d in shape):
        raise error(f"{what}; the model's input {s.name!r} takes {_fmt(s.signature)} (? = any size)", hint=hint)
    return shape


def _fmt(sig) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in sig) + ")"


@dataclass(frozen=True)
class TextInfo:
    """A text model's tokenizer and settings: the bundle carries both, and text data is tokenized with them."""

    tokenizer: Path  # tokenizer.json
    settings: TextSettings
    labels: tuple[str, ...] = ()  # class names of a classifier, in index order

    def encoder(self) -> TextEncoder:
        return TextEncoder.from_file(self.tokenizer, self.settings)


@dataclass
class Source:
    """A loaded model. Subclasses fill inputs/outputs and implement `reference`."""

    path: Path
    kind: SourceKind
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    sha256: str = ""
    workdir: Path | None = None
    origin: SourceKind | None = None  # what the user gave, when it was converted first (a Hugging Face folder)
    origin_path: Path | None = None
    text: TextInfo | None = None  # text models: the tokenizer that goes into the bundle

    @property
    def format_name(self) -> str:
        return (self.origin or self.kind).value

    def reference(self, feeds: Feeds) -> Feeds:
        raise NotImplementedError

    def release_reference(self) -> None:
        """Let go of what `reference` loaded (the build asks for the reference once, then converts)."""

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name=s.name, shape=s.shape, dtype=s.dtype,
                                shape_signature=tuple(-1 if d is None else d for d in s.signature))
                     for s in self.inputs)


class TFSource(Source):
    """SavedModel or Keras model, normalised to a SavedModel with a serving signature."""

    def __init__(self, path: Path, kind: SourceKind, workdir: Path):
        super().__init__(path=path, kind=kind, workdir=workdir)
        import tensorflow as tf

        self._tf = tf
        self.saved_model_dir = self._as_saved_model()
        try:
            self._loaded = tf.saved_model.load(str(self.saved_model_dir))
        except Exception as e:  # TF raises many unrelated types for a broken SavedModel
            raise InputError(f"could not load SavedModel {self.path}: {_first_line(e)}") from None
        sigs = self._loaded.signatures
        if not sigs:
            raise InputError(f"SavedModel {self.path} has no serving signature",
                             hint="export it with model.export(dir) (Keras) or tf.saved_model.save(..., signatures=...)")
        self.signature_key = "serving_default" if "serving_default" in sigs else sorted(sigs)[0]
        self._sig = sigs[self.signature_key]
        spec = self._sig.structured_input_signature[1]
        if not spec:
            raise InputError(f"the serving signature of {self.path} takes positional inputs only",
                             hint="re-export with named inputs (keras.Input(name=...))")
        self.inputs = [InputSpec(n, tuple(spec[n].shape.as_list()) if spec[n].shape.rank is not None else (None,),
                                 spec[n].dtype.name) for n in sorted(spec)]
        self.outputs = sorted(self._sig.structured_outputs)
        self._static: dict[tuple, Path] = {}

    def _as_saved_model(self) -> Path:
        if self.kind is SourceKind.SAVED_MODEL:
            return self.path
        import keras

        try:
            model = keras.models.load_model(str(self.path), compile=False)
        except Exception as e:  # Keras raises ValueError, OSError, TypeError... for bad files
            raise InputError(f"could not load Keras model {self.path.name}: {_first_line(e)}",
                             hint="custom layers must be importable and registered (keras.saving.register_keras_serializable)") from None
        out = self.workdir / "source_saved_model"
        try:
            model.export(str(out), verbose=False)
        except Exception as e:
            raise ConversionError(f"Keras could not export {self.path.name} as a SavedModel: {_first_line(e)}") from None
        return out

    def reference(self, feeds: Feeds) -> Feeds:
        tf = self._tf
        try:
            res = self._sig(**{k: tf.constant(v) for k, v in feeds.items()})
        except Exception as e:  # TF raises InvalidArgumentError and friends on bad inputs
            raise ReferenceFailed(f"TensorFlow cannot run {self.path.name} on this data: {_first_line(e)}") from None
        return {k: v.numpy() for k, v in res.items()}

    def static_saved_model(self) -> Path:
        """A SavedModel whose signature has the resolved static shapes (TFLite wants them)."""
        key = tuple(s.shape for s in self.inputs)
        if key in self._static:
            return self._static[key]
        tf = self._tf
        if not any(s.dynamic for s in self.inputs):
            self._static[key] = self.saved_model_dir
            return self.saved_model_dir
        sig, names = self._sig, [s.name for s in self.inputs]
        fn = tf.function(lambda *args: sig(**dict(zip(names, args))),
                         input_signature=[tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in self.inputs])
        module = tf.Module()
        module.inner = self._loaded
        module.fn = fn
        out = self.workdir / f"static_saved_model_{len(self._static)}"
        tf.saved_model.save(module, str(out), signatures={"serving_default": fn.get_concrete_function()})
        self._static[key] = out
        return out

    def onnx_function(self):
        """A tf.function with the model's own (possibly dynamic) signature returning the
        outputs as a list in `self.outputs` order, for tf2onnx."""
        tf = self._tf
        sig, names, outs = self._sig, [s.name for s in self.inputs], self.outputs
        specs = [tf.TensorSpec(s.signature, s.dtype, name=s.name) for s in self.inputs]
        return tf.function(lambda *args: [sig(**dict(zip(names, args)))[o] for o in outs], input_signature=specs)


class OnnxSource(Source):
    def __init__(self, path: Path, kind: SourceKind, workdir: Path):
        super().__init__(path=path, kind=kind, workdir=workdir)
        import onnx

        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as e:  # protobuf DecodeError, ValidationError, ...
            raise InputError(f"{path.name} is not a valid ONNX model: {_first_line(e)}",
                             hint="re-export it, and check it with python -m onnx.checker") from None
        from onnx import helper

        init = {i.name for i in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in init:
                continue
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
            self.inputs.append(InputSpec(vi.name, dims, dtype))
        self.outputs = [o.name for o in model.graph.output]
        self.matmul_weight_share = matmul_weight_share(model)  # what auto's TFLite ladder asks of the graph
        self._session = None

    @property
    def model(self):
        """The graph, read again when asked (once a build, by the TFLite bridge): the build does not
        hold a base-size model's weights for its whole run (MPNet: 440 MB)."""
        import onnx

        return onnx.load(str(self.path))

    def release_reference(self) -> None:
        self._session = None  # another copy of the weights (MPNet: ~400 MB) the build's children need more

    def reference(self, feeds: Feeds) -> Feeds:
        if self._session is None:
            import onnxruntime as ort

            try:
                self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            except Exception as e:
                raise InputError(f"onnxruntime cannot run {self.path.name}: {_first_line(e)}") from None
        try:
            return dict(zip(self.outputs, self._session.run(self.outputs, feeds)))
        except Exception as e:  # onnxruntime's Fail/InvalidArgument/RuntimeException
            raise ReferenceFailed(f"onnxruntime cannot run {self.path.name} on this data: {_first_line(e)}") from None


def matmul_weight_share(model) -> float:
    """The share of the weights (elements) that feed MatMul/Gemm rather than Conv: near 1 for
    transformers and MLPs, near 0 for CNNs."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    dense = conv = 0
    for n in model.graph.node:
        w = sum(sizes.get(i, 0) for i in n.input[1:])
        if n.op_type in ("MatMul", "Gemm"):
            dense += w
        elif n.op_type in ("Conv", "ConvTranspose"):
            conv += w
    return dense / (dense + conv) if dense + conv else 0.0


class HfSource(OnnxSource):
    """A Hugging Face folder, exported to ONNX in a worker process; from then on an ONNX source
    that carries its tokenizer."""

    def __init__(self, path: Path, kind: SourceKind, workdir: Path, store=None):
        from packager.hf_export import export_stored, read_folder

        folder = read_folder(path)
        onnx_path, ans = export_stored(folder, workdir / "hf-export", store=store)
        super().__init__(onnx_path, SourceKind.ONNX, workdir)
        self.origin, self.origin_path = SourceKind.HF, path
        self.text = TextInfo(tokenizer=folder.tokenizer, settings=folder.text_settings(ans["inputs"]),
                             labels=folder.labels)


class TFLiteSource(Source):
    """A ready .tflite: packaged as is; its own outputs are the reference."""

    def __init__(self, path: Path, kind: SourceKind, workdir: Path):
        super().__init__(path=path, kind=kind, workdir=workdir)
        from edgeruntime.litert import EDGETPU_OP, LiteRTRuntime
        from edgebundle.errors import RuntimeUnavailableError

        self.data = path.read_bytes()
        self.edgetpu_compiled = EDGETPU_OP.encode() in self.data
        if self.edgetpu_compiled:
            self.runtime = None  # needs the Edge TPU to run; described from the flatbuffer instead
            from packager.tflite_fb import describe_flatbuffer

            ins, outs = describe_flatbuffer(self.data)
        else:
            try:
                self.runtime = LiteRTRuntime.load(str(path))
            except RuntimeUnavailableError as e:
                raise InputError(f"{path.name} is not a valid TFLite model: {e}") from None
            ins, outs = self.runtime.inputs, self.runtime.outputs
        self.tensor_inputs, self.tensor_outputs = ins, outs
        self.inputs = [InputSpec(i.name, tuple(None if d < 0 else d for d in i.shape), i.dtype) for i in ins]
        self.outputs = [o.name for o in outs]

    def reference(self, feeds: Feeds) -> Feeds:
        if self.runtime is None:
            raise ConversionError(f"{self.path.name} is compiled for the Edge TPU and cannot run on this host")
        try:
            return self.runtime.infer(feeds)
        except (ValueError, RuntimeError) as e:
            raise ReferenceFailed(f"LiteRT cannot run {self.path.name} on this data: {_first_line(e)}") from None


_LOADERS = {SourceKind.SAVED_MODEL: TFSource, SourceKind.KERAS: TFSource,
            SourceKind.ONNX: OnnxSource, SourceKind.TFLITE: TFLiteSource, SourceKind.HF: HfSource}


def load_source(path: str | os.PathLike, *, workdir: Path | None = None, store=None) -> Source:
    """The model at `path`, loaded; `store` (packager/store.py), when given, keeps what loading converts
    (a Hugging Face folder's ONNX export) across builds."""
    path = Path(path)
    kind = detect_kind(path)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="edgepack-src-"))
    src = HfSource(path, kind, workdir, store) if kind is SourceKind.HF else _LOADERS[kind](path, kind, workdir)
    src.sha256 = digest_path(path)
    return src


def attach_tokenizer(source: Source, path: Path) -> None:
    """`--tokenizer`: an ONNX text model exported by the user gets the tokenizer it was exported
    with (a tokenizer.json, or the Hugging Face folder holding it and its settings)."""
    from packager.hf_export import folder_text

    if source.text is not None:
        raise InputError("--tokenizer is for ONNX files: a Hugging Face folder brings its own tokenizer.json")
    if source.kind is not SourceKind.ONNX:
        raise InputError(f"--tokenizer is for ONNX text models; {source.path.name} is {source.kind.value}")
    names = [s.name for s in source.inputs]
    tokenizer, max_length, labels, specials = folder_text(Path(path))
    unknown = [n for n in names if n not in STANDARD_INPUTS]
    if unknown or "input_ids" not in names:
        raise InputError(f"--tokenizer: the model's inputs {names} are not token tensors "
                         f"({', '.join(STANDARD_INPUTS)})", hint="export the model with those input names")
    if any(np.dtype(s.dtype).kind not in "iu" for s in source.inputs):
        raise InputError(f"--tokenizer: the model's inputs are {[s.dtype for s in source.inputs]}, not integer token ids")
    source.text = TextInfo(tokenizer=tokenizer, labels=labels, settings=text_settings(
        tokenizer, names, max_length=max_length, special_tokens=specials))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
