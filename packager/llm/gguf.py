"""A GGUF file (llama.cpp's format) as a source: turned into a Hugging Face causal-LM folder (fp32
safetensors, tokenizer.json, chat template, generation_config.json) that the model builder exports and
that torch runs as the float reference.

The header is read here, in the build's own process, by a small reader that skips the big arrays
(gguf's GGUFReader takes 24 s and 700 MB on Gemma 3 270M's 262k-token vocabulary): a file that is not a
GGUF, is truncated or carries no tokenizer is refused at once. Dequantizing is transformers' job
(`from_pretrained(dir, gguf_file=...)`), done in a child process (`python -m packager.llm.gguf GGUF OUT`)
so that torch is never imported by the build. transformers refuses `save_pretrained` on a model it
loaded from GGUF ("quantized with gguf and is not serializable"), so the child builds a fresh model from
the loaded config and hands it the dequantized state dict."""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgebundle.errors import ConversionError, InputError, RuntimeUnavailableError

CHILD_TIMEOUT_S = 3600
_FACTS = "EDGEPACK-FACTS "
_REFUSED = "EDGEPACK-REFUSED "  # the child found the input unusable: the parent raises InputError


@dataclass(frozen=True)
class GgufSource:
    """A GGUF turned into a folder, with the facts a build report states about it."""

    folder: Path
    gguf: Path
    architecture: str  # GGUF's general.architecture, e.g. "gemma3"
    model_class: str  # what transformers built, e.g. "Gemma3ForCausalLM"
    parameters: int  # tied weights counted once
    file_type: str  # the file's declared quantization mix, e.g. "Q4_K_M" ("" when not stated)
    tensor_types: tuple[tuple[str, int], ...]  # (ggml type, tensors of that type), most common first
    context_length: int
    eos_token_ids: tuple[int, ...]
    chat_template: bool  # the GGUF carried tokenizer.chat_template (written as chat_template.jinja)
    seconds: float  # the child: load, dequantize, save
    peak_rss_bytes: int  # the child's peak resident memory
    folder_bytes: int


# ---- the header, read without the gguf package's reader ----

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this (the vocabulary, its scores) are skipped, their length kept


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class _Tensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Header:
    """What a GGUF says about itself: metadata (long arrays as their lengths) and its tensors."""

    version: int
    metadata: dict
    tensors: tuple[_Tensor, ...]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.take("<Q")
        self.pos += n
        if self.pos > self.size:
            raise _Truncated

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if n > _KEEP_ARRAY:
                if itype == _STRING:
                    for _ in range(n):
                        self.skip_string()
                elif itype in _SCALARS:
                    self.pos += n * struct.calcsize(_SCALARS[itype])
                    if self.pos > self.size:
                        raise _Truncated
                else:
                    raise ValueError(f"an array of value type {itype}")
                return _Skipped(n)
            return [self.value(itype) for _ in range(n)]
        raise ValueError(f"unknown value type {vtype}")


@dataclass(frozen=True)
class _Skipped:
    length: int


def read_header(path: Path) -> Header:
    """The header of the GGUF at `path`; InputError when it is not one or is cut short."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')",
                             hint="give a .gguf model file (llama.cpp's format), or a Hugging Face model folder")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, _Cursor(buf, size))
            except _Truncated:
                raise InputError(f"{path} is truncated: its header runs past the end of the file ({size} bytes)",
                                 hint="download or assemble the file again and check its sha256") from None
            except (ValueError, UnicodeDecodeError, OverflowError) as e:
                raise InputError(f"{path} is not a readable GGUF file: {e}") from None


def _parse(path: Path, c: _Cursor) -> Header:
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise InputError(f"{path} is GGUF version {version}; version 2 and 3 files are read",
                         hint="convert it again with a current llama.cpp (convert_hf_to_gguf.py)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        tensors.append(_Tensor(name, c.take("<I"), dims, c.take("<Q")))
    align = int(metadata.get("general.alignment", 32))
    data_offset = (c.pos + align - 1) // align * align
    header = Header(version, metadata, tuple(tensors), data_offset)
    end = data_offset + max((t.offset + _nbytes(t) for t in tensors), default=0)
    if end > c.size:
        raise InputError(f"{path} is truncated: its tensors need {end} bytes, the file has {c.size}",
                         hint="download or assemble the file again and check its sha256")
    return header


def _gguf_constants():
    try:
        from gguf import constants
    except ImportError:
        raise RuntimeUnavailableError("reading GGUF files needs the gguf package",
                                      hint="pip install 'edgepack[gguf]'") from None
    return constants


def _nbytes(t: _Tensor) -> int:
    k = _gguf_constants()
    try:
        block, size = k.GGML_QUANT_SIZES[k.GGMLQuantizationType(t.ggml_type)]
    except (ValueError, KeyError):
        raise InputError(f"tensor {t.name} has ggml type {t.ggml_type}, which this gguf package does not know",
                         hint="pip install --upgrade gguf") from None
    n = 1
    for d in t.shape:
        n *= d
    return n // block * size


def quantization(header: Header) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(the declared file type, e.g. "Q4_K_M", or ""; tensors per ggml type, most common first)."""
    k = _gguf_constants()
    counts = Counter(k.GGMLQuantizationType(t.ggml_type).name for t in header.tensors)
    file_type = ""
    if "general.file_type" in header.metadata:
        try:
            file_type = k.LlamaFileType(int(header.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = f"file type {header.metadata['general.file_type']}"
    return file_type, tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def eos_ids(header: Header) -> tuple[int, ...]:
    """End-of-text ids: eos, and end-of-turn / end-of-message where the file names them."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [int(header.metadata[k]) for k in keys if k in header.metadata]
    return tuple(dict.fromkeys(ids))


# ---- the conversion ----

def to_folder(gguf: Path, out: Path) -> GgufSource:
    """Turn the GGUF `gguf` into a Hugging Face causal-LM folder `out` (replaced), its weights dequantized
    to fp32, in a child process. InputError for a file that is not a usable GGUF."""
    gguf, out = Path(gguf).resolve(), Path(out)
    header = read_header(gguf)
    if not header.architecture:
        raise InputError(f"{gguf} names no architecture (general.architecture)")
    if "tokenizer.ggml.model" not in header.metadata:
        raise InputError(f"{gguf} carries no tokenizer (tokenizer.ggml.*)",
                         hint="convert it again with llama.cpp's convert_hf_to_gguf.py, which embeds the tokenizer")
    file_type, types = quantization(header)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "packager.llm.gguf", str(gguf), str(partial)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConversionError(f"dequantizing {gguf.name} did not finish in {CHILD_TIMEOUT_S} s") from None
    seconds = time.perf_counter() - t0
    lines = (proc.stdout or "").splitlines()
    refused = [ln[len(_REFUSED):] for ln in lines if ln.startswith(_REFUSED)]
    facts = [json.loads(ln[len(_FACTS):]) for ln in lines if ln.startswith(_FACTS)]
    if proc.returncode != 0 or not facts:
        shutil.rmtree(partial, ignore_errors=True)
        if refused:
            raise InputError(f"{gguf.name}: {refused[-1]}")
        tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["no message"]
        raise ConversionError(f"transformers could not turn {gguf.name} into a model folder: {tail[0][:300]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    f = facts[-1]
    return GgufSource(
        folder=out, gguf=gguf, architecture=header.architecture, model_class=f["model_class"],
        parameters=int(f["parameters"]), file_type=file_type, tensor_types=types,
        context_length=int(header.arch_value("context_length", f["context_length"])),
        eos_token_ids=eos_ids(header), chat_template="tokenizer.chat_template" in header.metadata,
        seconds=seconds, peak_rss_bytes=int(f["peak_rss_bytes"]),
        folder_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()))


# ---- the child ----

def _child(gguf: Path, out: Path) -> None:
    """Load, dequantize to fp32 and save as a folder; print the facts (or why the input is refused)."""
    import resource

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _read_once()
    header = read_header(gguf)
    arch, readable = header.architecture, _readable_architectures()
    if arch not in readable:
        _refuse(f"transformers cannot read GGUF architecture {arch!r} (it reads {', '.join(sorted(readable))})")
    where, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except (KeyError, ValueError) as e:
        _refuse(f"transformers cannot make a model config of this {arch!r} GGUF: {e}")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        _refuse(f"{arch!r} ({type(config).__name__}) is not a causal language model")
    out.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    template = header.metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tok.chat_template = template
    tok.save_pretrained(out)
    if isinstance(template, str) and template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)

    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=torch.float32,
                                                  **_dequantized())
    config = loaded.config
    config.dtype = torch.float32
    if hasattr(config, "quantization_config"):  # {"quant_method": "gguf"}: the folder's weights are plain fp32
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    del loaded
    fresh.eval()
    fresh.save_pretrained(out)
    eos = list(eos_ids(header))
    meta = header.metadata
    GenerationConfig(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
                     pad_token_id=meta.get("tokenizer.ggml.padding_token_id")).save_pretrained(out)
    facts = {"model_class": type(fresh).__name__, "parameters": fresh.num_parameters(),
             "context_length": int(getattr(config, "max_position_embeddings", 0) or 0),
             "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(_FACTS + json.dumps(facts), flush=True)


def _readable_architectures() -> set[str]:
    """GGUF architectures this transformers reads: its legacy loader's and (5.x) its packed loader's."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:
        return archs
    return archs | set(GGUF_ARCHS)


def _dequantized() -> dict:
    """from_pretrained's arguments for plain float weights. transformers 5 may keep a GGUF's blocks packed
    (GgufLinear) when the `kernels` package has a matmul kernel for them: ask for dequantizing outright."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _read_once() -> None:
    """transformers parses the file with gguf's GGUFReader for the config, the tokenizer and the weights:
    parse it once (the reader is read-only, a memory map, so sharing it is safe), with its arrays read
    straight from the buffer (fast_reader). It then turns every metadata value into Python, element by
    element, once for each of the three: the config's and the tokenizer's (the same call) are made once,
    and array elements take a direct path (Gemma 3 270M: 3 x 2.6 s -> 2 x 0.5 s)."""
    import copy
    import functools

    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    gguf.GGUFReader = functools.lru_cache(maxsize=1)(fast_reader())
    load = hf_gguf.load_gguf_checkpoint
    metadata = functools.lru_cache(maxsize=2)(lambda path: load(path, return_tensors=False))

    def load_once(path, return_tensors=False, **kw):
        if return_tensors or kw:
            return load(path, return_tensors=return_tensors, **kw)
        return copy.deepcopy(metadata(str(path)))  # callers pop from what they get

    hf_gguf._gguf_parse_value, hf_gguf.load_gguf_checkpoint = parse_value, load_once


_INTS, _FLOATS = frozenset((0, 1, 2, 3, 4, 5, 10, 11)), frozenset((6, 12))  # gguf's value type codes


def parse_value(value, types):
    """transformers' _gguf_parse_value, with a direct path for array elements (strings, ints, floats)."""
    if type(types) is list and len(types) == 2 and types[0] == 9:
        t = types[1]
        if t == 8:
            return value.tobytes().decode()
        if t in _INTS:
            return int(value[0])
        if t in _FLOATS:
            return float(value[0])
    from transformers.integrations.ggml import _gguf_parse_value

    return _gguf_parse_value(value, types)


def fast_reader():
    """gguf's GGUFReader with its arrays parsed straight from the buffer into the same parts. gguf-py makes
    two memmap views per element: Gemma 3 270M's 262k-token vocabulary took 22-42 s of a 70-100 s child
    here; read this way, 1.8 s (the child: 31 s, the folder byte for byte the same)."""
    import gguf
    import numpy as np

    array = gguf.GGUFValueType.ARRAY

    class FastArrays(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != array or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            buf = memoryview(self.data)
            itype, count = struct.unpack_from("<IQ", buf, orig_offs)
            head = [np.frombuffer(buf, np.uint32, 1, orig_offs), np.frombuffer(buf, np.uint64, 1, orig_offs + 4)]
            offs = orig_offs + 12
            sub = gguf.GGUFValueType(itype)
            types = [array, sub] if count else [array]
            scalar = self.gguf_scalar_to_np.get(sub)
            if scalar is not None:
                values = np.frombuffer(buf, scalar, count, offs)
                return 12 + values.nbytes, head + [values[i:i + 1] for i in range(count)], list(range(2, 2 + count)), types
            if sub != gguf.GGUFValueType.STRING:  # nested arrays: rare, small
                return super()._get_field_parts(orig_offs, raw_type)
            parts = head
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, offs)
                parts += [np.frombuffer(buf, np.uint64, 1, offs), np.frombuffer(buf, np.uint8, n, offs + 8)]
                offs += 8 + n
            return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), types

    return FastArrays


def _refuse(why: str) -> None:
    print(_REFUSED + why, flush=True)
    raise SystemExit(3)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
