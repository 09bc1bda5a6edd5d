"""Calibration and validation data: .npy/.npz arrays, a folder of images, or random.

Arrays are read first (`read_arrays`), so that their shapes can fix the model's dynamic
dimensions; then each becomes a Dataset: a list of per-sample feeds ({input name: array of
the input's resolved shape}) plus optional labels. Random data is only ever made for float
inputs: ids, lengths and sample rates cannot be made up."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgebundle.errors import CalibrationError, InputError
from packager.sources import InputSpec, TextInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TEXT_SUFFIXES = (".txt", ".jsonl")
RANDOM = "random"


@dataclass(frozen=True)
class ImagePreprocessing:
    """How image files become model inputs: value * scale, then (v - mean) / std per channel."""

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Dataset:
    samples: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    source: str = ""
    sha256: str | None = None
    random: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, n_tail: int) -> tuple["Dataset", "Dataset"]:
        """(head, tail) with the last n_tail samples held out."""
        k = len(self) - n_tail
        lab = self.labels
        head = Dataset(self.samples[:k], None if lab is None else lab[:k], self.source, self.sha256, self.random)
        tail = Dataset(self.samples[k:], None if lab is None else lab[k:], self.source + " (held out)",
                       self.sha256, self.random)
        return head, tail


@dataclass
class Arrays:
    """Data as read from disk: one array per input, samples on axis 0."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    sha256: str | None

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:]) for k, v in self.arrays.items()}


def align_texts(read: dict[str, Arrays], text: TextInfo, *, at_least: int = 0) -> None:
    """Tokenized text files padded to one sequence length (the longest, or `at_least`), so every
    sample fits the shape the data fixes; the attention mask keeps the padding out of the model's result."""
    texts = [a for a in read.values() if Path(a.source).suffix in TEXT_SUFFIXES]
    if not texts:
        return
    width = max([at_least] + [next(iter(a.arrays.values())).shape[1] for a in texts])
    pads = {name: (text.settings.pad_id if role.value == "ids" else 0) for name, role in text.settings.inputs}
    for a in texts:
        for k, v in a.arrays.items():
            if v.shape[1] < width:
                a.arrays[k] = np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=pads.get(k, 0))


def is_images(spec: str | None) -> bool:
    return bool(spec) and spec != RANDOM and Path(spec).is_dir()


def read_arrays(spec: str, inputs: list[InputSpec], *, what: str, limit: int | None = None,
                image_prep: ImagePreprocessing = ImagePreprocessing(), text: TextInfo | None = None) -> Arrays:
    """Read `spec` (.npz, .npy, an image folder, or text for text models; not 'random'). Image
    folders need the inputs' shapes resolved (they are resized to them)."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{what} data {spec!r} does not exist",
                         hint=f"pass a .npz/.npy file, a folder of images, a .txt/.jsonl of texts, or '{RANDOM}'")
    if path.suffix in TEXT_SUFFIXES:
        if text is None:
            raise InputError(f"{what} data {path.name} is text, and this model takes no text",
                             hint="text data needs a Hugging Face folder as the model (its tokenizer tokenizes it)")
        arrays, labels = _texts(path, text, limit)
    elif path.is_dir():
        arrays, labels = _images(path, inputs, image_prep, limit), None
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise CalibrationError(f"{path.name}: a .npy file holds one array but the model has {len(inputs)} inputs",
                                   hint=f"use a .npz with one array per input: {layout(inputs)}")
        arrays, labels = {inputs[0].name: _load_npy(path)}, None
    elif path.suffix == ".npz":
        arrays, labels = _npz(path, inputs)
    else:
        raise InputError(f"{what} data {path.name!r}: unsupported file type",
                         hint="use .npz (one array per input, optional labels 'y'), .npy, or a folder of images")
    counts = {k: (len(v) if v.ndim else 0) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"{path.name}: inputs have different sample counts {counts}",
                               hint="the first axis of every array is the sample axis")
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationError(f"{path.name} holds no samples", hint=f"expected: {layout(inputs)}")
    if labels is not None and len(labels) != n:
        raise CalibrationError(f"{path.name}: {len(labels)} labels for {n} samples")
    n = min(n, limit) if limit else n
    arrays = {k: v[:n] for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = int((~np.isfinite(v.reshape(len(v), -1))).any(axis=1).sum())
            raise CalibrationError(f"{path.name}: {bad} of {n} samples of input {k!r} hold NaN or infinite values",
                                   hint="clean or drop those samples: quantization ranges and accuracy figures "
                                        "need finite numbers")
    return Arrays(arrays, None if labels is None else labels[:n], source=str(path), sha256=_hash(path))


def to_dataset(data: Arrays, inputs: list[InputSpec]) -> Dataset:
    n = len(next(iter(data.arrays.values())))
    name = Path(data.source).name
    samples = [{s.name: _fit(data.arrays[s.name][i], s, name) for s in inputs} for i in range(n)]
    return Dataset(samples, data.labels, source=data.source, sha256=data.sha256)


def check_outputs(valid: Dataset, reference: list[dict], outputs: list[str], *, labels_file: Path | None,
                  max_drop: float) -> list[str]:
    """The data and --labels against what the float model answers, before any conversion: labels in
    the range of the first output's classes, one name per class. Returns warnings (a validation set
    too small for the gate to mean much)."""
    from packager.evaluate import output_kind

    # the output the gate reads labels against (evaluate.compare): the first, when it holds class scores
    scores = bool(reference and outputs) and output_kind(
        reference, outputs[0], labelled=valid.labels is not None) == "class_scores"
    first = np.asarray(reference[0][outputs[0]]) if scores else None
    classes = int(first.shape[-1]) if first is not None and first.ndim >= 1 and first.shape[-1] > 1 else None
    y = np.asarray(valid.labels) if valid.labels is not None else None
    if y is not None and y.dtype.kind not in "iub":
        raise CalibrationError(f"{Path(valid.source).name}: labels 'y' are {y.dtype} values; they must be class "
                               "indices (integers)", hint="drop 'y' for a model that is not a classifier")
    if y is not None and classes is not None:
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise CalibrationError(f"{Path(valid.source).name}: labels run from {int(y.min())} to {int(y.max())}, "
                                   f"but the model's output {outputs[0]!r} has {classes} classes (0-{classes - 1})",
                                   hint="labels 'y' are class indices of the model's first output")
    if labels_file is not None:
        text = Path(labels_file).read_text(encoding="utf-8", errors="replace")
        names = [ln for ln in text.splitlines() if ln.strip()]
        if classes is not None and len(names) != classes:
            raise InputError(f"--labels {Path(labels_file).name} has {len(names)} names for the {classes} classes "
                             f"of output {outputs[0]!r}", hint="one class name per line, in class index order")
    warnings = []
    if valid.labels is not None and not valid.random and max_drop > 0 and 100 / len(valid) > max_drop:
        warnings.append(f"validation on {len(valid)} labelled samples: one sample is worth {100 / len(valid):.1f} "
                        f"points of accuracy, more than the gate's {max_drop:g}-point limit; use "
                        f"~{int(np.ceil(300 / max_drop))}+ samples for the gate to mean something")
    return warnings


def layout(inputs: list[InputSpec]) -> str:
    """The .npz layout a model takes, e.g. "input: (N, 512) float32, sr: (N,) int64"."""
    def dims(s: InputSpec) -> str:
        sig = list(s.signature[1:]) if s.signature and s.signature[0] is None else list(s.signature)
        return "(" + ", ".join(["N"] + ["?" if d is None else str(d) for d in sig]) + ("," if not sig else "") + ")"

    return ", ".join(f"{s.name}: {dims(s)} {s.dtype}" for s in inputs) + " (N = samples; optional labels 'y')"


def require_float_inputs(inputs: list[InputSpec]) -> None:
    """Random data is only ever made for float inputs."""
    fixed = [s.name for s in inputs if np.dtype(s.dtype).kind != "f"]
    if fixed:
        raise CalibrationError(
            f"input(s) {fixed} are not float ({', '.join(s.dtype for s in inputs if s.name in fixed)}): edgepack "
            "cannot make up values for them, so it needs real data to validate this model",
            hint=f"pass --validation data.npz (or --calibration) holding {layout(inputs)}")


def random_dataset(inputs: list[InputSpec], *, n: int, seed: int = 0) -> Dataset:
    require_float_inputs(inputs)
    rng = np.random.default_rng(seed)
    samples = [{s.name: rng.random(s.shape, dtype=np.float32).astype(s.dtype) for s in inputs} for _ in range(n)]
    return Dataset(samples, source=RANDOM, random=True)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"{path.name} is not a readable .npy array: {e}") from None


UNNAMED = ("x", "arr_0")  # what a single-input model's one array may be called: np.savez(f, x) writes arr_0


def _npz(path: Path, inputs: list[InputSpec]) -> tuple[dict, np.ndarray | None]:
    import zipfile

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        raise CalibrationError(f"{path.name} is not a .npz archive (a ZIP of .npy arrays); it starts with {head!r}",
                               hint="write it with numpy.savez(path, input_name=array, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CalibrationError(f"{path.name} is not a readable .npz archive (truncated or damaged?): {e}",
                               hint="write it again with numpy.savez") from None
    labels = data.pop("y", None)
    names = [s.name for s in inputs]
    if all(n in data for n in names):
        return {n: data[n] for n in names}, labels
    unnamed = [k for k in UNNAMED if k in data]
    if len(inputs) == 1 and unnamed and len(data) == 1:
        return {names[0]: data[unnamed[0]]}, labels
    raise CalibrationError(f"{path.name} has arrays {sorted(data)} but the model's inputs are {names}",
                           hint=f"name each array after a model input: {layout(inputs)}")


def _fit(x: np.ndarray, spec: InputSpec, src: str) -> np.ndarray:
    """One sample -> exactly the input's resolved shape (adding a batch axis of 1)."""
    x = np.asarray(x)
    if x.shape != spec.shape:
        if (1,) + x.shape == spec.shape:
            x = x[None, ...]
        else:
            raise CalibrationError(
                f"{src}: samples for input {spec.name!r} have shape {x.shape}, the model takes "
                f"{spec.shape} (batch included)",
                hint="the first axis of each array counts samples; each sample must match the input "
                     "with or without its batch axis")
    dt = np.dtype(spec.dtype)
    if x.dtype.kind == "f" and dt.kind in "iub":
        raise CalibrationError(f"{src}: input {spec.name!r} takes {dt.name} but the data is {x.dtype.name}")
    return x.astype(dt, copy=False)


def _texts(path: Path, text: TextInfo, limit: int | None) -> tuple[dict, np.ndarray | None]:
    """One text per line (.txt), or JSON lines with "text" and an optional "label" (a class index or
    name), tokenized by the model's tokenizer and padded to the longest text read (at most its
    max_length; the model masks the padding)."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                texts.append(line.rstrip("\n"))
            else:
                texts.append(_jsonl_text(path, i, line, text.labels, labels))
            if limit and len(texts) >= limit:
                break
    if labels and len(labels) != len(texts):
        raise CalibrationError(f"{path.name}: {len(labels)} of {len(texts)} lines have a label; give all or none")
    enc = text.encoder().encode(texts, length=None)
    return enc.feeds, np.asarray(labels, np.int64) if labels else None


def _jsonl_text(path: Path, line_no: int, line: str, names: tuple[str, ...], labels: list) -> str:
    import json

    try:
        d = json.loads(line)
        t = d["text"]
    except (ValueError, KeyError, TypeError):
        raise CalibrationError(f"{path.name}:{line_no} is not a JSON object with a \"text\"",
                               hint='one object per line: {"text": "...", "label": 1}') from None
    if not isinstance(t, str):
        raise CalibrationError(f"{path.name}:{line_no}: \"text\" is not a string")
    if "label" in d:
        lab = d["label"]
        if isinstance(lab, str) and lab in names:
            lab = names.index(lab)
        if not isinstance(lab, int) or isinstance(lab, bool) or (names and not 0 <= lab < len(names)):
            raise CalibrationError(f"{path.name}:{line_no}: label {d['label']!r} is not one of the model's classes",
                                   hint=f"a class index or one of {list(names)}" if names else "a class index")
        labels.append(lab)
    return t


def _images(folder: Path, inputs: list[InputSpec], prep: ImagePreprocessing, limit: int | None) -> dict:
    if len(inputs) != 1 or len(inputs[0].signature) != 4:
        raise CalibrationError("a folder of images needs a model with one 4-D image input",
                               hint="use a .npz with one array per input instead")
    spec = inputs[0]
    if not spec.shape:
        raise CalibrationError(f"images are resized to the model's input size, and {spec.name!r} has dynamic "
                               f"dimensions {spec.signature}",
                               hint=f"fix them with --input-shape {spec.name}:1,H,W,C (or 1,C,H,W)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: limit or None]
    if not files:
        raise CalibrationError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    import tensorflow as tf  # packager-only path

    nchw = spec.shape[1] in (1, 3) and spec.shape[3] not in (1, 3)
    h, w, c = (spec.shape[2], spec.shape[3], spec.shape[1]) if nchw else spec.shape[1:]
    out = []
    for p in files:
        try:
            img = tf.io.decode_image(p.read_bytes(), channels=c, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            raise CalibrationError(f"{p} is not a readable image") from None
        img = tf.image.resize(tf.cast(img, tf.float32), (h, w)).numpy() * prep.scale
        img = (img - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        out.append(np.transpose(img, (2, 0, 1)) if nchw else img)
    return {spec.name: np.stack(out).astype(np.float32)}


def _hash(path: Path) -> str:
    from packager.store import digest_path

    return digest_path(path) if path.exists() else hashlib.sha256(str(path).encode()).hexdigest()


def data_info(d: Dataset | None) -> dict | None:
    """A dataset as the build report and the bundle's provenance record it."""
    if d is None:
        return None
    return {"source": d.source, "samples": len(d), "sha256": d.sha256, "random": d.random,
            "labels": d.labels is not None, "notes": d.notes}
