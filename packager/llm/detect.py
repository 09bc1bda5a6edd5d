"""Is a model path a causal LM? Answered from config.json or the suffix alone (no framework imports), so
the CLI routes it before anything heavy loads."""
from __future__ import annotations

import json
from pathlib import Path


def is_causal_lm(path: Path) -> bool:
    """A Hugging Face folder whose config names a *ForCausalLM architecture, or a GGUF file."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and any(str(a).endswith("ForCausalLM") for a in cfg.get("architectures") or ())
