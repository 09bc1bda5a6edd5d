"""Child process: ONNX Runtime GenAI's model builder on a Hugging Face causal-LM folder (imports torch,
so it never runs in the build's own process). Usage: python -m packager.llm.ogbuild JOBS.json, a list of
{"src", "out", "precision", "ep", "options": ["block_size=32", ...], "lora": null | {"rank", "targets", "template"}}
run in turn in this one process (torch and the builder imported once); each job's outcome goes to OUT.status
("ok" or the error's last line). A job with "lora" is built with LoRA slots (packager.llm.lora): the builder
bakes a PEFT adapter's branches (the template folder's, or a zero one made here of that rank and targets),
kept float in a quantized graph, then made slots."""
from __future__ import annotations

import runpy
import sys


def _gemma3_rope() -> None:
    """transformers 5 writes Gemma 3's RoPE per layer type ({"full_attention": {...}, "sliding_attention":
    {...}}); onnxruntime-genai 0.18's Gemma3Model reads the flat form (KeyError 'rope_type'). Give it the
    flat form: full attention's parameters, the sliding layers' theta as rope_local_base_freq."""
    import onnxruntime_genai.models.builder  # noqa: F401  puts its folder on sys.path: "builders" is top-level
    from builders.gemma import Gemma3Model

    init = Gemma3Model.__init__

    def patched(self, config, *args, **kwargs):
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict) and "full_attention" in rp:
            config.rope_theta = rp["full_attention"]["rope_theta"]
            config.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rp["full_attention"])
        init(self, config, *args, **kwargs)

    Gemma3Model.__init__ = patched


def _keep_lora_float() -> None:
    """The LoRA branches stay float MatMuls in an int4/int8 graph (an adapter's float weights replace them at
    run time): each branch the builder makes goes on its own quantization exclusion list, named as it names
    them (/model/layers.0/attn/q_proj/lora_A/MatMul), whatever the layer count and module paths."""
    import onnxruntime_genai.models.builder  # noqa: F401  puts "builders" on sys.path
    from builders.base import Model

    make = Model.make_matmul_lora

    def patched(self, matmul, basename, root_input, **kwargs):
        parts = basename.split("/")
        for branch in ("lora_A", "lora_B"):
            self.exclude_node_from_quantization("/".join(parts[:-1] + [branch] + parts[-1:]))
        return make(self, matmul, basename, root_input, **kwargs)

    Model.make_matmul_lora = patched


def template(src: str, lora: dict, dest: str) -> str:
    """The adapter folder the builder bakes: the given template, or a fresh PEFT adapter of the slots' rank
    and targets (its values do not matter: the slots are zeroed after the build)."""
    if lora.get("template"):
        return lora["template"]
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = LoraConfig(r=int(lora["rank"]), lora_alpha=int(lora["rank"]), target_modules=list(lora["targets"]),
                     lora_dropout=0.0)
    get_peft_model(model, cfg).save_pretrained(dest)
    return dest


def run(src: str, out: str, precision: str, ep: str, options: list[str]) -> None:
    sys.argv = ["builder", "-i", src, "-o", out, "-p", precision, "-e", ep, "-c", f"{out}.cache"]
    if options:
        sys.argv += ["--extra_options", *options]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def main(jobs_file: str) -> None:
    import json
    import traceback

    import shutil
    from pathlib import Path

    _gemma3_rope()
    _keep_lora_float()
    templates: dict[tuple, str] = {}
    for job in json.loads(open(jobs_file).read()):
        status = f"{job['out']}.status"
        lora = job.get("lora")
        try:
            options = list(job.get("options") or [])
            if lora:
                key = (job["src"], json.dumps(lora, sort_keys=True))
                if key not in templates:
                    templates[key] = template(job["src"], lora, f"{job['out']}.lora-template")
                options.append(f"adapter_path={templates[key]}")
            run(job["src"], job["out"], job["precision"], job["ep"], options)
            if lora:
                from packager.llm.lora import add_slots

                add_slots(Path(job["out"]))
            msg = "ok"
        except BaseException as e:  # noqa: BLE001  one recipe's failure is that candidate's, not the build's
            lines = [x for x in traceback.format_exception_only(type(e), e) if x.strip()]
            msg = (lines[-1].strip() if lines else repr(e)) or "failed"
        with open(status, "w") as f:
            f.write(msg)
    for folder in templates.values():
        if folder.endswith(".lora-template"):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
