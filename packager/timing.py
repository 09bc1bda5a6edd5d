"""Host latency for the build, measured where it means something: in a child process that
has only the device runtime loaded (`python -m edgeruntime.timing --serve`), never in the
build process, whose TensorFlow thread pools and freshly-touched memory turn timings into
noise. Candidates are timed against the fp32 model in interleaved rounds, with the runtime
settings their backend gives (Backend.host_spec)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeruntime.timing import ModelSpec, rss_bytes
from edgebundle.errors import EdgepackError, RuntimeUnavailableError
from packager.figures import Timing

__all__ = ["HostTimer"]

RELEASE_BYTES = 256 << 20  # a worker holding this much exits when released (numpy and a runtime: ~100 MB)


class HostTimer:
    """One worker process at a time, started on first use; models stay loaded in it until the build
    releases it (a target timed)."""

    def __init__(self, workdir: Path):
        self._dir = Path(workdir)
        self._proc: subprocess.Popen | None = None
        self._n = 0

    def compare(self, baseline: ModelSpec, candidate: ModelSpec | None, feeds: dict[str, np.ndarray], *,
                budget_s: float, max_rounds: int = 400, question: str = "verdict") -> Timing:
        """Interleaved timing of `candidate` against `baseline` (see edgeruntime.timing: `question`
        "slower" ends the rounds once that is settled); with no candidate, the baseline's own latency."""
        self._n += 1
        self._dir.mkdir(parents=True, exist_ok=True)
        feeds_path = self._dir / f"timing-feeds-{self._n}.npz"
        np.savez(feeds_path, **feeds)
        req = {"a": vars(baseline), "b": vars(candidate) if candidate else None, "feeds": str(feeds_path), "budget_s": budget_s,
               "max_rounds": max_rounds, "question": question}
        reply = self._ask(req)
        if not reply.get("ok"):
            raise RuntimeUnavailableError(f"timing on this host failed: {reply.get('error')}")
        reply.pop("ok")
        return Timing.from_dict(reply)

    def release(self) -> None:
        """A worker holding RELEASE_BYTES or more exits, and its models' memory with it (a base-size
        encoder's fp32 baseline and candidate: ~1 GB beside the build's next conversions); the next
        timing starts a fresh one, so a model's memory is still measured as its own growth of a clean
        process, not reused heap. A small one stays (a fresh start costs ~1 s, many times a suite)."""
        if self._proc is not None and (rss_bytes(self._proc.pid) or 0) >= RELEASE_BYTES:
            self.close()

    def _ask(self, req: dict) -> dict:
        proc = self._start()
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.close()
            log = (self._dir / "timing-worker.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise EdgepackError("the timing worker process died", hint="its last words: " + " | ".join(log))
        return json.loads(line)

    def start(self) -> None:
        """Start the worker now (a build whose targets time on this CPU calls it first): its Python and
        numpy imports then overlap the build's own loading instead of delaying the first timing."""
        self._start()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
            with open(self._dir / "timing-worker.log", "ab") as log:
                self._proc = subprocess.Popen([sys.executable, "-m", "edgeruntime.timing", "--serve"],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                              text=True, env=env)
        return self._proc

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def __enter__(self) -> "HostTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
