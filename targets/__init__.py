"""Target profiles: declarative YAML files loaded into frozen dataclasses.

Built-in profiles live next to this file (`*.yaml`); users pass their own with
`--target ./my-profile.yaml`. Every key is checked: an unknown key or a value
outside the allowed set is an error naming the key and the allowed values. What
each format can do at all is its packager backend's to say: the packager hands it
in as `can_do` (packager/profiles.py), since this layer sits below the packager.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Callable

from edgebundle.errors import ProfileError

BUILTIN_DIR = Path(__file__).resolve().parent


class Format(str, Enum):
    TFLITE = "tflite"
    ONNX = "onnx"


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    DYNAMIC = "dynamic"
    DYNAMIC_BLOCK = "dynamic-block"  # int8 weights and activations per block of values (ORT MatMulNBits)
    INT8 = "int8"
    INT16X8 = "int16x8"


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class IOType(str, Enum):
    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"


# The precisions a format can do at all (a profile may narrow them further).
CanDo = Callable[[Format], tuple[Precision, ...]]
FORMAT_RUNTIMES = {Format.TFLITE: ("litert",), Format.ONNX: ("onnxruntime",)}
EDGETPU = "edgetpu"  # the Coral Edge TPU's delegate
DELEGATES = ("xnnpack", EDGETPU)
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
             "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "XnnpackExecutionProvider")
# The delegates and providers that run a model off the device's CPU (so this host cannot time it).
ACCELERATORS = (EDGETPU, "TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    format: Format
    default_precision: Precision
    precisions: tuple[Precision, ...]
    runtime: str
    description: str = ""
    quantized_io: IOType = IOType.FLOAT32  # I/O dtype of full-int8 TFLite bundles
    static_shapes: bool = True
    batch: int | None = 1  # fixed batch size; None keeps the model's own
    threads: int = 0  # 0 = runtime default
    delegates: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    tensorrt_fp16: bool = False
    tensorrt_engine_cache: bool = False
    per_channel: bool = True
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    # ONNX int8 activations: uint8 (U8S8) is ORT's fast path on x86 CPUs; TensorRT wants
    # symmetric int8 (S8S8) QDQ.
    activation_dtype: IOType = IOType.INT8
    edgetpu_compile: bool = False
    cpu_fallback: bool = True  # may the agent run this bundle without its delegate?
    min_runtime_version: str = ""
    source: str = ""  # where the profile was loaded from

    @property
    def sha256(self) -> str:
        """Hash of the profile's content (not its location): recorded in manifests."""
        d = self.to_dict()
        d.pop("source")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def accelerators(self) -> tuple[str, ...]:
        """The delegates and providers in this profile that run the model off the CPU, in order."""
        return tuple(x for x in self.delegates + self.providers if x in ACCELERATORS)

    @property
    def is_cpu(self) -> bool:
        """True when the device runs the model on its CPU (no GPU/TPU in the path)."""
        return not self.accelerators

    @property
    def on_edgetpu(self) -> bool:
        """Does the device run the model on a Coral Edge TPU?"""
        return EDGETPU in self.delegates

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
            elif isinstance(v, tuple):
                d[k] = [x.value if isinstance(x, Enum) else x for x in v]
        return d


_ENUMS = {"format": Format, "default_precision": Precision, "quantized_io": IOType,
          "calibration_method": CalibrationMethod, "activation_dtype": IOType}
_REQUIRED = ("name", "format", "default_precision", "precisions", "runtime")


def _choices(enum) -> str:
    return ", ".join(e.value for e in enum if e is not Precision.AUTO)


def profile_from_dict(d: object, *, source: str, can_do: CanDo | None = None) -> TargetProfile:
    """Validate a parsed profile document and build the dataclass; with `can_do`, its precisions too."""
    if not isinstance(d, dict):
        raise ProfileError(f"profile {source}: expected a mapping of keys to values at the top level")
    allowed = {f.name for f in fields(TargetProfile)} - {"source"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ProfileError(f"profile {source}: unknown key(s) {', '.join(map(repr, unknown))}",
                           hint=f"allowed keys: {', '.join(sorted(allowed))}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ProfileError(f"profile {source}: missing required key(s) {', '.join(missing)}")
    kw: dict = {}
    for key, value in d.items():
        if key in _ENUMS:
            kw[key] = _enum(_ENUMS[key], key, value, source)
        elif key == "precisions":
            if not isinstance(value, list) or not value:
                raise ProfileError(f"profile {source}: 'precisions' must be a non-empty list",
                                   hint=f"allowed values: {_choices(Precision)}")
            kw[key] = tuple(_enum(Precision, key, v, source) for v in value)
        elif key in ("delegates", "providers"):
            if not isinstance(value, list):
                raise ProfileError(f"profile {source}: {key!r} must be a list")
            choices = DELEGATES if key == "delegates" else PROVIDERS
            for v in value:
                if v not in choices:
                    raise ProfileError(f"profile {source}: {key!r} has {v!r}",
                                       hint=f"allowed values: {', '.join(choices)}")
            kw[key] = tuple(value)
        elif key in ("static_shapes", "tensorrt_fp16", "tensorrt_engine_cache", "per_channel",
                     "edgetpu_compile", "cpu_fallback"):
            if not isinstance(value, bool):
                raise ProfileError(f"profile {source}: {key!r} must be true or false, not {value!r}")
            kw[key] = value
        elif key in ("threads", "batch"):
            if value is None and key == "batch":
                kw[key] = None
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProfileError(f"profile {source}: {key!r} must be a whole number >= 0, not {value!r}")
            else:
                kw[key] = value
        else:
            if not isinstance(value, str):
                raise ProfileError(f"profile {source}: {key!r} must be a string, not {value!r}")
            kw[key] = value
    profile = TargetProfile(source=source, **kw)
    _check_consistency(profile, can_do)
    return profile


def _enum(enum, key: str, value: object, source: str):
    try:
        member = enum(str(value).lower())
    except ValueError:
        member = None
    if member is None or member is Precision.AUTO:
        raise ProfileError(f"profile {source}: {key!r} has {value!r}",
                           hint=f"allowed values: {_choices(enum)}")
    return member


def _check_consistency(p: TargetProfile, can_do: CanDo | None) -> None:
    src = p.source
    can = can_do(p.format) if can_do is not None else p.precisions
    for prec in p.precisions:
        if prec not in can:
            raise ProfileError(
                f"profile {src}: 'precisions' has {prec.value!r}, which format {p.format.value!r} cannot do",
                hint=f"allowed values for {p.format.value}: {', '.join(x.value for x in can)}")
    if p.default_precision not in p.precisions:
        raise ProfileError(f"profile {src}: 'default_precision' {p.default_precision.value!r} is not in 'precisions'",
                           hint=f"allowed values: {', '.join(x.value for x in p.precisions)}")
    if p.runtime not in FORMAT_RUNTIMES[p.format]:
        raise ProfileError(f"profile {src}: 'runtime' {p.runtime!r} cannot run {p.format.value} models",
                           hint=f"allowed values: {', '.join(FORMAT_RUNTIMES[p.format])}")
    if p.format is Format.ONNX and p.delegates:
        raise ProfileError(f"profile {src}: 'delegates' apply to TFLite; ONNX profiles use 'providers'")
    if p.format is Format.TFLITE and p.providers:
        raise ProfileError(f"profile {src}: 'providers' apply to ONNX; TFLite profiles use 'delegates'")
    if p.activation_dtype is IOType.FLOAT32:
        raise ProfileError(f"profile {src}: 'activation_dtype' is for int8 quantization",
                           hint="allowed values: int8, uint8")
    if p.edgetpu_compile and not p.on_edgetpu:
        raise ProfileError(f"profile {src}: 'edgetpu_compile' needs {EDGETPU!r} in 'delegates'")
    if p.on_edgetpu and (p.precisions != (Precision.INT8,) or not p.static_shapes):
        raise ProfileError(f"profile {src}: the Edge TPU runs only full int8 models with static shapes",
                           hint="set precisions: [int8] and static_shapes: true")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_profile(name_or_path: str, *, can_do: CanDo | None = None) -> TargetProfile:
    """Load a built-in profile by name, or a user's profile from a .yaml/.yml path (see profile_from_dict)."""
    import yaml  # packager dependency; the agent never loads profiles

    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    path = Path(name_or_path) if looks_like_path else BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        if looks_like_path:
            raise ProfileError(f"target profile file {name_or_path!r} does not exist")
        import difflib

        near = difflib.get_close_matches(name_or_path, builtin_names(), n=1)
        raise ProfileError(
            f"unknown target {name_or_path!r}" + (f"; did you mean {near[0]!r}?" if near else ""),
            hint=f"built-in targets: {', '.join(builtin_names())}; or pass a profile file ./my-target.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"profile {path}: not valid YAML ({e})") from None
    return profile_from_dict(doc, source=str(path) if looks_like_path else f"builtin:{path.stem}", can_do=can_do)
