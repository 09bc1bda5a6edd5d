"""Child process: ONNX Runtime GenAI's model builder on a Hugging Face causal-LM folder (imports torch,
so it never runs in the build's own process). Usage: python -m packager.llm.ogbuild JOBS.json, a list of
{"src", "out", "precision", "ep", "options": ["block_size=32", ...]} run in turn in this one process (torch
and the builder imported once); each job's outcome goes to OUT.status ("ok" or the error's last line)."""
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


def run(src: str, out: str, precision: str, ep: str, options: list[str]) -> None:
    sys.argv = ["builder", "-i", src, "-o", out, "-p", precision, "-e", ep, "-c", f"{out}.cache"]
    if options:
        sys.argv += ["--extra_options", *options]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def main(jobs_file: str) -> None:
    import json
    import traceback

    _gemma3_rope()
    for job in json.loads(open(jobs_file).read()):
        status = f"{job['out']}.status"
        try:
            run(job["src"], job["out"], job["precision"], job["ep"], job.get("options") or [])
            msg = "ok"
        except BaseException as e:  # noqa: BLE001  one recipe's failure is that candidate's, not the build's
            lines = [x for x in traceback.format_exception_only(type(e), e) if x.strip()]
            msg = (lines[-1].strip() if lines else repr(e)) or "failed"
        with open(status, "w") as f:
            f.write(msg)


if __name__ == "__main__":
    main(sys.argv[1])
