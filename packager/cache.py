"""Work one build shares between targets and candidates: the float model of each format,
one calibration pass per format, the float model's intermediate tensors for the
sensitivity analysis, and the host timing worker."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeruntime.timing import ModelSpec
from packager.figures import Timing
from packager.store import Store
from packager.timing import HostTimer
from targets import CalibrationMethod, Format


@dataclass(frozen=True)
class ArtifactKey:
    """What makes two targets' candidates the same file: arm-cpu and rpi5 share their fp16 model,
    not their int8 one (their I/O types differ, which `variant` says)."""

    format: Format
    precision: str
    keep_float: tuple[str, ...]
    variant: str


class Weights(Mapping):
    """Float weights by tensor name, kept on disk (a .npy file each) and mapped when one is read (copy on
    write: the reader may change its array): the length buckets read the main model's, and between
    them the build holds none while its children convert (MPNet: 440 MB)."""

    def __init__(self):
        self._files: dict[bytes, Path] = {}

    def keep(self, weights: dict[bytes, np.ndarray], folder: Path) -> None:
        """These weights instead of any kept before, written to `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        self._files = {}
        for i, (name, value) in enumerate(weights.items()):
            np.save(folder / f"{i}.npy", value)
            self._files[name] = folder / f"{i}.npy"

    def __getitem__(self, name: bytes) -> np.ndarray:
        return np.load(self._files[name], mmap_mode="c")

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@dataclass
class BuildCache:
    workdir: Path
    timer: HostTimer
    fp32: dict[Format, Path] = field(default_factory=dict)
    fp32_latency: dict[ModelSpec, Timing] = field(default_factory=dict)  # fp32 as timed: its own latency
    # (fp32 spec, candidate spec, question) -> the comparison: arm-cpu and rpi5 time a shared file once
    comparisons: dict[tuple, Timing] = field(default_factory=dict)
    outputs: dict[tuple, list] = field(default_factory=dict)  # (file, runtime settings) -> its validation outputs
    onnx_preprocessed: Path | None = None  # ORT's pre-processing of the fp32 graph, what int8 starts from
    onnx_unprocessed: str | None = None  # why that is the plain graph: ORT's pre-processing failed
    onnx_calibration: dict[CalibrationMethod, Path] = field(default_factory=dict)  # ORT calibration caches
    float_tensors: dict[Path, dict[str, np.ndarray]] = field(default_factory=dict)  # fp32 intermediates
    # fp32 tensors' max |value| per channel on calibration data, by name (dynamic range's smoothing):
    # shared with the length buckets, so that every bucket's weights come out the same and are shared
    ranges: dict[str, np.ndarray] = field(default_factory=dict)
    # the main fp32 model's weights by tensor name, shared with the length buckets (tflite._float_weights)
    weights: Weights = field(default_factory=Weights)
    # source sha256 -> (the ONNX graph onnx2tf converts, its rewrites): one per source, for every length
    bridge_onnx: dict[str, tuple[Path, dict]] = field(default_factory=dict)
    artifacts: dict[ArtifactKey, object] = field(default_factory=dict)  # registry.Artifact, or the error it raised
    bridged: dict[tuple, object] = field(default_factory=dict)  # registry.Bridge results (a path or the error)
    device_profiles: dict[tuple[str, str], dict] = field(default_factory=dict)  # (target, fp32 path) -> device figures
    lengths: dict[int, "BuildCache"] = field(default_factory=dict)  # text length buckets: arm-cpu and rpi5 share one
    store: Store | None = None  # the cache across builds (--cache-dir), None with --no-cache
    keyed: dict = field(default_factory=dict)  # what every store key of this build starts from (model, data)
    stored: set = field(default_factory=set)  # store keys this build has written or read

    def at_length(self, length: int) -> "BuildCache":
        """The cache of the source resolved at another sequence length (packager/sequence.py)."""
        if length not in self.lengths:
            self.lengths[length] = BuildCache(workdir=self.workdir / f"length-{length}", timer=self.timer,
                                              store=self.store, keyed=dict(self.keyed, length=length),
                                              ranges=self.ranges, weights=self.weights,
                                              bridge_onnx=self.bridge_onnx)
        return self.lengths[length]

    def path(self, name: str) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / name
