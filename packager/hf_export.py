"""Hugging Face folders as a source: read what the folder says about its task, its pooling and its
tokenizer, then export ONNX in a worker process (packager/hf_worker.py) that alone loads torch.

A folder qualifies when it holds `config.json`, weights (`model.safetensors` or
`pytorch_model.bin`) and `tokenizer.json`. The task comes from the folder: sentence-transformers'
`modules.json` with a Pooling module (and Normalize) is feature extraction ending in the sentence
embedding; `...ForSequenceClassification` is text classification (`id2label` -> labels);
`...ForTokenClassification` is token classification; any other model exports its token states."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edgebundle.errors import ConversionError, InputError
from edgeruntime.text import TextSettings, text_settings

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FALLBACK_MAX_LENGTH = 512


class Task(str, Enum):
    FEATURES = "feature-extraction"
    CLASSIFY = "text-classification"
    TOKENS = "token-classification"


@dataclass(frozen=True)
class HfFolder:
    path: Path
    task: Task
    model_type: str
    pooling: str | None  # mean | cls | max, for sentence-transformers folders
    normalize: bool
    labels: tuple[str, ...]  # class names in index order (classifiers)
    max_length: int
    special_tokens: dict

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def output(self) -> str:
        if self.task is not Task.FEATURES:
            return "logits"
        return "sentence_embedding" if self.pooling else "last_hidden_state"

    def text_settings(self, inputs: list[str], *, buckets: tuple[int, ...] = ()) -> TextSettings:
        return text_settings(self.tokenizer, inputs, max_length=self.max_length, special_tokens=self.special_tokens,
                             buckets=buckets)


def is_hf_folder(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHTS)


def read_folder(path: Path) -> HfFolder:
    """What the folder says; InputError naming the file when something the export needs is missing."""
    p = Path(path)
    if not is_hf_folder(p):
        raise InputError(f"{p} is not a Hugging Face model folder",
                         hint=f"it needs config.json and one of {', '.join(WEIGHTS)}")
    if not (p / "tokenizer.json").is_file():
        raise InputError(f"{p} has no tokenizer.json, which the bundle carries to tokenize text on the device",
                         hint="save the tokenizer with a fast tokenizer: AutoTokenizer.from_pretrained(...)"
                              ".save_pretrained(folder)")
    cfg = _json(p / "config.json")
    arch = " ".join(cfg.get("architectures") or [])
    pooling, normalize = _sentence_transformers(p)
    if pooling:
        task = Task.FEATURES
    elif "ForSequenceClassification" in arch:
        task = Task.CLASSIFY
    elif "ForTokenClassification" in arch:
        task = Task.TOKENS
    else:
        task = Task.FEATURES
    labels: tuple[str, ...] = ()
    if task is not Task.FEATURES and cfg.get("id2label"):
        id2label = {int(k): str(v) for k, v in cfg["id2label"].items()}
        labels = tuple(id2label[i] for i in sorted(id2label))
    return HfFolder(path=p, task=task, model_type=str(cfg.get("model_type") or "?"), pooling=pooling,
                    normalize=normalize, labels=labels, max_length=_max_length(p, cfg),
                    special_tokens=_special_tokens(p))


def export_stored(folder: HfFolder, work: Path, *, store=None, opset: int = 17) -> tuple[Path, dict]:
    """(the ONNX export in `work`, what the worker said of it): from the build cache across builds when
    it holds this folder's export (packager/store.py), else exported and kept there."""
    import shutil

    dest = work / f"{folder.path.name}.onnx"
    if store is None:
        work.mkdir(parents=True, exist_ok=True)
        return dest, export_onnx(folder, dest, opset=opset)
    from packager.store import digest_path

    key = store.key({"what": "hf-export", "folder": digest_path(folder.path), "file": dest.name, "opset": opset,
                     "task": folder.task.value, "pooling": folder.pooling, "normalize": folder.normalize})
    staging = work.parent / f".{work.name}-cached"
    hit = store.get(key, staging)
    if hit is not None and (hit.path / dest.name).is_file():
        shutil.rmtree(work, ignore_errors=True)
        hit.path.rename(work)  # the entry's folder, under this build's name
        shutil.rmtree(staging, ignore_errors=True)
        return dest, hit.info
    shutil.rmtree(staging, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    ans = export_onnx(folder, dest, opset=opset)
    store.put(key, work, ans)  # the folder: torch writes the weights of a large model beside the graph
    return dest, ans


def export_onnx(folder: HfFolder, dest: Path, *, opset: int = 17, timeout_s: float = 1800) -> dict:
    """Export the folder's model to `dest` (ONNX, dynamic batch and sequence) in the worker process."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"exporting a Hugging Face folder needs {' and '.join(missing)}, which are not installed",
                         hint="pip install 'edgepack[hf]' (the CPU build of torch is enough), or export ONNX "
                              "yourself and pass the .onnx with --tokenizer")
    with tempfile.TemporaryDirectory(prefix="edgepack-hf-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"folder": str(folder.path), "task": folder.task.value, "pooling": folder.pooling,
                                   "normalize": folder.normalize, "output": folder.output, "onnx": str(dest),
                                   "opset": opset}))
        try:
            res = subprocess.run([sys.executable, "-m", "packager.hf_worker", str(req)], capture_output=True,
                                 text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"exporting {folder.path.name} took longer than {timeout_s:.0f} s") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        why = f"signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        raise ConversionError(f"the Hugging Face export worker died ({why}) on {folder.path.name}: "
                              f"{(res.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    ans = json.loads(lines[-1])
    if not ans.get("ok"):
        raise ConversionError(f"exporting {folder.path.name} ({folder.model_type}) to ONNX failed: {ans['error']}",
                              hint="export ONNX yourself (torch.onnx.export) and pass the .onnx with --tokenizer")
    if ans["max_relative_error"] > 1e-3:
        raise ConversionError(f"the ONNX export of {folder.path.name} differs from torch (relative error "
                              f"{ans['max_relative_error']:.2e})")
    return ans


def folder_text(path: Path) -> tuple[Path, int, tuple[str, ...], dict]:
    """`--tokenizer PATH` for an ONNX model: (tokenizer.json, max length, class names, special tokens),
    from a Hugging Face folder's files, or from a bare tokenizer.json (its own truncation length)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise InputError(f"--tokenizer {p} holds no tokenizer.json")
        cfg = _json(p / "config.json") if (p / "config.json").is_file() else {}
        id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
        arch = " ".join(cfg.get("architectures") or [])
        labels = tuple(id2label[i] for i in sorted(id2label)) if "Classification" in arch else ()
        return p / "tokenizer.json", _max_length(p, cfg), labels, _special_tokens(p)
    d = _json(p)
    if "model" not in d:
        raise InputError(f"--tokenizer {p.name} is not a Hugging Face tokenizer.json (no 'model' section)")
    trunc = (d.get("truncation") or {}).get("max_length")
    specials = {f"{t['content'].strip('[]<>').lower()}_token": t["content"] for t in d.get("added_tokens") or []
                if t.get("special") and isinstance(t.get("content"), str)}
    return p, int(trunc) if isinstance(trunc, int) and trunc >= 2 else FALLBACK_MAX_LENGTH, (), specials


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read as JSON ({e})") from None


def _sentence_transformers(p: Path) -> tuple[str | None, bool]:
    if not (p / "modules.json").is_file():
        return None, False
    mods = _json(p / "modules.json")
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in mods if isinstance(m, dict)}
    if "Pooling" not in types:
        return None, False
    cfg = _json(p / (types["Pooling"].get("path") or "1_Pooling") / "config.json")
    modes = [m for m in ("mean", "cls", "max") if cfg.get(f"pooling_mode_{m}_tokens" if m != "cls" else
                                                            "pooling_mode_cls_token")]
    if len(modes) != 1:
        raise InputError(f"{p.name}: pooling {modes or 'none'} is not supported", hint="one of mean, cls or max")
    return modes[0], "Normalize" in types


def _max_length(p: Path, cfg: dict) -> int:
    limit = int(cfg.get("max_position_embeddings") or FALLBACK_MAX_LENGTH)
    for f, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        if (p / f).is_file():
            v = _json(p / f).get(key)
            if isinstance(v, (int, float)) and 2 <= v < 1e6:  # transformers writes 1e30 for "no limit"
                return int(min(v, limit))
    return min(limit, FALLBACK_MAX_LENGTH)


def _special_tokens(p: Path) -> dict:
    out = {}
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (p / f).is_file():
            for k, v in _json(p / f).items():
                if k.endswith("_token") and isinstance(v, (str, dict)):
                    out[k] = v if isinstance(v, str) else v.get("content")
    return out
