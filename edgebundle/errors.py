"""The one exception family of edgepack.

Library code raises these with messages that say what was wrong and what to
do; only the CLIs map them to exit codes.
"""
from __future__ import annotations


class EdgepackError(Exception):
    """Base of every error edgepack reports to a user."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class InputError(EdgepackError):
    """The user's input (file, flag, data) is unusable as given."""


class ProfileError(InputError):
    """A target profile is unknown or malformed."""


class CalibrationError(InputError):
    """Calibration or validation data does not fit the model."""


class ConversionError(EdgepackError):
    """A converter or quantizer failed on a valid input."""


class UnsupportedOpError(ConversionError):
    """The model uses ops the target runtime cannot run."""


class AccuracyGateError(EdgepackError):
    """A bundle lost more accuracy than --max-accuracy-drop allows."""


class BundleError(EdgepackError):
    """A bundle file is malformed or unsafe to read."""


class VerificationError(BundleError):
    """A bundle's hashes or signature do not match its contents."""

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = list(problems or [])


class OutputError(EdgepackError):
    """A result could not be written where it goes (a full disk, a read-only or foreign directory)."""


class RuntimeUnavailableError(EdgepackError):
    """The runtime or delegate a bundle needs is not installed here."""


class Reported(EdgepackError):
    """An error the command already showed (the build's report lists each failed target): the CLI
    exits with its cause's code and prints nothing more."""

    def __init__(self, cause: EdgepackError):
        super().__init__(str(cause))
        self.cause = cause
