"""Target profiles as the packager loads them: checked against what each format's backend can do
("precisions has X, which format Y cannot do"), which the profile layer below cannot know."""
from __future__ import annotations

import targets
from packager.formats import backend
from targets import Format, Precision, TargetProfile


def can_do(fmt: Format) -> tuple[Precision, ...]:
    return backend(fmt).precisions


def load_profile(name_or_path: str) -> TargetProfile:
    """A built-in profile by name or a user's .yaml, every key and precision checked."""
    return targets.load_profile(name_or_path, can_do=can_do)
