"""Generative decoders: an ONNX Runtime GenAI folder (model.onnx + external weights, genai_config.json,
tokenizer) behind the runtime adapter. `run` gives teacher-forced logits (golden checks, shadow);
`generate` streams tokens for one request. One Model serves every request; each request has its own
Generator (its own KV cache of at most prompt + max_tokens positions).

A base with LoRA slots takes adapters (onnxruntime adapter files): `load_adapter` beside the base,
`activate` one for the requests that start from then on (a generator keeps the adapter it started
with), `unload_adapter` when no generator uses it any more. Every method runs the active adapter
unless told another (`adapter=NAME`, or None for the bare base)."""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from edgeruntime.base import LoadSpec, Runtime, TensorInfo
from edgebundle.errors import InputError, RuntimeUnavailableError

_CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (OpenAI's names). temperature 0 is greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: this many most likely alternatives per position (OpenAI's)

    def check(self) -> "Sampling":
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise InputError(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        if not (0 <= self.temperature <= 2):
            raise InputError(f"temperature must be between 0 and 2, not {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"top_k must be a non-negative integer, not {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 31):
            raise InputError(f"seed must be an integer from 0 to {(1 << 31) - 1}, not {self.seed!r}")  # og: int32
        if not (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20):
            raise InputError(f"top_logprobs must be an integer from 0 to 20, not {self.top_logprobs!r}")
        return self


@dataclass(frozen=True)
class Token:
    """One generated token: its id, the text it completes (may be "" while a multi-byte character is
    still open), its log-probability under the model when asked for, and whether it ends the text."""

    id: int
    text: str
    logprob: float | None = None
    eos: bool = False
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob) of the most likely tokens, when asked for


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise RuntimeUnavailableError("onnxruntime-genai is not installed",
                                      hint="pip install 'edgepack[agent-llm]' (onnxruntime-genai)") from None
    return og


def _special_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer adds before a text when asked for special tokens (onnxruntime-genai 0.18's
    encode adds none by default, and Gemma without its <bos> degenerates: "France is France. The The")."""
    plain = [int(i) for i in tokenizer.encode("a")]
    try:
        tokenizer.update_options(add_special_tokens="true")
        full = [int(i) for i in tokenizer.encode("a")]
    except Exception:  # an older onnxruntime-genai without the option: no prefix known
        return ()
    finally:
        try:
            tokenizer.update_options(add_special_tokens="false")
        except Exception:
            pass
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    return tuple(full[:at]) if at else ()


def _log_softmax_at(logits: np.ndarray, i: int) -> float:
    x = logits.astype(np.float64).ravel()
    m = x.max()
    return float(x[i] - m - math.log(np.exp(x - m).sum()))


def _top(logits: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely token ids and their log-probabilities, most likely first."""
    x = logits.astype(np.float64).ravel()
    lp = x - x.max()
    lp -= math.log(np.exp(lp).sum())
    best = np.argpartition(-lp, n - 1)[:n]
    return tuple((int(i), float(lp[i])) for i in best[np.argsort(-lp[best], kind="stable")])


class _Active:
    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()  # `adapter=` default: the runtime's active adapter (None: the bare base)


@dataclass
class GenAIRuntime(Runtime):
    folder: str = ""
    context_length: int = 0
    eos_ids: tuple[int, ...] = ()
    window: int = 0  # sliding-window attention: the KV cache must hold at least this many positions
    prefix: tuple[int, ...] = ()  # the special tokens the tokenizer puts before a text (e.g. <bos>)
    active_adapter: str | None = None  # what requests run from now on (activate)
    _model: object = None
    _tokenizer: object = None
    _adapters: object = None  # og.Adapters, made at the first load_adapter
    _loaded: set = field(default_factory=set)
    _retired: set = field(default_factory=set)  # unloaded while a generator still used them: freed later
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _leases: int = 0  # AdapterViews over this runtime: it is freed when the last one and its owner let go
    _close_wanted: bool = False
    _views: int = 0  # adapter views made so far (their adapters' names are numbered)

    @classmethod
    def load(cls, path: str, spec: LoadSpec | None = None) -> "GenAIRuntime":
        """`path`: the decoder's model.onnx (its folder holds genai_config.json and the tokenizer)."""
        spec = spec or LoadSpec(format="genai")
        og = _og()
        folder = os.path.dirname(os.path.abspath(path))
        config = og.Config(folder)
        if spec.threads:  # the bundle's thread count: more threads than cores is noise, not speed
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(spec.threads), "inter_op_num_threads": 1}}}}))
        device = "cpu"
        config.clear_providers()
        if _CUDA in spec.providers:
            if og.is_cuda_available():
                config.append_provider("cuda")
                device = "cuda"
            elif not spec.allow_cpu_fallback:
                raise RuntimeUnavailableError("this bundle runs on CUDA and onnxruntime-genai has no CUDA here",
                                              hint="install onnxruntime-genai-cuda, or allow the CPU fallback")
        try:
            model = og.Model(config)
            tokenizer = og.Tokenizer(model)
            prefix = _special_prefix(tokenizer)
        except Exception as e:  # og raises plain RuntimeError for every load failure
            raise RuntimeUnavailableError(f"onnxruntime-genai cannot load {folder}: {e}") from None
        with open(os.path.join(folder, "genai_config.json")) as f:
            gc = json.load(f)["model"]
        eos = gc.get("eos_token_id", [])
        eos = tuple(eos if isinstance(eos, list) else [eos])
        vocab = int(gc.get("vocab_size", -1))
        window = int((gc.get("decoder", {}).get("sliding_window") or {}).get("window_size", 0))
        return cls(
            inputs=(TensorInfo("input_ids", (1, -1), "int64"),),
            outputs=(TensorInfo("logits", (1, -1, vocab), "float32"),),
            details={"runtime": "onnxruntime-genai", "version": og.__version__, "device": device,
                     "provider": "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"},
            folder=folder, context_length=int(gc.get("context_length", 0)), eos_ids=eos, window=window, prefix=prefix,
            _model=model, _tokenizer=tokenizer)

    def kv_positions(self, n: int) -> int:
        """KV-cache positions a generator for a sequence of n tokens allocates (a sliding window needs
        its whole window)."""
        n = max(n, self.window)
        return min(n, self.context_length) if self.context_length else n

    # ---- LoRA adapters ----
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(sorted(self._loaded))

    def load_adapter(self, path: str, name: str) -> None:
        """Load an adapter file beside the base under `name` (not yet active). A file whose weights are
        not this base's slots is refused here (RuntimeUnavailableError)."""
        og = _og()
        with self._lock:
            self._reap()
            if name in self._loaded:
                raise InputError(f"an adapter named {name!r} is already loaded")
            if self._adapters is None:
                self._adapters = og.Adapters(self._model)
            try:
                self._adapters.load(str(path), name)
            except Exception as e:  # og raises RuntimeError for a bad file or parameters the model lacks
                raise RuntimeUnavailableError(f"onnxruntime-genai cannot load adapter {path}: {e}") from None
            self._loaded.add(name)

    def activate(self, name: str | None) -> str | None:
        """Requests that start from now on run adapter `name` (None: the bare base); returns the one they
        ran before. Generations already running keep theirs."""
        with self._lock:
            if name is not None and name not in self._loaded:
                raise InputError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
            previous, self.active_adapter = self.active_adapter, name
            return previous

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` (never the active one); its memory is freed once no running generator uses it."""
        with self._lock:
            if name == self.active_adapter:
                raise InputError(f"adapter {name!r} is active; activate another (or None) first")
            if name in self._loaded:
                self._loaded.discard(name)
                self._retired.add(name)
            self._reap()

    def _reap(self) -> None:
        for name in list(self._retired):
            try:
                self._adapters.unload(name)
            except Exception:  # noqa: BLE001  og: "Adapter still in use" while a generator holds it; next time
                continue
            self._retired.discard(name)

    def _generator(self, params, adapter):
        """A generator running `adapter` (ACTIVE: the active one; None: the bare base)."""
        og = _og()
        with self._lock:
            name = self.active_adapter if adapter is ACTIVE else adapter
            gen = og.Generator(self._model, params)
            if name is not None:
                if name not in self._loaded:
                    raise InputError(f"no adapter named {name!r} is loaded")
                gen.set_active_adapter(self._adapters, name)
            return gen

    # ---- text ----
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; `special`: with the tokens the model's tokenizer puts around a text (Gemma's
        and Llama's <bos>), as transformers does for a plain prompt. A chat template writes its own, so a
        rendered chat prompt is encoded with special=False (transformers' apply_chat_template does so too)."""
        if not isinstance(text, str):
            raise InputError(f"a prompt is text, not {type(text).__name__}")
        try:
            ids = [int(i) for i in self._tokenizer.encode(text)]
        except Exception as e:  # a lone surrogate, or text the tokenizer cannot take
            raise InputError(f"the tokenizer refuses this text: {e}") from None
        return [*self.prefix, *ids] if special else ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(np.asarray(list(ids), np.int32)) if len(ids) else ""

    def chat_prompt(self, messages: list[dict], template: str | None) -> str:
        """The prompt text for chat `messages` through the bundle's chat template."""
        if not template:
            raise InputError("this model has no chat template; send a plain prompt to /v1/completions")
        try:
            return self._tokenizer.apply_chat_template(json.dumps(messages), template_str=template,
                                                       add_generation_prompt=True)
        except Exception as e:
            raise InputError(f"the chat template cannot render these messages: {e}") from None

    # ---- generation ----
    def generate(self, prompt_ids: list[int], sampling: Sampling,
                 cancelled: Callable[[], bool] = lambda: False, *, adapter=ACTIVE) -> Iterator[Token]:
        """Stream up to `sampling.max_tokens` tokens after `prompt_ids`; stops at an end-of-text token
        (yielded with eos=True and text "") or as soon as `cancelled()` is true between two tokens.
        `adapter`: the LoRA adapter it runs (default: the active one, fixed when the generation starts)."""
        og = _og()
        sampling.check()
        if not prompt_ids:
            raise InputError("the prompt is empty")
        total = len(prompt_ids) + sampling.max_tokens
        if self.context_length and total > self.context_length:
            raise InputError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} "
                             f"tokens, more than the model's context of {self.context_length}")
        params = og.GeneratorParams(self._model)
        opts = {"max_length": self.kv_positions(total), "do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            opts.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                        top_k=int(sampling.top_k) or 0)
        if sampling.seed is not None:
            opts["random_seed"] = int(sampling.seed)
        params.set_search_options(**opts)
        gen = self._generator(params, adapter)
        stream = self._tokenizer.create_stream()
        try:
            gen.append_tokens(np.asarray(prompt_ids, np.int32))
            for _ in range(sampling.max_tokens):
                if cancelled() or gen.is_done():
                    return
                logits = gen.get_logits() if sampling.logprobs else None
                gen.generate_next_token()
                tid = int(gen.get_next_tokens()[0])
                lp = _log_softmax_at(logits, tid) if logits is not None else None
                top = _top(logits, sampling.top_logprobs) if logits is not None and sampling.top_logprobs else ()
                if tid in self.eos_ids:
                    yield Token(tid, "", lp, eos=True, top=top)
                    return
                yield Token(tid, stream.decode(tid), lp, top=top)
        finally:
            del gen

    def greedy(self, prompt_ids: list[int], n: int, *, adapter=ACTIVE) -> list[int]:
        return [t.id for t in self.generate(prompt_ids, Sampling(max_tokens=n), adapter=adapter)]

    def logits(self, ids: list[int], *, adapter=ACTIVE) -> np.ndarray:
        """Logits [T, vocab] at every position of `ids`, in one prefill (teacher forcing)."""
        og = _og()
        if not len(ids):
            raise InputError("no tokens")
        if self.context_length and len(ids) > self.context_length:
            raise InputError(f"{len(ids)} tokens, more than the model's context of {self.context_length}")
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self.kv_positions(len(ids) + 1), do_sample=False)
        try:
            gen = self._generator(params, adapter)
            gen.append_tokens(np.asarray(ids, np.int32))
            out = np.asarray(gen.get_output("logits"), np.float32)
        except RuntimeError as e:  # a kernel this machine's onnxruntime lacks, or out of memory
            raise RuntimeUnavailableError(f"onnxruntime-genai cannot run this model here: "
                                          f"{str(e).splitlines()[0][:200]}") from None
        return out.reshape(-1, out.shape[-1])[-len(ids):]

    def teacher_forced(self, prompt_ids: list[int], continuation: list[int], *, adapter=ACTIVE) -> list[int]:
        """The model's argmax at each position of `continuation` given everything before it."""
        seq = list(prompt_ids) + list(continuation)
        top = self.logits(seq[:-1], adapter=adapter).argmax(-1)
        return [int(i) for i in top[len(prompt_ids) - 1:]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Teacher-forced logits for input_ids [1, T]."""
        ids = np.asarray(feeds["input_ids"]).reshape(-1)
        return {"logits": self.logits([int(i) for i in ids])[None]}

    def sample_inputs(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray([self.encode("Hello")], np.int64)}

    def with_adapter(self, path: str, name: str) -> "AdapterView":
        """This base seen through adapter file `path` (loaded here as `name` and a number: the same file may
        be open twice, for a model serving and one staged): a runtime of its own for whoever serves the
        adapted model, sharing the base's weights; closing it unloads the adapter."""
        with self._lock:
            self._views += 1
            n = self._views
        return AdapterView(self, path, f"{name}#{n}")

    def _lease(self) -> None:
        with self._lock:
            if self._model is None:
                raise RuntimeUnavailableError("the base model is closed")
            self._leases += 1

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            if self._close_wanted and self._leases <= 0:
                self._free()

    def close(self) -> None:
        """Release the model; while adapter views still run on it, once the last of them is closed."""
        with self._lock:
            self._close_wanted = True
            if self._leases <= 0:
                self._free()

    def _free(self) -> None:
        self._model = self._tokenizer = self._adapters = None


class AdapterView:
    """A GenAIRuntime seen through one LoRA adapter: every generation, teacher-forced run and golden check
    runs the adapter (whatever `adapter=` says); everything else (tokenizer, context, KV sizes, inputs,
    outputs) is the base's. The base stays loaded while a view of it is open, even once its own owner
    closed it; closing the view unloads the adapter (freed when its last generation ends)."""

    def __init__(self, base: GenAIRuntime, path: str, name: str):
        base._lease()
        try:
            base.load_adapter(path, name)
        except BaseException:
            base._release()
            raise
        self.base, self.adapter, self._closed = base, name, False
        self.details = {**base.details, "adapter": name}

    def __getattr__(self, attr):
        return getattr(self.base, attr)

    def generate(self, prompt_ids: list[int], sampling: Sampling, cancelled: Callable[[], bool] = lambda: False,
                 *, adapter=ACTIVE) -> Iterator[Token]:
        return self.base.generate(prompt_ids, sampling, cancelled, adapter=self.adapter)

    def greedy(self, prompt_ids: list[int], n: int, *, adapter=ACTIVE) -> list[int]:
        return self.base.greedy(prompt_ids, n, adapter=self.adapter)

    def logits(self, ids: list[int], *, adapter=ACTIVE) -> np.ndarray:
        return self.base.logits(ids, adapter=self.adapter)

    def teacher_forced(self, prompt_ids: list[int], continuation: list[int], *, adapter=ACTIVE) -> list[int]:
        return self.base.teacher_forced(prompt_ids, continuation, adapter=self.adapter)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(feeds["input_ids"]).reshape(-1)
        return {"logits": self.logits([int(i) for i in ids])[None]}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.base._model is not None:
                self.base.unload_adapter(self.adapter)
        finally:
            self.base._release()


@dataclass(frozen=True)
class GoldenCheck:
    agreement: float  # fraction of golden positions whose teacher-forced argmax is the stored token
    needed: float
    positions: int
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.agreement >= self.needed


def check_golden(rt: GenAIRuntime, golden: list[dict], needed: float, *, adapter: str | None = None) -> GoldenCheck:
    """Re-run the bundle's golden prompts teacher-forced on the build's greedy tokens: a device whose
    kernels differ in rounding may break a near-tie, so it is the share of positions that counts.
    `adapter`: a loaded LoRA adapter's name, for an adapter bundle's golden prompts (None: the base)."""
    hits = total = 0
    failures = []
    for i, g in enumerate(golden):
        got = rt.teacher_forced(g["prompt_ids"], g["ids"], adapter=adapter)
        same = sum(a == b for a, b in zip(got, g["ids"]))
        hits, total = hits + same, total + len(g["ids"])
        if same < len(g["ids"]):
            failures.append(f"golden prompt {i}: {same}/{len(g['ids'])} tokens agree")
    return GoldenCheck(hits / total if total else 1.0, needed, total, tuple(failures))
