"""edgetpu_compiler, when it is on PATH (x86-64 Debian/Ubuntu only); otherwise the exact
command the user must run to finish a Coral bundle."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.errors import ConversionError

COMPILER = "edgetpu_compiler"


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
