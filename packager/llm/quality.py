"""The generation gate: each candidate scored against the float reference on the same held-out token ids.
Teacher-forced top-1 agreement (does the candidate pick the reference's next token?) and the perplexity
ratio (how much likelier the real text is under the reference than under the candidate)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgebundle.errors import ConversionError

if TYPE_CHECKING:
    from packager.llm.cache import Source

# Defaults measured on Gemma 3 270M (docs/benchmarks.md, "Small LLMs"): int8 keeps 96 % of the reference's
# next tokens (perplexity x0.999), the best int4 recipe 74 % (x1.18), whose greedy text is visibly worse:
# the line sits between them.
MIN_AGREEMENT = 0.85
MAX_PPL_RATIO = 1.10
EVAL_TOKENS = 2048
CHUNK = 256


@dataclass(frozen=True)
class Gate:
    min_agreement: float = MIN_AGREEMENT
    max_ppl_ratio: float = MAX_PPL_RATIO
    enabled: bool = True

    def to_dict(self) -> dict:
        return {"min_agreement": self.min_agreement, "max_ppl_ratio": self.max_ppl_ratio, "enabled": self.enabled}


@dataclass(frozen=True)
class Reference:
    chunks: tuple[np.ndarray, ...]  # token ids per chunk
    top1: np.ndarray  # the reference's argmax at every scored position, all chunks in order
    nll: np.ndarray  # its negative log-likelihood of the real next token there
    params: int
    seconds: float = 0.0
    lora: dict = field(default_factory=dict)  # with an adapter: (layer, module, "A"|"B") -> its graph weight
    cached: bool = False  # read back from the build cache, not computed by this build


    @property
    def positions(self) -> int:
        return int(self.top1.size)

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))


@dataclass(frozen=True)
class Quality:
    agreement: float
    ppl_ratio: float
    perplexity: float
    positions: int

    def passes(self, gate: Gate) -> bool:
        return not gate.enabled or (self.agreement >= gate.min_agreement and self.ppl_ratio <= gate.max_ppl_ratio)

    def to_dict(self) -> dict:
        return {"agreement": round(self.agreement, 4), "ppl_ratio": round(self.ppl_ratio, 4),
                "perplexity": round(self.perplexity, 3), "positions": self.positions}


def reference(folder: Path, texts: list[str], work: Path, *, max_tokens: int = EVAL_TOKENS,
              chunk: int = CHUNK, adapter: Path | None = None, cache: Source | None = None) -> Reference:
    """The float reference in a child process (torch stays out of the build's process); with `adapter` (a
    PEFT LoRA folder) the adapted model's, and the adapter's weights as the ONNX graph computes them.
    With `cache`, a reference made before of the same folder, texts and adapter is read back instead."""
    import time

    from packager.llm.cache import digest_path, fetch, keep, text_digest

    work.mkdir(parents=True, exist_ok=True)
    out = work / "reference.npz"
    key = cache.key("llm-reference", texts=text_digest(texts), max_tokens=max_tokens, chunk=chunk,
                    adapter=digest_path(adapter) if adapter else None) if cache else None
    t = time.perf_counter()
    cached = bool(cache and fetch(cache.store, key, out))
    if not cached:
        (work / "texts.json").write_text(json.dumps(texts))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run([sys.executable, "-m", "packager.llm.reference", str(folder), str(work / "texts.json"),
                               str(out), str(max_tokens), str(chunk), *([str(adapter)] if adapter else [])],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-1:] or ["no message"]
            raise ConversionError(f"the float reference (transformers) failed on {folder}: {tail[0][:300]}")
        if cache:
            keep(cache.store, key, out)
    z = np.load(out)
    ids, off = z["ids"], z["offsets"]
    chunks = tuple(ids[a:b] for a, b in zip(off[:-1], off[1:]))
    lora = {(int(k.split("/")[1]), k.split("/")[2], k.split("/")[3]): z[k] for k in z.files if k.startswith("lora/")}
    return Reference(chunks, z["top1"], z["nll"], int(z["params"]), time.perf_counter() - t, lora, cached)


def score(rt, ref: Reference) -> Quality:
    """`rt`: an edgeruntime.genai.GenAIRuntime of the candidate."""
    tops, nlls = [], []
    for c in ref.chunks:
        # float32: the log-sum-exp is shifted by the row's max, so its error stays ~1e-6 nats; float64 over
        # Gemma's 262k-token rows doubled the scoring time (40-60 s a candidate here)
        logits = rt.logits([int(i) for i in c])[:-1].astype(np.float32, copy=False)
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        nlls.append(logz - logits[np.arange(len(c) - 1), c[1:]])
        tops.append(logits.argmax(-1))
    top, nll = np.concatenate(tops), np.concatenate(nlls)
    return Quality(agreement=float((top == ref.top1).mean()), ppl_ratio=math.exp(float(nll.mean() - ref.nll.mean())),
                   perplexity=math.exp(float(nll.mean())), positions=int(top.size))
