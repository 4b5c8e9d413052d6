"""Typed errors. Each carries the numbers or the location a user needs to fix the problem.

The CLI turns any `FlmError` into one line on stderr and a non-zero exit; nothing else
is caught, so a real bug still shows its traceback.
"""

from __future__ import annotations


class FlmError(Exception):
    """Base class for every error flm reports to a user."""

    exit_code = 1
    example: str | None = None  # a correct invocation, shown by the CLI under the message


class UsageError(FlmError):
    """A bad command-line value (unknown preset, bad FORMAT:PATH, ...)."""

    exit_code = 2

    def __init__(self, message: str, example: str | None = None):
        super().__init__(message)
        self.example = example


class DatasetError(FlmError):
    """A dataset file or row that cannot be used. Names the file and, where known, the line."""

    def __init__(self, path, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class SpecError(FlmError):
    """A model file whose spec is missing or invalid."""


def check_at_least(flag: str, value, least: int, example: str | None = None) -> None:
    """UsageError unless `value` (None: not set) is a whole number >= `least`; `flag` names the option."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise UsageError(f"{flag} must be a whole number of at least {least}, got {value!r}", example=example)


class ModelFileError(FlmError):
    """A checkpoint / ONNX / Core ML file that is truncated, foreign or otherwise unusable."""

    def __init__(self, path, problem: str, example: str | None = None):
        self.path = str(path)
        self.example = example
        super().__init__(f"{path}: {problem}")


class BudgetExceeded(FlmError):
    """One or more budget rules failed; `failures` lists (rule, measured, limit)."""

    def __init__(self, budget: str, failures: list[tuple[str, str, str]]):
        self.budget = budget
        self.failures = failures
        parts = "; ".join(f"{rule}: {measured} (limit {limit})" for rule, measured, limit in failures)
        super().__init__(f"budget {budget!r} failed: {parts}")


class ParityError(FlmError):
    """An exported file does not reproduce the PyTorch model within tolerance."""

    def __init__(self, message: str, report=None):
        self.report = report
        super().__init__(message)


class DiskFullError(FlmError):
    """A file could not be written for lack of space (or quota); the file it was to replace is untouched."""

    def __init__(self, path, detail: str):
        self.path = str(path)
        super().__init__(f"{path}: cannot write it: {detail}; nothing was replaced (an existing file there is "
                         "untouched). Free some space or write somewhere else")


class TrainingError(FlmError):
    """Training cannot continue (NaN loss, full disk, ...)."""
