"""In-process generation: a genai bundle's decoder, its chat template and defaults, behind a bounded
queue. The HTTP API (device_agent.openai_api) serves through the same object.

    model = load_bundle("tiny-llm-1.0.0-x86-cpu.edgepack")
    out = model.generation.complete("The function returns", max_tokens=16, temperature=0)
    out.text, out.finish_reason, out.usage
    for piece in model.generation.start(model.generation.chat_ids(messages), sampling):  # streamed
        print(piece.text, end="")

One generation runs at a time by default (a decoder uses every core it is given; two at once only
share them); up to `max_queue` more wait their turn in arrival order, and past that `start` raises
QueueFull at once (the API answers 503 with Retry-After). Each generation holds its own KV cache
(prompt + max_tokens positions, allocated when it starts). Text-level stop sequences are cut from
the output; a stream holds back only text that could still become one."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

from edgebundle.errors import InputError, VerificationError
from edgebundle.generation import GenerationDefaults
from edgeruntime.genai import GoldenCheck, Sampling, Token, check_golden
from edgeruntime.text import check_text


class Phase(str, Enum):
    """Where one generation is: queued, holding the model, finished."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"

MAX_STOPS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerationPolicy:
    """How many generations run at once, how many may wait (more: QueueFull), and a pause after each
    generated token (`token_delay_s`: diagnostics and tests only, like profile.diagnostic_delay)."""

    max_queue: int = 8
    concurrency: int = 1
    token_delay_s: float = 0.0


class QueueFull(RuntimeError):
    """Every place in the queue is taken: try again shortly (HTTP 503, Retry-After)."""

    def __init__(self, waiting: int, running: int):
        super().__init__(f"the model is busy: {running} generation(s) running and {waiting} waiting, the most this "
                         "agent queues ([llm] max_queue); retry shortly")
        self.retry_after_s = 1


class GenerationClosed(RuntimeError):
    """The model was swapped out and is closing; the caller should take the current one."""


@dataclass(frozen=True)
class Piece:
    """A stretch of output text and the tokens it came from (a token whose text was cut by a stop
    sequence is in no piece; one still completing a character waits for the next piece)."""

    text: str
    tokens: tuple[Token, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # every token generated, the end-of-text token and any cut by a stop sequence included

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Timing:
    """Seconds from the request's arrival: waiting for its turn (`queue_s`), to its first token
    (`ttft_s`, queue and prefill included: what a client sees), and decoding the rest (`decode_s`
    for `decode_tokens` tokens after the first)."""

    queue_s: float = 0.0
    ttft_s: float | None = None
    decode_s: float = 0.0
    decode_tokens: int = 0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[Token, ...]  # those behind `text` (logprobs)
    finish_reason: str  # "stop" (end of text or a stop sequence), "length" (max_tokens) or "cancelled"
    usage: Usage
    timing: Timing


def check_messages(messages) -> list[dict]:
    """Chat messages as the template takes them: [{"role": str, "content": str}]; OpenAI's content parts
    ([{"type": "text", "text": ...}]) are joined. InputError names the first bad field."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InputError(f"{where} must be an object with role and content, not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not 0 < len(role) <= 64:
            raise InputError(f"{where}.role must be a string of 1-64 characters (system, user, assistant, ...)")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InputError(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are served")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise InputError(f"{where}.content must be a string (or a list of text parts), not "
                             f"{'missing' if content is None else type(content).__name__}")
        out.append({"role": check_text(role, f"{where}.role"), "content": check_text(content, f"{where}.content")})
    return out


def check_stops(stop) -> tuple[str, ...]:
    """`stop`: None, a string or a list of strings (at most MAX_STOPS, none empty)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise InputError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters")
    return tuple(check_text(s, "stop") for s in stops)


class StopText:
    """Text-level stop sequences over streamed text: `feed` returns what may go out now and whether a
    stop sequence was met (its text and everything after it never goes out)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = tuple(s for s in stops if s), ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0  # the longest tail of buf that could still grow into a stop sequence
        for s in self.stops:
            keep = max(keep, next((k for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])), 0))
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Generation:
    """One admitted request. Iterate it for Pieces; `finish_reason`, `usage` and `timing` are set when
    it ends. `close()` gives its place back (it runs by itself when the iteration ends or is closed;
    call it for a generation that is never iterated)."""

    def __init__(self, owner: "GenerativeModel", prompt_ids: list[int], sampling: Sampling, *,
                 stops: tuple[str, ...], cancelled: Callable[[], bool], policy: GenerationPolicy, arrived: float):
        self.owner, self.prompt_ids, self.sampling, self.stops = owner, list(prompt_ids), sampling, stops
        self.cancelled_by_client, self.policy, self.arrived = cancelled, policy, arrived
        self.kv_bytes = owner.runtime.kv_positions(len(prompt_ids) + sampling.max_tokens) * owner.kv_bytes_per_token
        self.queue_depth = 0  # requests waiting (this one included) when it was admitted
        self.kv_in_use = 0  # KV-cache bytes of every running generation once this one started
        self.state = Phase.WAITING  # -> RUNNING -> DONE
        self.finish_reason: str | None = None
        self.usage = Usage(len(prompt_ids), 0)
        self.timing = Timing()
        self._iter: Iterator[Piece] | None = None

    def __iter__(self) -> Iterator[Piece]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def result(self) -> Completion:
        pieces = list(self)
        return Completion("".join(p.text for p in pieces), tuple(t for p in pieces for t in p.tokens),
                          self.finish_reason or "cancelled", self.usage, self.timing)

    def _stopped(self) -> bool:
        return self.owner._abort or self.cancelled_by_client()

    def _run(self) -> Iterator[Piece]:
        try:
            if not self.owner._turn(self):
                self.finish_reason = "cancelled"
                return
            yield from self._decode(time.perf_counter())
        finally:
            self._release()

    def _decode(self, started: float) -> Iterator[Piece]:
        stop, made, marks, sent, n = StopText(self.stops), 0, [], 0, 0  # made, sent: characters
        first = last = None
        delay, cut = self.policy.token_delay_s, False
        try:
            for tok in self.owner.runtime.generate(self.prompt_ids, self.sampling, cancelled=self._stopped):
                last = time.perf_counter()
                first = first or last
                n += 1
                if tok.eos:
                    self.finish_reason = "stop"
                    break
                marks.append((made, tok))  # where its text starts
                made += len(tok.text)
                emit, cut = stop.feed(tok.text)
                if emit or cut:
                    sent += len(emit)
                    mine = tuple(t for off, t in marks if off < sent)
                    marks = [(off, t) for off, t in marks if off >= sent]
                    if emit:
                        yield Piece(emit, mine)
                if cut:
                    self.finish_reason = "stop"
                    break
                if delay and n < self.sampling.max_tokens:
                    time.sleep(delay)
            if not cut:
                rest = stop.flush()
                if rest or marks:
                    yield Piece(rest, tuple(t for _, t in marks))
            if self.finish_reason is None:
                self.finish_reason = "cancelled" if self._stopped() else "length"
        except GeneratorExit:  # the consumer stopped reading (a client gone)
            self.finish_reason = self.finish_reason or "cancelled"
            raise
        except BaseException:
            self.finish_reason = "failed"
            raise
        finally:
            self.usage = Usage(len(self.prompt_ids), n)
            end = time.perf_counter()
            self.timing = Timing(queue_s=started - self.arrived, ttft_s=None if first is None else first - self.arrived,
                                 decode_s=(last - first) if first is not None else 0.0, decode_tokens=max(n - 1, 0),
                                 total_s=end - self.arrived)

    def close(self) -> None:
        """Stop it (a consumer that stops reading) and give its place back; nothing once it ended.
        Call it from the thread that iterates."""
        if self._iter is not None:
            self._iter.close()
        self._release()

    def _release(self) -> None:
        if self.state is not Phase.DONE:
            self.owner._leave(self)


class GenerativeModel:
    """A loaded genai bundle's generation side (Model.generation). Thread-safe: requests queue here."""

    def __init__(self, runtime, *, template: str | None, defaults: GenerationDefaults, context_length: int,
                 kv_bytes_per_token: int, policy: GenerationPolicy = GenerationPolicy()):
        self.runtime, self.template, self.defaults, self.policy = runtime, template, defaults, policy
        self.context_length = int(context_length or runtime.context_length)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._running = 0
        self._kv = 0
        self._closing = False
        self._abort = False  # closing past its drain time: running generations stop between tokens
        self.totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "queue_full": 0}

    # ---- gauges ----
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @property
    def active(self) -> int:
        """Generations admitted and not finished (waiting or running)."""
        return len(self._waiting) + self._running

    @property
    def kv_cache_bytes(self) -> int:
        """KV cache held by the running generations (each allocates prompt + max_tokens positions)."""
        return self._kv

    # ---- prompts ----
    def encode(self, text: str) -> list[int]:
        return self.runtime.encode(check_text(text, "the prompt"))

    def chat_ids(self, messages) -> list[int]:
        """Token ids of chat `messages` through the bundle's chat template (InputError without one)."""
        msgs = check_messages(messages)
        if not self.template:
            raise InputError("this model has no chat template; send a plain prompt to /v1/completions")
        return self.runtime.encode(self.runtime.chat_prompt(msgs, self.template), special=False)

    def check_ids(self, ids) -> list[int]:
        vocab = self.runtime.outputs[0].shape[-1] if self.runtime.outputs else -1
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i and (vocab < 0 or i < vocab) for i in ids):
            raise InputError(f"a prompt of token ids must be a non-empty list of integers in 0..{vocab - 1}")
        return list(ids)

    def sampling(self, *, prompt_tokens: int, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 logprobs: bool = False, top_logprobs: int = 0) -> Sampling:
        """A request's settings over the bundle's defaults. Without max_tokens, the default, shortened to
        what the context has left; an explicit max_tokens past the context is an InputError naming the
        counts, as is a prompt that leaves no room at all."""
        d, room = self.defaults, self.context_length - prompt_tokens
        if prompt_tokens < 1:
            raise InputError("the prompt is empty")
        if room < 1 and self.context_length:
            raise InputError(f"the prompt is {prompt_tokens} tokens; the model's context is {self.context_length} "
                             "tokens, which leaves no room for a completion")
        if max_tokens is None:
            max_tokens = min(d.max_tokens, room) if self.context_length else d.max_tokens
        elif self.context_length and prompt_tokens + max_tokens > self.context_length:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                             f"{prompt_tokens + max_tokens} tokens, more than the model's context of "
                             f"{self.context_length}; shorten the prompt or ask for at most {room} tokens")
        return Sampling(max_tokens=max_tokens, temperature=d.temperature if temperature is None else temperature,
                        top_p=d.top_p if top_p is None else top_p, top_k=d.top_k if top_k is None else top_k,
                        seed=seed, logprobs=bool(logprobs or top_logprobs), top_logprobs=top_logprobs).check()

    # ---- generation ----
    def start(self, prompt_ids: list[int], sampling: Sampling, *, stop=None,
              cancelled: Callable[[], bool] = lambda: False, policy: GenerationPolicy | None = None,
              arrived: float | None = None) -> Generation:
        """Admit one generation (QueueFull when every place is taken, GenerationClosed when this model is
        closing); it runs as it is iterated. `cancelled` is polled while it waits and between tokens."""
        policy = policy or self.policy
        gen = Generation(self, prompt_ids, sampling.check(), stops=check_stops(stop), cancelled=cancelled,
                         policy=policy, arrived=time.perf_counter() if arrived is None else arrived)
        with self._cond:
            if self._closing:
                raise GenerationClosed("the model is being replaced")
            free = self._running < policy.concurrency and not self._waiting
            if not free and len(self._waiting) >= policy.max_queue:
                self.totals["queue_full"] += 1
                raise QueueFull(len(self._waiting), self._running)
            self._waiting.append(gen)
            gen.queue_depth = len(self._waiting)
            self.totals["requests"] += 1
        return gen

    def complete(self, prompt: str | list[int], *, stop=None, **sampling) -> Completion:
        """Generate after `prompt` (text, or token ids) and wait for the whole text."""
        ids = self.check_ids(prompt) if isinstance(prompt, list) else self.encode(prompt)
        return self.start(ids, self.sampling(prompt_tokens=len(ids), **sampling), stop=stop).result()

    def chat(self, messages, *, stop=None, **sampling) -> Completion:
        """The assistant's answer to chat `messages` through the bundle's chat template."""
        ids = self.chat_ids(messages)
        return self.start(ids, self.sampling(prompt_tokens=len(ids), **sampling), stop=stop).result()

    def _turn(self, gen: Generation) -> bool:
        """Wait until `gen` is first in line and a place runs free; False: cancelled meanwhile."""
        while True:
            with self._cond:
                if self._waiting and self._waiting[0] is gen and self._running < gen.policy.concurrency:
                    self._waiting.popleft()
                    self._running += 1
                    self._kv += gen.kv_bytes
                    gen.kv_in_use, gen.state = self._kv, Phase.RUNNING
                    self._cond.notify_all()
                    return True
                self._cond.wait(0.1)
            if gen._stopped():
                return False

    def _leave(self, gen: Generation) -> None:
        with self._cond:
            if gen.state is Phase.RUNNING:
                self._running -= 1
                self._kv -= gen.kv_bytes
                self.totals["prompt_tokens"] += gen.usage.prompt_tokens
                self.totals["completion_tokens"] += gen.usage.completion_tokens
            elif gen in self._waiting:
                self._waiting.remove(gen)
            gen.state = Phase.DONE
            self._cond.notify_all()

    def close(self, *, drain_s: float = 60.0) -> None:
        """Take no new generation; let those admitted finish (at most `drain_s`, then stop them between
        tokens). The caller closes the runtime after."""
        deadline = time.monotonic() + drain_s
        with self._cond:
            self._closing = True
            while self.active and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._abort = True
            stop = time.monotonic() + 5.0
            while self.active and time.monotonic() < stop:
                self._cond.wait(0.1)


def load_generative(runtime, manifest, model_dir: Path, bundle_name: str, *, check: bool = True,
                    pause: Callable[[], None] | None = None) -> GenerativeModel:
    """The generation side of a loaded genai bundle. `check`: its golden prompts first (the tokenizer
    must give the build's prompt ids, and teacher-forced next tokens must agree as often as the
    bundle asks), else VerificationError, as a tensor bundle's golden outputs."""
    g = manifest.generation
    template = (Path(model_dir) / g["chat_template"]).read_text(encoding="utf-8") if g.get("chat_template") else None
    model = GenerativeModel(runtime, template=template, defaults=GenerationDefaults.from_dict(g.get("defaults") or {}),
                            context_length=int(g.get("context_length") or 0),
                            kv_bytes_per_token=int(g.get("kv_bytes_per_token") or 0))
    if check:
        verify_golden(runtime, g, bundle_name, pause=pause)
    return model


def adapted_generation(base: GenerativeModel, view, manifest, bundle_name: str, *, check: bool = True,
                       pause: Callable[[], None] | None = None) -> GenerativeModel:
    """The generation side of a LoRA adapter bundle: `view` (the base's runtime through the adapter) with the
    base's chat template, defaults and sizes, and a queue of its own. `check`: the adapter's golden prompts
    (the adapted greedy tokens of the build host) as a bundle's own."""
    model = GenerativeModel(view, template=base.template, defaults=base.defaults, context_length=base.context_length,
                            kv_bytes_per_token=base.kv_bytes_per_token, policy=base.policy)
    if check:
        verify_golden(view, manifest.adapter, bundle_name, pause=pause)
    return model


def verify_golden(runtime, generation: dict, bundle_name: str, *, pause: Callable[[], None] | None = None) -> GoldenCheck:
    golden, needed = generation.get("golden") or [], float(generation.get("golden_agreement", 1.0))
    drifted = []
    for i, g in enumerate(golden):
        got = runtime.encode(g["prompt"])
        if got != list(g["prompt_ids"]):
            drifted.append(f"golden prompt {i} {g['prompt'][:40]!r}: this device's tokenizer gives {got[:12]}, the "
                           f"build's {list(g['prompt_ids'])[:12]}")
    if drifted:
        raise VerificationError(f"{bundle_name}: this device's tokenizer does not reproduce the bundle's golden prompt "
                                f"ids ({len(drifted)} of {len(golden)} prompts differ)", problems=drifted,
                                hint="install the onnxruntime-genai version the bundle was built with (see its "
                                     "provenance), or rebuild the bundle")
    hits = total = 0
    failures: list[str] = []
    for i, g in enumerate(golden):
        if pause:
            pause()
        res = check_golden(runtime, [g], needed)
        hits += round(res.agreement * res.positions)
        total += res.positions
        failures += [f.replace("golden prompt 0", f"golden prompt {i}") for f in res.failures]
    res = GoldenCheck(hits / total if total else 1.0, needed, total, tuple(failures))
    if not res.ok:
        raise VerificationError(f"{bundle_name}: golden prompts agree on {res.agreement:.1%} of {total} next tokens, "
                                f"fewer than the {needed:.0%} the bundle needs", problems=list(failures),
                                hint="the model does not compute what it computed at build time on this runtime; "
                                     "check the onnxruntime-genai version (the bundle's provenance), or rebuild")
    return res


__all__ = ["Completion", "Generation", "GenerationClosed", "GenerationPolicy", "GenerativeModel", "Piece",
           "QueueFull", "StopText", "Timing", "Usage", "adapted_generation", "check_messages", "check_stops", "check_text", "load_generative",
           "verify_golden"]
