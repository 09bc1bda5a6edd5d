"""Generation requests from untrusted clients, checked field by field into one typed value:
OpenAI's chat completions and completions, and the KServe v2 generate extension (as Triton serves it).

Anything wrong is an InputError (HTTP 400) naming the field; parameters this agent cannot honour
(penalties, tools, several choices, echo) are refused by name rather than silently ignored.
Unknown OpenAI fields are ignored, as OpenAI-compatible servers do; unknown generate parameters are
refused (the generate extension has no fixed set: a misspelt one would otherwise change nothing)."""
from __future__ import annotations

from dataclasses import dataclass

from device_agent.generative import check_messages, check_stops, check_text
from edgebundle.errors import InputError
from edgebundle.jsonsafe import JsonError, loads

CHAT, COMPLETION, GENERATE = "chat", "completion", "generate"
MAX_DEPTH = 16
MAX_SEED = (1 << 31) - 1  # onnxruntime-genai's seed is an int32

# OpenAI parameters the agent does not implement: accepted only at their neutral value
_NEUTRAL = {"echo": (False,), "best_of": (1,), "suffix": ("",), "presence_penalty": (0, 0.0),
            "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],), "functions": ([],),
            "tool_choice": ("none",), "function_call": ("none",), "response_format": ({"type": "text"},),
            "parallel_tool_calls": (False, True), "service_tier": ("auto", "default"), "store": (False,),
            "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": ()}

# generate-extension parameters (top level or in `parameters`): name -> the field it sets
_GENERATE_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "seed": "seed", "random_seed": "seed", "stop": "stop", "stop_words": "stop",
                    "stream": None, "exclude_input_in_output": "exclude_input", "ignore_eos": None}


@dataclass(frozen=True)
class GenRequest:
    """One generation request, checked. `prompt` is text or token ids (completions, generate);
    `messages` the chat's. `logprobs`: None (none), else how many alternatives per token besides the
    chosen one's log-probability."""

    kind: str
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    exclude_input: bool = True  # generate: text_output without the text_input (Triton's exclude_input_in_output)

    def sampling(self) -> dict:
        """Keyword arguments for GenerativeModel.sampling()."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "logprobs": self.logprobs is not None,
                "top_logprobs": self.logprobs or 0}


def _body(data: bytes) -> dict:
    try:
        body = loads(data or b"", max_depth=MAX_DEPTH)
    except JsonError as e:
        raise InputError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    return body


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise InputError(f"{key} must be an integer {span}, not {_show(v)}")
    return v


def _show(v) -> str:
    return repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."


def _float(body: dict, key: str, lo: float, hi: float, *, open_lo: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if open_lo else lo <= v) or v > hi:
        span = f"above {lo} and at most {hi}" if open_lo else f"from {lo} to {hi}"
        raise InputError(f"{key} must be a number {span}, not {_show(v)}")
    return float(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InputError(f"{key} must be true or false, not {_show(v)}")
    return v


def _model(body: dict) -> str | None:
    m = body.get("model")
    if m is not None and (not isinstance(m, str) or not 0 < len(m) <= 256):
        raise InputError("model must be a model's name (a string)")
    return m


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InputError(f"n must be 1: this agent generates one choice per request, not {_show(n)}")
    for key, neutral in _NEUTRAL.items():
        v = body.get(key)
        if v is not None and v not in neutral:
            raise InputError(f"{key} is not supported by this agent (leave it out"
                             + (f" or send {neutral[0]!r})" if neutral else ")"))


def _common(body: dict, *, kind: str) -> dict:
    """The sampling fields OpenAI's two endpoints share."""
    _refuse_unsupported(body)
    max_tokens = _int(body, "max_tokens", 1)
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict)):
        raise InputError("stream_options is an object, and only with stream: true")
    include_usage = _bool(opts, "include_usage") if opts else False
    top_k = body.get("top_k")
    return {"model": _model(body), "max_tokens": max_tokens, "temperature": _float(body, "temperature", 0, 2),
            "top_p": _float(body, "top_p", 0, 1, open_lo=True),
            "top_k": 0 if top_k == -1 else _int(body, "top_k", 0),  # -1: no cut (vLLM's spelling)
            "seed": _int(body, "seed", 0, MAX_SEED), "stop": check_stops(body.get("stop")), "stream": stream,
            "include_usage": include_usage}


def parse_chat(data: bytes) -> GenRequest:
    """POST /v1/chat/completions."""
    body = _body(data)
    common = _common(body, kind=CHAT)
    messages = check_messages(body.get("messages"))
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20)
    if top and not logprobs:
        raise InputError("top_logprobs needs logprobs: true")
    return GenRequest(kind=CHAT, messages=messages, logprobs=(top or 0) if logprobs else None, **common)


def parse_completion(data: bytes) -> GenRequest:
    """POST /v1/completions: `prompt` is a string or token ids (one prompt: a list holding one of
    either is taken too, as the openai client sends them)."""
    body = _body(data)
    common = _common(body, kind=COMPLETION)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        prompt = check_text(p, "prompt")
    elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        prompt = list(p)
    else:
        raise InputError("prompt must be a string or a list of token ids (one prompt per request)")
    return GenRequest(kind=COMPLETION, prompt=prompt, logprobs=_int(body, "logprobs", 0, 20), **common)


def parse_generate(data: bytes) -> GenRequest:
    """POST /v2/models/NAME/generate(_stream): {"text_input": str, "parameters": {...}}; sampling
    parameters may also sit at the top level, as Triton passes extra fields on to the model."""
    body = _body(data)
    text = body.get("text_input")
    if not isinstance(text, str):
        raise InputError("text_input must be a string (the prompt)")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("parameters must be a JSON object")
    merged = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id", "model")}
    unknown = sorted(set(merged) - set(_GENERATE_PARAMS)) + sorted(set(params) - set(_GENERATE_PARAMS))
    if unknown:
        raise InputError(f"unknown generate parameter(s) {unknown[:8]}; this agent takes {sorted(_GENERATE_PARAMS)}")
    merged.update(params)
    for key, name in _GENERATE_PARAMS.items():
        if name and name != key and key in merged:
            merged[name] = merged.pop(key)
    if _bool(merged, "ignore_eos"):
        raise InputError("ignore_eos is not supported by this agent")
    _bool(merged, "stream")  # the URL decides: generate answers once, generate_stream streams
    exclude = merged.get("exclude_input", True)
    if not isinstance(exclude, bool):
        raise InputError("exclude_input_in_output must be true or false")
    return GenRequest(kind=GENERATE, prompt=check_text(text, "text_input"), max_tokens=_int(merged, "max_tokens", 1),
                      temperature=_float(merged, "temperature", 0, 2),
                      top_p=_float(merged, "top_p", 0, 1, open_lo=True), top_k=_int(merged, "top_k", 0),
                      seed=_int(merged, "seed", 0, MAX_SEED), stop=check_stops(merged.get("stop") or None),
                      exclude_input=exclude)


__all__ = ["CHAT", "COMPLETION", "GENERATE", "GenRequest", "parse_chat", "parse_completion", "parse_generate"]
