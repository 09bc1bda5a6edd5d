"""What one build is given: the user's BuildOptions (with a DeviceTarget for --profile-on), and,
once the model and data are loaded, the BuildInputs every target of the build reads."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.jobs import BenchSettings
from packager.cache import BuildCache
from packager.candidates import Search
from packager.data import Dataset, ImagePreprocessing
from packager.evaluate import Gate
from packager.sources import Source
from targets import CalibrationMethod, Precision

Progress = Callable[[str], None]
# (probe bundles, the DeviceTarget, the signing key) -> each bundle's profile-job figures
Profiler = Callable[[list[Path], "DeviceTarget", "Path | None"], list[dict]]


@dataclass(frozen=True)
class DeviceTarget:
    """Which device measures, through which broker, for how long per bundle."""

    device: str
    broker: BrokerConfig
    bench: BenchSettings = field(default_factory=lambda: BenchSettings(runs=200, warmup=5, max_seconds=5.0))
    timeout_s: float = 300.0
    profiler: Profiler | None = None  # runs the profile jobs (fleet.profile, wired in by edgepack.cli)

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", self.device or ""):
            raise InputError(f"--profile-on {self.device!r} is not a device id (1-64 letters, digits, '.', '_', '-')")


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    targets: tuple[str, ...]
    out_dir: Path
    precision: Precision = Precision.AUTO
    search: Search = Search.FIRST
    calibration: str | None = None  # path or "random"
    calibration_samples: int = 200
    validation: str | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    accuracy_gate: bool = True
    max_accuracy_drop: float = 1.0  # points (accuracy with labels, else top-1 agreement)
    min_similarity: float = 0.99  # cosine, for outputs that are not class scores
    min_neighbours: float = 0.95  # embeddings: share of validation samples that keep their nearest neighbour
    allow_flex: bool = False
    name: str | None = None
    version: str = "1.0.0"
    opset: int = 17
    per_channel: bool | None = None  # None = the profile's choice
    calibration_method: CalibrationMethod | None = None
    image_prep: ImagePreprocessing = ImagePreprocessing()
    labels: Path | None = None
    tokenizer: Path | None = None  # an ONNX text model's tokenizer.json (or the Hugging Face folder it came from)
    speed_gate: bool = True  # False: auto keeps the first candidate that passes the accuracy gate, untimed
    bench_seconds: float = 2.0  # time budget of each interleaved candidate-vs-fp32 timing
    bench_runs: int = 400  # most interleaved rounds per timing
    sign_key: Path | None = None  # Ed25519 private key: bundles are written signed
    cache: bool = True  # False: no build cache (--no-cache)
    cache_dir: Path | None = None  # the build cache (packager/store.py); None: $EDGEPACK_CACHE_DIR, if set
    profile_on: DeviceTarget | None = None  # the device whose timings decide the speed gate
    overwrite: bool = False  # replace a bundle of the same name, version and target in out_dir
    # TFLite text models: the shorter-length models beside max_length (--length-buckets); None: from the
    # data's token lengths (packager/sequence.py), (): none
    length_buckets: tuple[int, ...] | None = None

    @property
    def gate(self) -> Gate:
        return Gate(enabled=self.accuracy_gate, max_drop=self.max_accuracy_drop, min_similarity=self.min_similarity,
                    min_neighbours=self.min_neighbours)


@dataclass(frozen=True)
class BuildInputs:
    """What every target of one build reads: loaded once, before any target converts."""

    opts: BuildOptions
    name: str  # the bundles' name
    source: Source
    calib: Dataset | None
    valid: Dataset
    reference: list[dict]  # the source's outputs on each validation sample
    cache: BuildCache
    progress: Progress
    signer: Callable[[bytes], bytes] | None
    data_warnings: tuple[str, ...] = ()  # what the data checks found (data.check_outputs), in every target's report
    # The validation texts at their own lengths, where padding does not change the source's outputs
    # (build.py checks): the reference is computed on them, and so is a candidate that takes any length.
    trimmed: tuple[dict, ...] | None = None

    def fed(self, specs_in) -> list[dict]:
        """The validation samples a converted model with these input specs is run on: each text at its own
        length where the model takes any length (as the device runs it), else as loaded (padded)."""
        any_length = bool(specs_in) and all(len(t.shape_signature) == 2 and t.shape_signature[1] < 0 for t in specs_in)
        return list(self.trimmed) if self.trimmed and any_length else self.valid.samples
