"""The Coral Edge TPU, a backend over TFLite for the profiles whose delegates name `edgetpu`.

Everything the build knows about the Edge TPU lives here: full int8 with no node kept in float,
8-bit I/O and the op mapping lint, the delegate this host cannot load (and so cannot time), the
failed-gate hint naming the layers that lose the accuracy, and edgetpu_compiler when it is on
PATH (x86-64 Debian/Ubuntu only); otherwise the exact command the user must run to finish a
Coral bundle."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.errors import ConversionError
from packager.formats.tflite import TFLiteBackend
from packager.lint import Finding, Level
from packager.registry import Artifact, Finished, register
from packager.sources import Source
from packager.tflite_fb import ops_with_versions
from targets import EDGETPU, Precision, TargetProfile

COMPILER = "edgetpu_compiler"
DELEGATE = EDGETPU
# TFLite builtins the Edge TPU compiler can map (Coral's published supported-op table).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D",
    "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU",
    "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE",
    "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM",
    "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "edgetpu-custom-op",
})
# Newest op versions edgetpu_compiler 16 accepts, where newer TF emits newer ones (seen in practice).
EDGETPU_MAX_VERSION = {"CONV_2D": 5, "EXP": 1}


def lint_model(ops, inputs, outputs) -> list[Finding]:
    out = []
    for t in list(inputs) + list(outputs):
        if t.dtype not in ("int8", "uint8"):
            out.append(Finding(Level.ERROR, "edgetpu-io",
                               f"{t.name!r} is {t.dtype}; the Edge TPU needs int8/uint8 I/O so QUANTIZE/DEQUANTIZE "
                               "stay off the CPU (set quantized_io: uint8 or int8 in the profile)"))
    first_bad = next((i for i, (name, _) in enumerate(ops) if name not in EDGETPU_OPS), None)
    if first_bad is not None:
        bad = sorted({n for n, _ in ops if n not in EDGETPU_OPS})
        out.append(Finding(Level.WARNING, "edgetpu-fallback",
                           f"op #{first_bad} {ops[first_bad][0]} cannot run on the Edge TPU; it and the "
                           f"{len(ops) - first_bad - 1} ops after it fall back to the CPU "
                           f"({first_bad} of {len(ops)} ops on the TPU). Unmappable: {', '.join(bad)}"))
    else:
        out.append(Finding(Level.INFO, "edgetpu-mapping", f"all {len(ops)} ops are on Coral's supported list"))
    too_new = sorted({f"{n} v{v}" for n, v in ops if v > EDGETPU_MAX_VERSION.get(n, 99)})
    if too_new:
        out.append(Finding(Level.WARNING, "edgetpu-op-version",
                           f"edgetpu_compiler 16 rejects op versions {', '.join(too_new)} that this TensorFlow "
                           "emits; avoid the features that need them (e.g. grouped or dilated convolutions)"))
    return out


@dataclass(frozen=True)
class CompileResult:
    compiled: bool
    model: Path  # the compiled model when compiled, else the input
    version: str | None = None
    ops_on_tpu: int | None = None
    ops_on_cpu: int | None = None
    op_table: list = field(default_factory=list)  # [{"op", "count", "status"}]
    instructions: str = ""

    def to_dict(self) -> dict:
        return {"compiled": self.compiled, "compiler_version": self.version, "ops_on_tpu": self.ops_on_tpu,
                "ops_on_cpu": self.ops_on_cpu, "op_table": self.op_table, "instructions": self.instructions}


def instructions(name: str, version: str) -> str:
    return ("This Coral bundle is NOT compiled for the Edge TPU: edgetpu_compiler is not on PATH, so the "
            "bundle holds the int8 model, which runs only on the CPU. To finish it, re-run this same "
            "`edgepack build ... --target coral` on an x86-64 Debian/Ubuntu host after installing the "
            "compiler from Coral's apt repository (apt-get install edgetpu-compiler); edgepack then compiles, "
            "records the op mapping and packages model_edgetpu.tflite.")


def compile_model(model: Path, out_dir: Path, *, name: str, version: str) -> CompileResult:
    exe = shutil.which(COMPILER)
    if exe is None:
        return CompileResult(compiled=False, model=model, instructions=instructions(name, version))
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model)], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    compiled = out_dir / f"{model.stem}_edgetpu.tflite"
    if proc.returncode != 0 or not compiled.is_file():
        raise ConversionError(f"edgetpu_compiler failed (exit {proc.returncode}): {log.strip()[-600:]}",
                              hint="see the op table above; unsupported op versions come from newer TensorFlow")
    ver = re.search(r"Edge TPU Compiler version ([\w.]+)", log)
    on_tpu = re.search(r"operations that will run on Edge TPU:\s*(\d+)", log)
    on_cpu = re.search(r"operations that will run on CPU:\s*(\d+)", log)
    table = [{"op": m[0], "count": int(m[1]), "status": m[2].strip()}
             for m in re.findall(r"^(\w+)\s+(\d+)\s+(.+)$", log, re.M) if m[0] != "Operator"]
    return CompileResult(compiled=True, model=compiled, version=ver and ver.group(1),
                         ops_on_tpu=on_tpu and int(on_tpu.group(1)), ops_on_cpu=on_cpu and int(on_cpu.group(1)),
                         op_table=table)


def _input_finding(spec) -> Finding:
    """Integer inputs (token ids, indices) are refused: the converter quantizes only float inputs to
    8 bits, so the model would keep a wide integer input the Edge TPU cannot take, and ids index an
    embedding (GATHER, not an Edge TPU op) that, with everything after it, would run on the CPU."""
    if spec.dtype.startswith(("int", "uint")):
        return Finding(Level.ERROR, "edgetpu-io",
                       f"input {spec.name!r} is {spec.dtype} (integer ids, such as "
                       "token ids): the Edge TPU maps only 8-bit tensors, token ids above 255 cannot be 8-bit, and the "
                       "embedding lookup (gather) they feed is no Edge TPU op, so it and everything after it would "
                       "run on the CPU; build for a CPU or GPU target instead")
    return Finding(Level.WARNING, "edgetpu-io", f"input {spec.name!r} is {spec.dtype}; the Edge TPU maps only 8-bit "
                                                "tensors")


@register
class EdgeTPUBackend(TFLiteBackend):
    delegate = DELEGATE
    report_section = "Edge TPU"  # its op mapping findings and compile step
    lint_prefix = "edgetpu"
    mixed_ok = False  # a node kept in float runs on the CPU, and so does everything after it

    def lint_source(self, source: Source, profile: TargetProfile) -> list[Finding]:
        if source.text is not None:  # refused before any conversion: no candidate could ever be mapped
            return [Finding(Level.ERROR, "edgetpu-text",
                            f"{profile.name} cannot run this text model: its token-id inputs "
                            f"{[s.name for s in source.inputs]} are {source.inputs[0].dtype} and the Edge TPU maps "
                            "only 8-bit tensors (token ids above 255 cannot be 8-bit), so the embedding lookup, "
                            "and everything after it, would run on the CPU; build for a CPU or GPU target instead")]
        return [_input_finding(s) for s in source.inputs if s.dtype not in ("float32", "int8", "uint8")]

    def lint(self, art: Artifact, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list[Finding]:
        found = super().lint(art, profile, allow_flex=allow_flex, inputs=inputs, outputs=outputs)
        return found + lint_model(ops_with_versions(art.path.read_bytes()), inputs, outputs)

    def host_delegates(self, profile: TargetProfile) -> tuple[str, ...]:
        return tuple(d for d in profile.delegates if d != DELEGATE)

    def finish(self, art: Artifact, profile: TargetProfile, work: Path, *, name: str, version: str) -> Finished:
        if not profile.edgetpu_compile:
            return Finished(path=art.path, name=art.path.name, compiled=False)
        tpu = compile_model(art.path, work, name=name, version=version)
        if tpu.compiled:
            return Finished(path=tpu.model, name="model_edgetpu.tflite", compile_report=tpu.to_dict(), compiled=True)
        return Finished(path=art.path, name=art.path.name, compile_report=tpu.to_dict(), compiled=False,
                        warnings=(tpu.instructions,))

    def gate_hint(self, profile: TargetProfile, precision: Precision, *, lossy) -> str:
        hint = super().gate_hint(profile, precision, lossy=lossy)
        worst = lossy()[:5]
        return f"where int8 loses the accuracy: {'; '.join(worst)}. {hint}" if worst else hint
