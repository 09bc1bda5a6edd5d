"""What one target tries: steps of a ladder, and the candidates converted for them.

A ladder is a format backend's precisions in order of expected speed (packager/formats/),
cut to what the profile allows, starting at the profile's default. A *mixed* step keeps the
nodes that lose the most accuracy in float; it is only tried right after its plain step
failed the accuracy gate (if the plain one was too slow, keeping nodes in float will not
make it faster)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from targets import Precision


class Search(str, Enum):
    FIRST = "first"  # the first candidate that passes both gates
    THOROUGH = "thorough"  # try every candidate, keep the fastest that passes


@dataclass(frozen=True)
class Step:
    precision: Precision
    mixed: bool = False  # keep the most sensitive nodes in float

    @property
    def label(self) -> str:
        return f"{self.precision.value}-mixed" if self.mixed else self.precision.value


@dataclass(frozen=True)
class Candidate:
    precision: Precision
    keep_float: tuple[str, ...] = ()  # node names left in float (fp32)

    @property
    def label(self) -> str:
        return f"{self.precision.value}+{len(self.keep_float)}f" if self.keep_float else self.precision.value
