"""The API's view of the agent's models (device_agent.server.Repository): look one up by name,
readiness, and Triton's model repository extension (index, load, unload)."""
from __future__ import annotations

from device_agent.generative import GenerationPolicy
from device_agent.model import Model
from device_agent.ota.record import LIVE, RESUMABLE
from edgebundle.errors import InputError


class AgentRepository:
    def __init__(self, agent):
        self.agent = agent

    def model(self, name: str) -> tuple[str, Model | None] | None:
        """(the model's name on the device, the model serving now or None); None: no such model."""
        s = self.agent.slot(name)
        return None if s is None else (s.name, None if s.unloaded else s.model)

    def names(self) -> list[str]:
        return [s.name for s in list(self.agent.slots) if s.name]

    def generation_policy(self) -> GenerationPolicy:
        """The agent's [llm] settings: queue bound, generations at once, diagnostic token delay."""
        cfg = self.agent.cfg
        return GenerationPolicy(max_queue=cfg.llm_max_queue, concurrency=cfg.llm_concurrency,
                                token_delay_s=cfg.llm_token_delay_ms / 1000)

    def ready(self) -> bool:
        return self.agent.ready()

    def index(self) -> list[dict]:
        """Triton's repository index: every model with its version and state."""
        out = []
        for s in list(self.agent.slots):
            if not s.name:
                continue
            m = s.model
            state = "UNAVAILABLE" if s.unloaded or m is None else "READY"
            reason = "unloaded" if s.unloaded else (s.model_error or "") if m is None else ""
            out.append({"name": s.name, "version": m.version if m else "", "state": state, "reason": reason})
        return out

    def load(self, name: str) -> None:
        """Load the model's active bundle again (after an unload); a loaded model stays as it is."""
        s = self._slot(name)
        if s.model is not None and not s.unloaded:
            return
        path = s.store.active()
        if path is None:
            raise InputError(f"model {name!r} has no active bundle to load; push one")
        s.swap(s.load(path))
        s.unloaded = False
        self.agent.models_changed()

    def unload(self, name: str) -> None:
        """Stop serving the model and free its runtime; its files stay (load brings it back, and so
        does a restart). Refused while the model is being updated."""
        s = self._slot(name)
        if s.updater is not None and s.updater.record.state in RESUMABLE + LIVE:
            raise InputError(f"model {name!r} is being updated ({s.updater.record.state.value}); unload it after")
        s.unloaded = True
        old = s.swap(None)
        s.model_error = "unloaded through the repository API"
        if old is not None:
            old.close()
        self.agent.models_changed()

    def _slot(self, name: str):
        s = self.agent.slot(name)
        if s is None:
            raise LookupError(name)
        return s


__all__ = ["AgentRepository"]
