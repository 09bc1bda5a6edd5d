"""Text generation over HTTP: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`
(the official `openai` client works with base_url=http://DEVICE:8080/v1), and the KServe v2 generate
extension as Triton serves it (`/v2/models/NAME/generate` and `/generate_stream`).

A request is checked whole (body, model, prompt length against the context, a place in the model's
queue) before anything is sent, so every refusal is a plain JSON error with its status: 400 for the
request's fault, 404 for an unknown model, 503 with Retry-After when the queue is full. A stream then
answers 200 with Server-Sent Events (`data: {json}` per piece of text; OpenAI's end with
`data: [DONE]`); a failure after that is an error event. The server (device_agent.server) writes
each event as it comes and closes the stream when the client goes: the generation stops there."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Callable, Iterator

from device_agent.generative import Generation, GenerationClosed, GenerationPolicy, QueueFull
from device_agent.llm_request import CHAT, COMPLETION, GenRequest, parse_chat, parse_completion, parse_generate
from device_agent.stats import GenerationRecord, Phases
from edgebundle.errors import InputError

log = logging.getLogger("edgepack.agent.api")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
JSON = {"Content-Type": "application/json"}
OPENAI, KSERVE = "openai", "kserve"


class Streamed:
    """A response made while it is sent: the server writes each chunk as it comes (chunked transfer)
    and calls close() at the end, or as soon as a write fails (the client is gone)."""

    def __init__(self, chunks: Iterator[bytes], *, status: int = 200, headers: dict | None = None,
                 cleanup: Callable[[], None] | None = None):
        self.chunks, self.status, self.headers, self.cleanup = chunks, status, headers or SSE_HEADERS, cleanup

    def close(self) -> None:
        """Stop making chunks and release what the response holds (also when it never started)."""
        try:
            self.chunks.close()
        finally:
            if self.cleanup:
                self.cleanup()


def sse(obj) -> bytes:
    """One Server-Sent Event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace") + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Refused(Exception):
    """A request answered with an error before anything ran."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def openai_error(status: int, message: str, *, code: str | None = None, headers: dict | None = None):
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            503: "server_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, {**JSON, **(headers or {})}


def kserve_error(status: int, message: str, *, code: str | None = None, headers: dict | None = None):
    return status, {"error": message}, {**JSON, **(headers or {})}


class LlmApi:
    """The generation routes of the API server. `repo` is the server's repository (model by name,
    names, and optionally the agent's GenerationPolicy); `stats` the agent's InferenceStats."""

    def __init__(self, repo, stats):
        self.repo, self.stats = repo, stats

    def policy(self) -> GenerationPolicy:
        get = getattr(self.repo, "generation_policy", None)
        return get() if get else GenerationPolicy()

    # ---- OpenAI ----
    def route(self, method: str, path: str, read_body: Callable[[], bytes], cancelled: Callable[[], bool]):
        p = path.rstrip("/")
        if p == "/v1/models" or p.startswith("/v1/models/"):
            if method != "GET":
                return openai_error(405, f"{method} is not allowed on {path}")
            if p == "/v1/models":
                return 200, {"object": "list", "data": [_model_card(n, m) for n, m in self._generative()]}, JSON
            name = p[len("/v1/models/"):]
            found = next(((n, m) for n, m in self._generative() if name in (n, m.name)), None)
            if found is None:
                return openai_error(404, f"model {name!r} not found; this agent generates with "
                                         f"{[n for n, _ in self._generative()]}", code="model_not_found")
            return 200, _model_card(*found), JSON
        kind = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}.get(p)
        if kind is None:
            return openai_error(404, f"no such endpoint {path}")
        if method != "POST":
            return openai_error(405, f"{method} is not allowed on {path}")
        t0 = time.perf_counter()
        try:
            req = (parse_chat if kind == CHAT else parse_completion)(read_body())
            slot, model = self._find(req.model)
        except InputError as e:
            self.stats.record(None, ok=False, rejected=True)
            return openai_error(400, _line(e))
        except Refused as e:
            return openai_error(e.status, str(e), code=e.code, headers=e.headers)
        return self._serve(req, slot, model, cancelled, t0, OPENAI)

    # ---- KServe v2 generate extension ----
    def generate(self, slot: str, model, body: bytes, *, stream: bool, cancelled: Callable[[], bool]):
        t0 = time.perf_counter()
        if model.generation is None:
            return kserve_error(400, f"model {model.name!r} does not generate text (a {model.manifest.format} bundle): "
                                     f"use /v2/models/{slot}/infer")
        try:
            req = parse_generate(body)
        except InputError as e:
            self.stats.record(None, ok=False, rejected=True, model=(model.name, model.version), slot=slot)
            return kserve_error(400, _line(e))
        return self._serve(replace(req, stream=stream), slot, model, cancelled, t0, KSERVE)

    # ---- both ----
    def _generative(self) -> list[tuple[str, object]]:
        out = []
        for name in self.repo.names():
            found = self.repo.model(name)
            if found and found[1] is not None and found[1].generation is not None:
                out.append((found[0], found[1]))
        return out

    def _find(self, name: str | None):
        """(slot, model) for a request's `model` (the model's name on the device or its bundle's name,
        as the KServe routes take it); without one, the device's only generative model."""
        if name is None:
            gens = self._generative()
            if len(gens) == 1:
                return gens[0]
            if not gens:
                raise Refused(503, "no text generation model is loaded", code="model_not_found",
                              headers={"Retry-After": "5"})
            raise Refused(400, f"name the model: this agent generates with {[n for n, _ in gens]}")
        found = self.repo.model(name)
        if found is None:
            raise Refused(404, f"model {name!r} not found; this agent serves {self.repo.names()}",
                          code="model_not_found")
        slot, model = found
        if model is None:
            raise Refused(503, f"model {name!r} is not loaded (yet)", headers={"Retry-After": "5"})
        if model.generation is None:
            raise Refused(400, f"model {name!r} does not generate text (a {model.manifest.format} bundle): use "
                               f"/v2/models/{slot}/infer", code="model_not_generative")
        return slot, model

    def _serve(self, req: GenRequest, slot: str, model, cancelled, t0: float, api: str, *, retried: bool = False):
        error = openai_error if api == OPENAI else kserve_error
        gen = model.generation
        try:
            if req.messages is not None:
                ids = gen.chat_ids(req.messages)
            else:
                ids = gen.check_ids(req.prompt) if isinstance(req.prompt, list) else gen.encode(req.prompt)
            sampling = gen.sampling(prompt_tokens=len(ids), **req.sampling())
            run = gen.start(ids, sampling, stop=req.stop, cancelled=cancelled, policy=self.policy(), arrived=t0)
        except InputError as e:
            self.stats.record(None, ok=False, rejected=True, model=(model.name, model.version), slot=slot)
            return error(400, _line(e))
        except QueueFull as e:
            self.stats.record_generation(GenerationRecord("queue_full", queue_depth=gen.waiting),
                                         model=(model.name, model.version), slot=slot)
            return error(503, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)})
        except GenerationClosed:  # swapped out between routing and admission: the new model takes it
            found = None if retried else self.repo.model(slot)
            if not found or found[1] is None or found[1].generation is None:
                return error(503, "the model is being replaced; retry", headers={"Retry-After": "1"})
            return self._serve(req, slot, found[1], cancelled, t0, api, retried=True)
        answer = _Answer(self, req, slot, model, run, t0, api)
        return Streamed(answer.events(), cleanup=answer.finish) if req.stream else answer.whole()


class _Answer:
    """One admitted generation, formatted for its API, its figures recorded once when it ends."""

    def __init__(self, api: LlmApi, req: GenRequest, slot: str, model, run: Generation, t0: float, flavor: str):
        self.api, self.req, self.slot, self.model, self.run, self.t0, self.flavor = api, req, slot, model, run, t0, flavor
        self.admitted = time.perf_counter()
        self.name = req.model or slot
        self.id = ("chatcmpl-" if req.kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0  # completions' logprobs: where the next token's text starts
        self._recorded = False

    # ---- whole answers ----
    def whole(self):
        error = openai_error if self.flavor == OPENAI else kserve_error
        try:
            done = self.run.result()
        except Exception as e:  # a runtime failure on a valid request: report it, keep serving
            log.exception("generation failed")
            self.record()
            return error(500, f"generation failed: {type(e).__name__}: {e}")
        self.record()
        if done.finish_reason == "cancelled":
            return error(503, "the generation was cancelled (the client left, or the model is being replaced)")
        if self.flavor == KSERVE:
            text = done.text if self.req.exclude_input else self.req.prompt + done.text
            return 200, {"model_name": self.model.name, "model_version": self.model.version, "text_output": text,
                         "finish_reason": done.finish_reason}, JSON
        lp = self._logprobs(done.tokens, done.text) if self.req.logprobs is not None else None
        if self.req.kind == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": lp,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": done.text, "logprobs": lp, "finish_reason": done.finish_reason}
        return 200, {**self._head(chunk=False), "choices": [choice], "usage": done.usage.to_dict()}, JSON

    # ---- streams ----
    def events(self) -> Iterator[bytes]:
        try:
            if self.flavor == KSERVE:
                yield from self._kserve_events()
            else:
                yield from self._openai_events()
        except GeneratorExit:
            raise
        except Exception as e:  # after the 200 went out: an error event (OpenAI's and Triton's shape)
            log.exception("generation failed")
            msg = f"generation failed: {type(e).__name__}: {e}"
            yield sse({"error": {"message": msg, "type": "server_error", "param": None, "code": None}}
                      if self.flavor == OPENAI else {"error": msg})
        finally:
            self.finish()

    def finish(self) -> None:
        """Stop the generation if it still runs, give its place back, record its figures (once)."""
        self.run.close()
        self.record()

    def _openai_events(self) -> Iterator[bytes]:
        chat = self.req.kind == CHAT
        if chat:
            yield self._chunk({"role": "assistant", "content": ""})
        for piece in self.run:
            lp = self._logprobs(piece.tokens, piece.text) if self.req.logprobs is not None else None
            yield self._chunk({"content": piece.text} if chat else piece.text, logprobs=lp)
        reason = self.run.finish_reason
        if reason in ("cancelled", "failed"):
            return
        yield self._chunk({} if chat else "", finish_reason=reason)
        if self.req.include_usage:
            yield sse({**self._head(chunk=True), "choices": [], "usage": self.run.usage.to_dict()})
        yield DONE

    def _kserve_events(self) -> Iterator[bytes]:
        head = {"model_name": self.model.name, "model_version": self.model.version}
        if not self.req.exclude_input:
            yield sse({**head, "text_output": self.req.prompt})
        for piece in self.run:
            yield sse({**head, "text_output": piece.text})
        if self.run.finish_reason not in ("cancelled", "failed"):
            yield sse({**head, "text_output": "", "finish_reason": self.run.finish_reason})

    def _head(self, *, chunk: bool) -> dict:
        chat = self.req.kind == CHAT
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.name,
                "system_fingerprint": f"{self.model.version}-{self.model.bundle_sha256[:12]}"}

    def _chunk(self, delta, *, logprobs=None, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta} if self.req.kind == CHAT else {"index": 0, "text": delta}
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        extra = {"usage": None} if self.req.include_usage else {}
        return sse({**self._head(chunk=True), "choices": [choice], **extra})

    def _logprobs(self, tokens, text: str) -> dict:
        """OpenAI's logprobs for the tokens behind `text`: chat's `content` list, or completions' four
        parallel lists (text_offset counts characters from the start of the completion)."""
        decode = self.model.generation.runtime.decode
        if self.req.kind == CHAT:
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": [{"token": (s := decode([i])), "logprob": lp,
                                                   "bytes": list(s.encode())} for i, lp in t.top]}
                                for t in tokens if not t.eos], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if self.req.logprobs else None,
               "text_offset": []}
        for t in tokens:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(t.logprob)
            out["text_offset"].append(self.offset)
            self.offset += len(t.text)
            if self.req.logprobs:
                out["top_logprobs"].append({decode([i]): lp for i, lp in t.top})
        return out

    # ---- figures ----
    def record(self) -> None:
        """The request's figures, once: a generation record, and for a finished one a request (Triton's
        counters, the telemetry window's count and latency) whose queue is the wait for its turn."""
        if self._recorded:
            return
        self._recorded = True
        run, stats, key = self.run, self.api.stats, (self.model.name, self.model.version)
        outcome, t = run.finish_reason or "cancelled", run.timing
        stats.record_generation(GenerationRecord(
            outcome, prompt_tokens=run.usage.prompt_tokens, completion_tokens=run.usage.completion_tokens,
            ttft_s=t.ttft_s, decode_tokens=t.decode_tokens, decode_s=t.decode_s, queue_depth=run.queue_depth,
            kv_bytes=run.kv_in_use), model=key, slot=self.slot)
        if outcome in ("stop", "length", "failed"):
            self.model.observe(ok=outcome != "failed")  # an update's probation counts generations too
        if outcome in ("stop", "length"):
            input_s = self.admitted - self.t0
            phases = Phases(input_s=input_s, queue_s=max(t.queue_s - input_s, 0.0), infer_s=t.total_s - t.queue_s,
                            output_s=max(time.perf_counter() - self.t0 - t.total_s, 0.0))
            stats.record(phases.infer_s * 1000, model=key, phases=phases, slot=self.slot)
        elif outcome == "failed":
            stats.record(None, ok=False, model=key, slot=self.slot)


def _model_card(name: str, model) -> dict:
    return {"id": name, "object": "model", "created": _created(model.manifest), "owned_by": "edgepack",
            "version": model.version, "context_length": model.generation.context_length}


def _created(manifest) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str((manifest.provenance or {}).get("created"))).timestamp())
    except (TypeError, ValueError):
        return 0


def _line(e: Exception) -> str:
    return str(e).split("\n")[0]


__all__ = ["DONE", "LlmApi", "Streamed", "sse"]
