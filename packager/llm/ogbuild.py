"""Child process: ONNX Runtime GenAI's model builder on a Hugging Face causal-LM folder (imports torch,
so it never runs in the build's own process). Usage: python -m packager.llm.ogbuild SRC OUT PRECISION EP
[KEY=VALUE ...] (the builder's extra options, e.g. block_size=32 accuracy_level=4)."""
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


def main(argv: list[str]) -> None:
    src, out, precision, ep, *extra = argv
    _gemma3_rope()
    sys.argv = ["builder", "-i", src, "-o", out, "-p", precision, "-e", ep, "-c", f"{out}.cache"]
    if extra:
        sys.argv += ["--extra_options", *extra]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
