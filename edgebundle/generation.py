"""A generative bundle's request defaults (manifest `generation.defaults`, OpenAI's names): written by the
packager from the source's generation_config.json, read by the agent where a request is silent."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationDefaults:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut

    def to_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationDefaults":
        return cls(max_tokens=int(d.get("max_tokens", cls.max_tokens)), temperature=float(d.get("temperature", 0.0)),
                   top_p=float(d.get("top_p", 1.0)), top_k=int(d.get("top_k") or 0))
